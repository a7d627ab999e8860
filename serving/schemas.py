"""Request and response bodies of the model server's HTTP API (shared by the server and its client).

The server's limits (question length, batch size, text size, max_new_tokens) are settings, reported by
`GET /v1/health`; exceeding one is a 413 or 422 with a message naming the limit.
"""

from datetime import datetime

from pydantic import BaseModel, Field, field_validator


class QueryRequest(BaseModel):
    question: str = Field(min_length=1, description="Plain text; the server builds the prompt.")
    max_new_tokens: int = Field(32, ge=1, description="Most tokens to generate for the answer.")
    retrieve: bool | None = Field(
        None, description="Bring back memory-bank entries for the question (null: the server's setting)."
    )


class QueryResponse(BaseModel):
    answer: str = Field(description="The generated answer, up to its first newline.")
    memory_version: int = Field(description="The memory version that answered.")
    retrieved: list[str] = Field([], description="doc_ids of the bank entries put in front of the question.")


class Probe(BaseModel):
    question: str = Field(min_length=1)
    answer: str = Field(min_length=1)


class InjectDocument(BaseModel):
    doc_id: str = Field(min_length=1, description="Unique id; a doc_id already applied is skipped.")
    text: str = Field(min_length=1, description="The document text; injected as consecutive contexts.")
    source: str | None = None
    published_at: str | None = Field(None, description="ISO-8601 date or date-time.")
    topic: str = Field(min_length=1, description="Kafka topic the document was consumed from.")
    partition: int = Field(ge=0, description="Kafka partition.")
    offset: int = Field(ge=0, description="Kafka offset of the document's message.")
    probes: list[Probe] | None = Field(None, description="Questions the document answers (kept in the bank).")

    @field_validator("doc_id", "text")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must contain non-whitespace text")
        return value


class InjectRequest(BaseModel):
    documents: list[InjectDocument] = Field(description="Applied in order; at most the server's batch limit.")


class InjectResponse(BaseModel):
    applied: list[str] = Field(description="doc_ids applied by this batch, in order.")
    skipped_duplicates: list[str] = Field(description="doc_ids applied before or repeated in the batch.")
    injections: int = Field(description="Contexts injected by this batch.")
    memory_version: int = Field(description="Memory version after the batch.")
    injection_ms: float = Field(description="Time spent computing the batch's memory update.")
    checkpoint: str | None = Field(None, description="Id of the pool checkpoint this batch wrote, if due.")


class MemoryResponse(BaseModel):
    memory_version: int
    injections: int = Field(description="Contexts injected since the model's memory was empty.")
    documents_applied: int = Field(description="Size of the applied-doc ledger.")
    last_offsets: dict[str, dict[int, int]] = Field(
        description="Last applied Kafka offset per topic and partition."
    )
    bank_entries: int = Field(0, description="Entries in the memory bank (one per injected context).")
    pool_sha256: str = Field("", description="SHA-256 of the live memory pool's bytes.")


class SnapshotResponse(BaseModel):
    id: str
    path: str
    memory_version: int
    created_at: datetime


class SnapshotListResponse(BaseModel):
    snapshots: list[SnapshotResponse] = Field(description="Newest first.")


class PruneRequest(BaseModel):
    keep_last: int = Field(ge=1, description="How many of the newest valid snapshots to keep.")


class PruneResponse(BaseModel):
    removed: list[str] = Field(description="Names of the snapshot (and stale temporary) directories deleted.")
    kept: list[str] = Field(description="Ids of the snapshots left on disk, newest first.")


class CompactResponse(BaseModel):
    covered_seq: int | None = Field(
        description="Entries below this seq lost their exact tokens (a checkpoint covers them); null when "
        "no checkpoint exists."
    )
    entries_without_tokens: int = Field(description="Entries whose exact tokens this compaction dropped.")
    fragments_removed: int
    fragments_added: int
    bytes_removed: int = Field(description="Bytes of old versions and orphaned files deleted.")


class Limits(BaseModel):
    max_question_chars: int
    max_new_tokens: int
    max_batch_documents: int
    max_text_chars: int


class RetrievalInfo(BaseModel):
    enabled: bool = Field(description="Queries bring back bank entries unless they ask otherwise.")
    top_k: int = Field(description="Most entries per question.")
    token_budget: int = Field(description="Most retrieved tokens per layer per question.")
    keys: str = Field(description="The key index that ranks entries.")


class HealthResponse(BaseModel):
    status: str
    memory_version: int
    checkpoint: str
    device: str
    dtype: str
    context_tokens: int = Field(description="Most tokens per injected context.")
    writes_enabled: bool = Field(description="False when the server has no write token configured.")
    limits: Limits
    retrieval: RetrievalInfo
