"""Memory tokens as bytes: the exact write-ahead copy, and the compressed slots kept for retrieval.

An injection turns one context into K new memory tokens per layer ([L, K, d]). The bank keeps them twice:
- exactly, in the pool's dtype (`tensor_to_bytes`), so replaying the entry rebuilds the pool bit for bit;
  this copy is only needed until a pool checkpoint covers the entry (compaction then drops it);
- as retrieval slots (`encode_slots`, `decode_slots`, in a `SlotFormat`, whose settings live torch-free in
  compression/settings.py): S <= K tokens per layer (the last S: under causal attention they have read
  the whole context), float16, or int8 with one float16 scale per token (symmetric, max-abs).

One injection may give fewer than K tokens: the first into an empty pool gives k = min(K, T) for a context
of T tokens (it fills the pool by tiling them), and keeps min(S, k) slots. Readers take the token count
from the bytes (`token_count`).
"""

import torch

from compression.settings import SLOT_DTYPES, SlotFormat

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SLOT_TORCH_DTYPES = {name: getattr(torch, name) for name in SLOT_DTYPES}  # float16, int8


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


def encode_slots(slot_format: SlotFormat, tokens: torch.Tensor) -> tuple[bytes, bytes | None]:
    """Slots of tokens [L, k, d] in `slot_format` (min(S, k) of them): (values, scales or None)."""
    kept = tokens.detach()[:, -slot_format.count(tokens.shape[1]) :].float()
    if slot_format.dtype == "float16":
        return tensor_to_bytes(kept.to(torch.float16)), None
    scale = kept.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 127.0  # [L, S, 1]
    quantised = torch.round(kept / scale).clamp(-127, 127).to(torch.int8)
    return tensor_to_bytes(quantised), tensor_to_bytes(scale.to(torch.float16))


def decode_slots(slot_format: SlotFormat, values: bytes, scales: bytes | None,
                 shape: tuple[int, int, int]) -> torch.Tensor:
    """Slots back as a float32 tensor of `shape` [L, S, d] (S: as many as `values` holds, see
    `slot_count`)."""
    if slot_format.dtype == "float16":
        return tensor_from_bytes(values, torch.float16, shape).float()
    if scales is None:
        raise ValueError("int8 slots need their scales")
    quantised = tensor_from_bytes(values, torch.int8, shape).float()
    return quantised * tensor_from_bytes(scales, torch.float16, (*shape[:2], 1)).float()


def slot_count(slot_format: SlotFormat, values: bytes, layers: int, hidden: int) -> int:
    """How many slots per layer `values` (as `encode_slots` wrote them) holds."""
    return token_count(values, SLOT_TORCH_DTYPES[slot_format.dtype], layers, hidden)
