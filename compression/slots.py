"""Memory tokens as bytes: the exact write-ahead copy, and the compressed slots kept for retrieval.

An injection turns one context into K new memory tokens per layer ([L, K, d]). The bank keeps them twice:
- exactly, in the pool's dtype (`tensor_to_bytes`), so replaying the entry rebuilds the pool bit for bit;
  this copy is only needed until a pool checkpoint covers the entry (compaction then drops it);
- as retrieval slots (`SlotFormat`): S <= K tokens per layer (the last S: under causal attention they
  have read the whole context), float16, or int8 with one float16 scale per token (symmetric, max-abs).

One injection may give fewer than K tokens: the first into an empty pool gives k = min(K, T) for a context
of T tokens (it fills the pool by tiling them), and keeps min(S, k) slots. Readers take the token count
from the bytes (`token_count`).
"""

from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SLOT_DTYPES = ("float16", "int8")
SLOT_TORCH_DTYPES = {"float16": torch.float16, "int8": torch.int8}


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32, and so on (the names DTYPES knows)."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"memory tokens in {name} are not supported; use one of {sorted(DTYPES)}")
    return name


def tensor_to_bytes(tensor: torch.Tensor) -> bytes:
    """The raw bytes of a tensor (C order, on the CPU)."""
    return tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


def tensor_from_bytes(data: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """The tensor `tensor_to_bytes` wrote (a fresh CPU tensor)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)


def token_count(data: bytes, dtype: torch.dtype, layers: int, hidden: int) -> int:
    """k for the bytes of a tensor [L, k, d] of `dtype` (`tensor_to_bytes`); ValueError if they hold none or
    a fraction of a token."""
    row = layers * hidden * dtype.itemsize
    count, rest = divmod(len(data), row)
    if rest or count < 1:
        raise ValueError(f"{len(data)} bytes are not [{layers}, k, {hidden}] {dtype} tokens with k >= 1")
    return count


@dataclass(frozen=True)
class SlotFormat:
    """How many tokens per layer an entry keeps for retrieval (None: all K) and in which dtype."""

    slots: int | None = None
    dtype: str = "float16"

    def __post_init__(self):
        if self.dtype not in SLOT_DTYPES:
            raise ValueError(f"slot dtype must be one of {SLOT_DTYPES}, got {self.dtype!r}")
        if self.slots is not None and self.slots < 1:
            raise ValueError(f"slots per layer must be at least 1, got {self.slots}")

    def count(self, tokens_per_entry: int) -> int:
        """Slots per layer kept of an entry of `tokens_per_entry` tokens per layer (S for K)."""
        return min(self.slots or tokens_per_entry, tokens_per_entry)

    def encode(self, tokens: torch.Tensor) -> tuple[bytes, bytes | None]:
        """Slots of tokens [L, k, d] (min(S, k) of them): (values, scales or None)."""
        kept = tokens.detach()[:, -self.count(tokens.shape[1]) :].float()
        if self.dtype == "float16":
            return tensor_to_bytes(kept.to(torch.float16)), None
        scale = kept.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 127.0  # [L, S, 1]
        quantised = torch.round(kept / scale).clamp(-127, 127).to(torch.int8)
        return tensor_to_bytes(quantised), tensor_to_bytes(scale.to(torch.float16))

    def decode(self, values: bytes, scales: bytes | None, shape: tuple[int, int, int]) -> torch.Tensor:
        """Slots back as a float32 tensor of `shape` [L, S, d] (S: as many as `values` holds, see
        `slot_count`)."""
        if self.dtype == "float16":
            return tensor_from_bytes(values, torch.float16, shape).float()
        if scales is None:
            raise ValueError("int8 slots need their scales")
        quantised = tensor_from_bytes(values, torch.int8, shape).float()
        return quantised * tensor_from_bytes(scales, torch.float16, (*shape[:2], 1)).float()

    def slot_count(self, values: bytes, layers: int, hidden: int) -> int:
        """How many slots per layer `values` (as `encode` wrote them) holds."""
        return token_count(values, SLOT_TORCH_DTYPES[self.dtype], layers, hidden)
