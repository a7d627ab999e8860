"""Request and response bodies of the model server's HTTP API (shared by the server and its client).

The server's limits (question length, batch size, text size, max_new_tokens) are settings, reported by
`GET /v1/health`; exceeding one is a 413 or 422 with a message naming the limit.
"""

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from documents.model import MAX_DOC_ID_CHARS, Document

# Kafka's partition and offset types (int32, int64), which the memory bank stores them as
INT32_MAX, INT64_MAX = 2**31 - 1, 2**63 - 1
MAX_TOPIC_CHARS = 249  # Kafka's own limit on topic names
MAX_EXCLUDED = 10_000  # doc_ids one rollback may exclude


def _whole_number(value: object) -> object:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# a JSON integer: 3 or 3.0 (JSON Schema's "integer"), never true or "3", even in strict models
Integer = Annotated[int, BeforeValidator(_whole_number)]


class RequestBody(BaseModel):
    """A request body, held to its documented schema as the Kafka document message is: unknown fields are
    refused rather than dropped (a typo such as "max_new_token" would fall back to the default silently),
    and values of another JSON type rather than coerced ("5" or true for an integer, "no" for a boolean)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class ErrorResponse(BaseModel):
    """A refusal other than 422 (whose `detail` lists the invalid fields)."""

    detail: str = Field(description="Why the request was refused, in a sentence.")


class QueryRequest(RequestBody):
    question: str = Field(min_length=1, description="Plain text; the server builds the prompt.")
    max_new_tokens: Integer = Field(32, ge=1, description="Most tokens to generate for the answer.")
    retrieve: bool | None = Field(
        None, description="Bring back memory-bank entries for the question (null: the server's setting)."
    )


class QueryResponse(BaseModel):
    answer: str = Field(description="The generated answer, up to its first newline.")
    memory_version: int = Field(description="The memory version that answered.")
    retrieved: list[str] = Field([], description="doc_ids of the bank entries put in front of the question.")


class InjectDocument(Document):
    """A document, with the fields and rules of the Kafka document message, and the Kafka position it was
    consumed from."""

    topic: str = Field(min_length=1, max_length=MAX_TOPIC_CHARS,
                       description="Kafka topic the document was consumed from.")
    partition: Integer = Field(ge=0, le=INT32_MAX, description="Kafka partition.")
    offset: Integer = Field(ge=0, le=INT64_MAX, description="Kafka offset of the document's message.")


class InjectRequest(RequestBody):
    documents: list[InjectDocument] = Field(description="Applied in order; at most the server's batch limit.")


class InjectResponse(BaseModel):
    applied: list[str] = Field(description="doc_ids applied by this batch, in order.")
    skipped_duplicates: list[str] = Field(description="doc_ids applied before or repeated in the batch.")
    injections: int = Field(description="Contexts injected by this batch.")
    memory_version: int = Field(description="Memory version after the batch.")
    injection_ms: float = Field(description="Time spent computing the batch's memory update.")
    checkpoint: str | None = Field(None, description="Id of the pool checkpoint this batch wrote, if due.")
    excluded: list[str] = Field([], description="doc_ids refused because a rollback excluded them.")
    lineage: str = Field("", description="The memory lineage the batch was applied to.")
    bank_version: int = Field(0, description="The memory bank's version (Lance) after the batch.")
    pool_sha256: str = Field("", description="SHA-256 of the memory pool's bytes after the batch.")


class MemoryResponse(BaseModel):
    memory_version: int
    injections: int = Field(description="Contexts injected since the model's memory was empty.")
    documents_applied: int = Field(description="Size of the applied-doc ledger.")
    last_offsets: dict[str, dict[int, int]] = Field(
        description="Last applied Kafka offset per topic and partition."
    )
    bank_entries: int = Field(0, description="Entries in the memory bank (one per injected context).")
    pool_sha256: str = Field("", description="SHA-256 of the live memory pool's bytes.")
    lineage: str = Field("", description="The memory lineage (a rollback starts a new one).")
    lineage_parent: str | None = Field(None, description="The lineage this one was rolled back from.")
    lineage_from_version: int | None = Field(None, description="The version that rollback went back to.")
    excluded: int = Field(0, description="How many doc_ids rollbacks excluded (refused when they come back).")


class ProbeRequest(RequestBody):
    questions: Integer = Field(10, ge=0, le=1000, description="Most probe questions (each asked twice).")
    max_ms: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="No new question after this many milliseconds."
    )
    seed: Integer | None = Field(None, description="Sampling seed (null: the bank's size).")


class BucketScores(BaseModel):
    asked: int
    exact: dict[str, int] = Field(description="Exact matches, by mode (pool, bank).")
    f1: dict[str, float] = Field(description="Sum of token F1, by mode (pool, bank).")


class ProbeResponse(BaseModel):
    buckets: dict[str, BucketScores] = Field(description="By age bucket (injections since the entry's own).")
    degradation_loss: float | None = Field(description="Loss on the held-out text with the pool in front.")
    questions: int
    elapsed_ms: float
    memory_version: int


class RollbackRequest(RequestBody):
    version: Integer = Field(ge=0, description="The memory version to go back to.")
    exclude: list[Annotated[str, Field(max_length=MAX_DOC_ID_CHARS)]] = Field(
        [], max_length=MAX_EXCLUDED, description="doc_ids to refuse from now on (dead-lettered by ingestion)."
    )
    dry_run: bool = Field(False, description="Only report what the rollback would remove.")


class RemovedEntryInfo(BaseModel):
    seq: int
    doc_id: str
    version: int
    topic: str | None
    partition: int | None
    offset: int | None


class RollbackResponse(BaseModel):
    from_version: int
    to_version: int
    removed: list[RemovedEntryInfo] = Field(description="The bank entries the rollback took out.")
    restored_from: str | None = Field(description="The checkpoint replayed from (null: the model's pool).")
    lineage: str = Field(description="The new lineage (the current one on a dry run).")
    previous_lineage: str
    replay_from: dict[str, int] = Field(
        description="Where re-ingesting the removed documents starts: \"topic/partition\" -> Kafka offset "
        "(kept with the lineage: repeating the same rollback returns it again)."
    )
    checkpoint: str | None = Field(description="The checkpoint written of the rolled-back state.")
    memory_version: int
    pool_sha256: str = Field(description="SHA-256 of the pool after the rollback (before it on a dry run).")


class SnapshotResponse(BaseModel):
    id: str
    path: str
    memory_version: int
    created_at: datetime


class SnapshotListResponse(BaseModel):
    snapshots: list[SnapshotResponse] = Field(description="Newest first.")


class PruneRequest(RequestBody):
    keep_last: Integer = Field(ge=1, description="How many of the newest valid snapshots to keep.")


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
    max_body_bytes: int


class RetrievalInfo(BaseModel):
    enabled: bool = Field(description="Queries bring back bank entries unless they ask otherwise.")
    top_k: int = Field(description="Most entries per question.")
    token_budget: int = Field(description="Most retrieved tokens per layer per question.")
    keys: str = Field(description="The key index that ranks entries.")


class MemoryInfo(BaseModel):
    layers: int
    pool_tokens: int = Field(description="Memory tokens per layer in the pool (N).")
    tokens_per_injection: int = Field(description="New memory tokens per injected context (K).")
    dtype: str


class HealthResponse(BaseModel):
    status: str
    memory_version: int
    checkpoint: str
    device: str
    dtype: str
    context_tokens: int = Field(description="Most tokens per injected context.")
    writes_enabled: bool = Field(description="False without a write token, and on a read replica.")
    follow_s: float | None = Field(None, description="A read replica's catch-up interval (null: the writer).")
    limits: Limits
    retrieval: RetrievalInfo
    memory: MemoryInfo
