"""Retrieval's settings and the retrieval slots' format, kept free of torch so that `ckl serve --help` and
`ckl eval --help` can show their defaults and choices without loading the model stack
(compression/retrieval.py does the retrieving, compression/slots.py encodes and decodes the slots)."""

from dataclasses import dataclass

SLOT_DTYPES = ("float16", "int8")
KEY_KINDS = ("bm25", "dense", "hybrid")  # retrieval key indexes (compression/keys.py)


@dataclass(frozen=True)
class RetrievalSettings:
    """Retrieval on or off, most entries per question, the token budget per layer, the key index."""

    enabled: bool = True
    top_k: int = 1
    token_budget: int = 512
    keys: str = "bm25"  # one of KEY_KINDS

    def __post_init__(self):
        if self.top_k < 1 or self.token_budget < 1:
            raise ValueError(f"top_k and token_budget must be positive: {self.top_k}, {self.token_budget}")
        if self.keys not in KEY_KINDS:
            raise ValueError(f"unknown key index kind {self.keys!r} (one of {', '.join(KEY_KINDS)})")


@dataclass(frozen=True)
class SlotFormat:
    """How many tokens per layer an entry keeps for retrieval (None: all K) and in which dtype (one of
    SLOT_DTYPES); compression/slots.py encodes and decodes slots in this format."""

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
