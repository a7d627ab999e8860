"""The ingestion batch step as plain functions, used by the `ckl_ingest` DAG and `ckl ingest`.

One batch: consume -> validate (invalid to the DLQ, inside `DocumentSource.poll_batch`) -> inject through
the model server (idempotent by doc_id; durable when it returns: the server appends the batch's entries
to its memory bank before answering; documents a rollback excluded go to the DLQ) -> retention probes
within a budget -> commit the Kafka offsets -> log to MLflow.

The MLflow record of a batch is written on a background thread while the next batch is read and
injected (one record at a time, in order; waited for before the next one and when ingestion stops), so
tracking never delays a commit. A failure to write it stops ingestion at the next batch; a crash in
between loses that one batch's record, not its documents.

Exactly once: offsets are committed only after the server answered the inject, so the batch's bank
entries are durable. A crash before the commit redelivers the batch; the server's ledger (the bank's
doc_ids) skips what it already has. A server killed before its append never applied the batch: it
restarts from its checkpoint + bank replay and applies the redelivery.
"""
import functools
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from monitoring.probes import probe_metrics
from pipelines.settings import IngestSettings
from pipelines.source import Batch, DocumentSource
from runtime.faults import crash_point
from serving.client import ModelServerClient
from serving.schemas import InjectResponse, ProbeResponse

log = logging.getLogger(__name__)

EXCLUDED_REASON = "excluded by rollback"


@dataclass(frozen=True)
class BatchReport:
    """What one batch did."""

    consumed: int
    applied: int
    duplicates: int
    dead_lettered: int
    injections: int
    injection_ms: float
    memory_version: int | None
    snapshot_id: str | None
    next_offsets: dict[int, int]  # partition -> the offset committed after the batch
    seconds: float
    excluded: int = 0
    probe_ms: float = 0.0
    retention: dict[str, float] = field(default_factory=dict)  # probe metrics (monitoring.probes)

    @property
    def empty(self) -> bool:
        return self.consumed == 0

    @property
    def probe_share(self) -> float:
        """The share of the batch's time spent probing."""
        return self.probe_ms / (self.seconds * 1000) if self.seconds else 0.0


def open_source(settings: IngestSettings) -> DocumentSource:
    """A consumer of the settings' topic in the settings' group (auto-commit off)."""
    return DocumentSource(settings.bootstrap, topic=settings.topic, group=settings.group)


def open_client(settings: IngestSettings) -> ModelServerClient:
    """An HTTP client of the model server carrying the write token."""
    return ModelServerClient(settings.server_url, token=settings.write_token)


class MlflowWriter:
    """Writes batch records to MLflow on one background thread, one at a time and in order: a record is
    waited for before the next one starts and on `close`, which is where a failure to write it surfaces."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckl-mlflow")
        self._pending: Future | None = None

    def submit(self, write: Callable[[], None]) -> None:
        """Start `write` once the previous record is written."""
        self.wait()
        self._pending = self._executor.submit(write)

    def wait(self) -> None:
        """Block until the record in flight is written; re-raises its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._executor.shutdown()

    def __enter__(self) -> "MlflowWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def process_batch(source: DocumentSource, client: ModelServerClient, settings: IngestSettings,
                  mlflow_writer: MlflowWriter | None = None) -> BatchReport:
    """Consume one batch and make it durable, probe retention, commit its offsets, then record it in MLflow
    (on `mlflow_writer`'s thread when given). An empty poll does nothing."""
    started = time.perf_counter()
    batch = source.poll_batch(settings.batch_size, settings.poll_timeout_s)
    crash_point("after_consume")
    if batch.size == 0:
        return BatchReport(0, 0, 0, 0, 0, 0.0, None, None, {}, time.perf_counter() - started)

    result = client.inject(_inject_payload(batch)) if batch.documents else None
    if result is not None and result.excluded:
        excluded = set(result.excluded)
        source.dead_letter([d for d in batch.documents if d.document.doc_id in excluded], EXCLUDED_REASON)
    crash_point("after_inject")
    probe = _probe(client, settings, time.perf_counter() - started) if result and result.applied else None

    report = BatchReport(
        consumed=batch.size,
        applied=len(result.applied) if result else 0,
        duplicates=len(result.skipped_duplicates) if result else 0,
        dead_lettered=batch.dead_lettered + (len(result.excluded) if result else 0),
        injections=result.injections if result else 0,
        injection_ms=result.injection_ms if result else 0.0,
        memory_version=result.memory_version if result else None,
        snapshot_id=result.checkpoint if result else None,
        next_offsets=dict(batch.next_offsets),
        seconds=time.perf_counter() - started,
        excluded=len(result.excluded) if result else 0,
        probe_ms=probe.elapsed_ms if probe else 0.0,
        retention=probe_metrics(probe.model_dump()) if probe else {},
    )
    crash_point("before_commit")
    source.commit(batch)
    if settings.mlflow_uri and result is not None:
        write = functools.partial(_log_to_mlflow, settings, batch, report, result)
        if mlflow_writer is not None:
            mlflow_writer.submit(write)
        else:
            write()
    log.info("batch done: %s", report)
    return report


