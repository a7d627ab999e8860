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

    `version` counts every change of the pool in this process (updates and loads), so anything derived
    from the pool (the memory K/V cache) can tell it is stale. `num_injections` counts contexts injected
    since the pool was first filled. `initialized` is False only for a pool no context has filled yet.
    """

    pool: torch.Tensor
    version: int
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


def survivor_indices(
    pool_size: int,
    num_dropped: int,
    num_layers: int,
    per_layer: bool,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Indices of the tokens that survive a drop, ascending: [N - K] shared by all layers, or [L, N - K].

    Drawn as the first N - K entries of a random permutation (one permutation, or one per layer in
    layer order), on the CPU so a seeded CPU generator gives the same draws on every device.
    """
    keep = pool_size - num_dropped
    if not per_layer:
        return torch.randperm(pool_size, generator=generator)[:keep].sort().values
    return torch.stack(
        [torch.randperm(pool_size, generator=generator)[:keep].sort().values for _ in range(num_layers)]
    )


def drop_and_append(
    pool: torch.Tensor,
    new_tokens: torch.Tensor,
    per_layer: bool,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """theta_l <- concat(theta_l[survivors], e_l): drop K = new_tokens.shape[1] random tokens, append the new.

    pool: [L, N, d]; new_tokens: [L, K, d] with K <= N. Returns a new [L, N, d] tensor.
    """
    num_layers, pool_size, _ = pool.shape
    num_new = new_tokens.shape[1]
    if num_new > pool_size:
        raise ValueError(f"cannot append {num_new} new tokens to a pool of {pool_size}")
    keep = survivor_indices(pool_size, num_new, num_layers, per_layer, generator).to(pool.device)
    if per_layer:  # keep: [L, N - K]
        survivors = torch.gather(pool, 1, keep[:, :, None].expand(-1, -1, pool.shape[2]))
    else:  # keep: [N - K]
        survivors = pool[:, keep]
    return torch.cat([survivors, new_tokens.to(pool.dtype)], dim=1)


def updated_pool(
    pool: torch.Tensor,
    new_tokens: torch.Tensor,
    initialized: bool,
    per_layer: bool,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The pool after one self-update: tiling when it is still empty, otherwise drop K and append."""
    if not initialized:
        return tile_pool(new_tokens.to(pool.dtype), pool.shape[1])
    return drop_and_append(pool, new_tokens, per_layer, generator)
