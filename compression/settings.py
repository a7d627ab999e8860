"""Retrieval's settings, kept free of torch so that `ckl serve --help` and `ckl eval --help` can show their
defaults without loading the model stack (compression/retrieval.py does the retrieving)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class RetrievalSettings:
    """Retrieval on or off, most entries per question, the token budget per layer, the key index."""

    enabled: bool = True
    top_k: int = 1
    token_budget: int = 512
    keys: str = "bm25"

    def __post_init__(self):
        if self.top_k < 1 or self.token_budget < 1:
            raise ValueError(f"top_k and token_budget must be positive: {self.top_k}, {self.token_budget}")