def run_one_batch(settings: IngestSettings) -> BatchReport:
    """One batch with a fresh consumer and client (what one `ckl_ingest` DAG run does)."""
    with open_source(settings) as source, open_client(settings) as client:
        return process_batch(source, client, settings)


def batches_until_drained(settings: IngestSettings) -> Iterator[BatchReport]:
    """Process batches until a poll brings nothing within the poll timeout; each batch's MLflow record is
    written while the next batch runs."""
    with open_source(settings) as source, open_client(settings) as client, MlflowWriter() as writer:
        while not (report := process_batch(source, client, settings, writer)).empty:
            yield report


def _inject_payload(batch: Batch) -> list[dict]:
    """The batch's documents as the server's inject documents: each with its Kafka position."""
    return [
        sourced.document.model_dump(mode="json")
        | {"topic": sourced.topic, "partition": sourced.partition, "offset": sourced.offset}
        for sourced in batch.documents
    ]


def _probe(client: ModelServerClient, settings: IngestSettings, batch_seconds: float) -> ProbeResponse | None:
    """Retention probes on the memory the batch produced, within the settings' budget."""
    if settings.probe_questions <= 0:
        return None
    # probing may take `probe_share` of the batch's whole time: p <= share * (batch + p)
    max_ms = 1000 * batch_seconds * settings.probe_share / (1 - settings.probe_share)
    return client.probe(settings.probe_questions, max_ms=max(max_ms, 1.0))


def _log_to_mlflow(settings: IngestSettings, batch: Batch, report: BatchReport,
                   result: InjectResponse) -> None:
    from monitoring.tracking import tracker_for

    tracker = tracker_for(settings.mlflow_uri)
    lineage_run = tracker.lineage_run(result.lineage, params=lambda: _lineage_params(settings))
    metrics = {
        "documents": report.applied,
        "duplicates": report.duplicates,
        "dlq": report.dead_lettered,
        "excluded": report.excluded,
        "injections": report.injections,
        "injection_ms": report.injection_ms,
        "documents_per_s": report.applied / report.seconds if report.seconds else 0.0,
        "memory_version": result.memory_version,
        "bank_version": result.bank_version,
        "probe_ms": report.probe_ms,
        "probe_share": report.probe_share,
    } | report.retention
    tags = {
        "topic": batch.topic, "group": settings.group, "lineage": result.lineage,
        "memory_version": str(result.memory_version), "bank_version": str(result.bank_version),
        "checkpoint": report.snapshot_id or "", "pool_sha256": result.pool_sha256,
    }
    tags |= {f"next_offset.{partition}": str(offset)
             for partition, offset in sorted(batch.next_offsets.items())}
    tracker.log_batch(lineage_run, result.memory_version, metrics, tags)
    if report.snapshot_id:  # a checkpoint: keep the retention curve by age as it stands
        from monitoring.report import save_retention_by_age

        tracker.log_file(lineage_run, f"retention/curve-v{result.memory_version}.png",
                         lambda path: save_retention_by_age(settings.mlflow_uri, lineage_run, path))


def _lineage_params(settings: IngestSettings) -> dict[str, object]:
    """What a lineage run records about the deployment (read once, when the lineage is first seen; with a
    client of its own, as it may run on the MLflow writer's thread)."""
    with open_client(settings) as client:
        health = client.health()
    return {
        "model": health.checkpoint, "device": health.device, "dtype": health.dtype,
        "pool_tokens": health.memory.pool_tokens, "tokens_per_injection": health.memory.tokens_per_injection,
        "context_tokens": health.context_tokens, "batch_size": settings.batch_size,
        "retrieval": health.retrieval.enabled, "top_k": health.retrieval.top_k,
        "retrieval_budget": health.retrieval.token_budget, "keys": health.retrieval.keys,
    }


def report_dict(report: BatchReport) -> dict:
    """A JSON-friendly form of a report (Airflow XCom, logs)."""
    return asdict(report)
