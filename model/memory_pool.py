"""The memory pool's rules (MemoryLLM, Wang et al. 2024, section 3): tile, drop, append, version.

Notation of the paper: the pool holds, for every layer l, N = num_blocks x num_tokens memory tokens
theta_l in R^{N x d}. A self-update turns a context into K = num_tokens new tokens e_l per layer; then
K tokens of theta_l are dropped uniformly at random, the survivors keep their order, and e_l is appended
at the end:  theta_l <- concat(theta_l[survivors], e_l).  The first update of an empty (uninitialised)
pool fills it by tiling the new tokens.

These functions are pure (no in-place writes), so gradients flow through them when the new tokens carry a
graph. The model owns the pool tensor and applies them; this module only states the rules.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MemoryState:
    """A snapshot of the pool: the tensor [L, N, d] and its bookkeeping.

    `generation` counts every change of the pool in this process (updates and loads), so anything derived
    from the pool (the memory K/V cache) can tell it is stale. It is not the server's `memory_version`,
    which counts published batches. `num_injections` counts contexts injected
    since the pool was first filled. `initialized` is False only for a pool no context has filled yet.
    """

    pool: torch.Tensor
    generation: int
    num_injections: int
    initialized: bool


def tile_pool(new_tokens: torch.Tensor, pool_size: int) -> torch.Tensor:
    """First update of an empty pool: repeat the new tokens [L, k, d] along the token axis up to N.

    With k < N the tokens are repeated floor(N / k) times and the last N mod k of them close the pool;
    with k >= N the last N tokens are kept.
    """
    num_new = new_tokens.shape[1]
    if num_new >= pool_size:
        return new_tokens[:, num_new - pool_size :]
    repeats, remainder = divmod(pool_size, num_new)
    pieces = [new_tokens] * repeats
    if remainder:
        pieces.append(new_tokens[:, num_new - remainder :])
    return torch.cat(pieces, dim=1)


def dropped_indices(
    pool_size: int,
    num_dropped: int,
    num_layers: int,
    per_layer: bool,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Indices of the K tokens a drop removes, ascending: [K] shared by all layers, or [L, K].

    Drawn as the last K entries of a random permutation (one permutation, or one per layer in layer
    order), on the CPU so a seeded CPU generator gives the same draws on every device; the survivors are
    the first N - K entries.
    """
    if num_dropped > pool_size:
        raise ValueError(f"cannot drop {num_dropped} tokens from a pool of {pool_size}")
    keep = pool_size - num_dropped
    if not per_layer:
        return torch.randperm(pool_size, generator=generator)[keep:].sort().values
    return torch.stack(
        [torch.randperm(pool_size, generator=generator)[keep:].sort().values for _ in range(num_layers)]
    )


def apply_drop(pool: torch.Tensor, dropped: torch.Tensor, new_tokens: torch.Tensor) -> torch.Tensor:
    """concat(theta_l without the `dropped` indices ([K] or [L, K]), e_l): the survivors keep their order.

    Pure tensor indexing, so replaying stored (new tokens, dropped indices) reproduces a pool bit for bit.
    """
    num_layers, pool_size, d = pool.shape
    if new_tokens.shape[1] != dropped.shape[-1]:
        raise ValueError(f"{new_tokens.shape[1]} new tokens do not replace {dropped.shape[-1]} dropped ones")
    dropped = dropped.to(pool.device)
    if dropped.dim() == 1:
        keep = torch.ones(pool_size, dtype=torch.bool, device=pool.device)
        keep[dropped] = False
        survivors = pool[:, keep]
    else:
        keep = torch.ones(num_layers, pool_size, dtype=torch.bool, device=pool.device)
        keep.scatter_(1, dropped, False)
        survivors = pool[keep].view(num_layers, pool_size - dropped.shape[-1], d)
    return torch.cat([survivors, new_tokens.to(pool.dtype)], dim=1)


def replayed_pool(pool: torch.Tensor, new_tokens: torch.Tensor, dropped: torch.Tensor | None) -> torch.Tensor:
    """The pool after re-applying a recorded update: tiling when `dropped` is None (the update that filled
    an empty pool), otherwise `apply_drop`."""
    if dropped is None:
        return tile_pool(new_tokens.to(pool.dtype), pool.shape[1])
    return apply_drop(pool, dropped, new_tokens)


def next_drop(
    pool: torch.Tensor,
    num_new: int,
    initialized: bool,
    per_layer: bool,
    generator: torch.Generator | None = None,
) -> torch.Tensor | None:
    """The indices the next update of `pool` [L, N, d] drops, or None when it fills an empty pool (tiling)."""
    if not initialized:
        return None
    num_layers, pool_size, _ = pool.shape
    return dropped_indices(pool_size, num_new, num_layers, per_layer, generator)


def updated_pool(
    pool: torch.Tensor,
    new_tokens: torch.Tensor,
    initialized: bool,
    per_layer: bool,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The pool after one self-update: tiling when it is still empty, else drop K at random and append."""
    dropped = next_drop(pool, new_tokens.shape[1], initialized, per_layer, generator)
    return replayed_pool(pool, new_tokens, dropped)
