"""Every knob of the model server in one object: where the model and snapshots are, tokens, limits; and the
env names of the tokens. Kept free of torch, so that `ckl serve --help` shows its defaults and
serving/process.py reads the env names without loading the model stack."""

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from compression.settings import RetrievalSettings, SlotFormat
from documents.model import DEFAULT_MAX_TEXT_CHARS
from serving.snapshots import CheckpointPolicy

WRITE_TOKEN_ENV = "CKL_WRITE_TOKEN"
READ_TOKEN_ENV = "CKL_READ_TOKEN"
DEFAULT_MAX_WAITING_QUERIES = 64  # queries waiting for the model beyond those handed to it; more get 503


@dataclass(frozen=True)
class ServerSettings:
    """The server's configuration; `from_environment` fills the tokens from CKL_WRITE_TOKEN/CKL_READ_TOKEN."""

    checkpoint: Path
    snapshot_root: Path
    bank_uri: str | None = None  # None: <snapshot_root>/../bank; a path or an object-store URI
    device: str | None = None  # None: the best available (cuda if present, else cpu)
    dtype: str = "auto"  # "auto": the checkpoint's own dtype
    context_tokens: int | None = None  # None: derived from the checkpoint's window
    cache_dir: Path | None = None  # DeepSpeed's built ops go to cache_dir/torch_extensions
    write_token: str | None = field(default=None, repr=False)
    read_token: str | None = field(default=None, repr=False)
    max_question_chars: int = 2_000
    max_new_tokens: int = 256
    max_batch_documents: int = 512
    max_body_bytes: int = 64 * 2**20  # any request body; a full batch of long texts fits
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS  # the Kafka topic's default limit too
    query_concurrency: int = 1  # queries handed to the model at once (the rest wait without a thread)
    max_waiting_queries: int = DEFAULT_MAX_WAITING_QUERIES  # of the rest; one more is refused with 503
    retrieval: RetrievalSettings = RetrievalSettings()
    slot_format: SlotFormat = SlotFormat()
    checkpoints: CheckpointPolicy = CheckpointPolicy()
    follow_s: float | None = None  # a read replica: seconds between catch-ups with the writer

    def __post_init__(self):
        minimum = {"max_question_chars": 1, "max_new_tokens": 1, "max_batch_documents": 1,
                   "max_body_bytes": 1, "max_text_chars": 1, "query_concurrency": 1, "max_waiting_queries": 0}
        for name, low in minimum.items():
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be at least {low}, got {getattr(self, name)}")
        if self.context_tokens is not None and self.context_tokens < 1:
            raise ValueError(f"context_tokens must be at least 1 (or None), got {self.context_tokens}")
        if self.follow_s is not None and not 0 < self.follow_s < math.inf:
            raise ValueError(f"follow_s must be finite seconds > 0 (or None), got {self.follow_s}")

    @property
    def bank(self) -> str:
        """Where the memory bank lives."""
        return self.bank_uri or str(self.snapshot_root.parent / "bank")

    @classmethod
    def from_environment(cls, **values: object) -> "ServerSettings":
        """Settings with the tokens read from the environment (unset or empty: None)."""
        return cls(
            write_token=os.environ.get(WRITE_TOKEN_ENV) or None,
            read_token=os.environ.get(READ_TOKEN_ENV) or None,
            **values,
        )
