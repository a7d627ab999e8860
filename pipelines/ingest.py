"""The ingestion batch step as plain functions, used by the `ckl_ingest` DAG and `ckl ingest`.

One batch: consume -> validate (invalid to the DLQ, inside `DocumentSource.poll_batch`) -> inject through
the model server (idempotent by doc_id; durable when it returns: the server appends the batch's entries
to its memory bank before answering) -> log to MLflow -> commit the Kafka offsets.

Exactly once: offsets are committed only after the server answered the inject, so the batch's bank
entries are durable. A crash before the commit redelivers the batch; the server's ledger (the bank's
doc_ids) skips what it already has. A server killed before its append never applied the batch: it
restarts from its checkpoint + bank replay and applies the redelivery.
"""
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

from pipelines.faults import crash_point
from pipelines.kafka_io import DOCS_TOPIC
from pipelines.paths import state_dir
from pipelines.services import load_services_info
from pipelines.source import DEFAULT_GROUP, Batch, DocumentSource
from serving.client import ModelServerClient, read_server_file
from serving.settings import WRITE_TOKEN_ENV

log = logging.getLogger(__name__)

BOOTSTRAP_ENV, SERVER_URL_ENV, MLFLOW_URI_ENV = "CKL_KAFKA_BOOTSTRAP", "CKL_SERVER_URL", "CKL_MLFLOW_URI"


@dataclass(frozen=True)
class IngestSettings:
    """Where ingestion reads, writes and reports; `resolve` fills the gaps from env and `.ckl/`."""

    bootstrap: str
    server_url: str
    write_token: str | None = field(default=None, repr=False)
    mlflow_uri: str | None = None
    topic: str = DOCS_TOPIC
    group: str = DEFAULT_GROUP
    batch_size: int = 32
    poll_timeout_s: float = 10.0

    @classmethod
    def resolve(cls, **given: object) -> "IngestSettings":
        """Settings from explicit values, else CKL_* environment variables, else `.ckl/*.json`.

        CKL_KAFKA_BOOTSTRAP, CKL_SERVER_URL, CKL_MLFLOW_URI and CKL_WRITE_TOKEN let a scaled-out
        deployment point workers at its own services; locally `ckl services up` and `ckl serve` write
        their addresses into `.ckl/`.
        """
        values = {k: v for k, v in given.items() if v is not None}
        if "bootstrap" not in values or "mlflow_uri" not in values:
            env_bootstrap, env_mlflow = os.environ.get(BOOTSTRAP_ENV), os.environ.get(MLFLOW_URI_ENV)
            services = {} if env_bootstrap and env_mlflow else load_services_info()
            values.setdefault("bootstrap", env_bootstrap or services["kafka_bootstrap"])
            values.setdefault("mlflow_uri", env_mlflow or services.get("mlflow_uri"))
        server_url, write_token = resolve_server(values.get("server_url"), values.get("write_token"))
        return cls(**(values | {"server_url": server_url, "write_token": write_token}))


def resolve_server(url: str | None = None, write_token: str | None = None) -> tuple[str, str | None]:
    """The model server's URL and write token: given, else CKL_SERVER_URL / CKL_WRITE_TOKEN, else the URL
    `ckl serve` wrote into `.ckl/server.json`."""
    url = url or os.environ.get(SERVER_URL_ENV) or read_server_file(state_dir())["url"]
    return url, write_token or os.environ.get(WRITE_TOKEN_ENV)


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
    offsets: dict[int, int]
    seconds: float

    @property
    def empty(self) -> bool:
        return self.consumed == 0


def open_source(settings: IngestSettings) -> DocumentSource:
    """A consumer of the settings' topic in the settings' group (auto-commit off)."""
    return DocumentSource(settings.bootstrap, topic=settings.topic, group=settings.group)


def open_client(settings: IngestSettings) -> ModelServerClient:
    """An HTTP client of the model server carrying the write token."""
    return ModelServerClient(settings.server_url, token=settings.write_token)


def process_batch(source: DocumentSource, client: ModelServerClient, settings: IngestSettings) -> BatchReport:
    """Consume one batch and make it durable, then commit its offsets. An empty poll does nothing."""
    started = time.perf_counter()
    batch = source.poll_batch(settings.batch_size, settings.poll_timeout_s)
    crash_point("after_consume")
    if batch.size == 0:
        return BatchReport(0, 0, 0, 0, 0, 0.0, None, None, {}, time.perf_counter() - started)

    applied, duplicates, injections, injection_ms, version, snapshot_id = [], [], 0, 0.0, None, None
    if batch.documents:
        result = client.inject(_inject_payload(batch))
        applied, duplicates = result.applied, result.skipped_duplicates
        injections, injection_ms, version = result.injections, result.injection_ms, result.memory_version
        snapshot_id = result.checkpoint
    crash_point("after_inject")

    report = BatchReport(
        consumed=batch.size,
        applied=len(applied),
        duplicates=len(duplicates),
        dead_lettered=batch.dead_lettered,
        injections=injections,
        injection_ms=injection_ms,
        memory_version=version,
        snapshot_id=snapshot_id,
        offsets=dict(batch.offsets),
        seconds=time.perf_counter() - started,
    )
    if settings.mlflow_uri:
        _log_to_mlflow(settings, batch, report)
    crash_point("before_commit")
    source.commit(batch)
    log.info("batch done: %s", report)
    return report


def run_one_batch(settings: IngestSettings) -> BatchReport:
    """One batch with a fresh consumer and client (what one `ckl_ingest` DAG run does)."""
    with open_source(settings) as source, open_client(settings) as client:
        return process_batch(source, client, settings)


def batches_until_drained(settings: IngestSettings) -> Iterator[BatchReport]:
    """Process batches until a poll brings nothing within the poll timeout."""
    with open_source(settings) as source, open_client(settings) as client:
        while not (report := process_batch(source, client, settings)).empty:
            yield report


def _inject_payload(batch: Batch) -> list[dict]:
    return [
        {
            "doc_id": sourced.document.doc_id,
            "text": sourced.document.text,
            "source": sourced.document.source,
            "published_at": sourced.document.published_at,
            "topic": sourced.topic,
            "partition": sourced.partition,
            "offset": sourced.offset,
            "probes": [{"question": p.question, "answer": p.answer} for p in sourced.document.probes] or None,
        }
        for sourced in batch.documents
    ]


def _log_to_mlflow(settings: IngestSettings, batch: Batch, report: BatchReport) -> None:
    from monitoring.tracking import log_batch

    metrics = {
        "documents": report.applied,
        "duplicates": report.duplicates,
        "dlq": report.dead_lettered,
        "injections": report.injections,
        "injection_ms": report.injection_ms,
        "documents_per_s": report.applied / report.seconds if report.seconds else 0.0,
    }
    if report.memory_version is not None:
        metrics["memory_version"] = report.memory_version
    tags = {"topic": batch.topic, "group": settings.group, "snapshot": report.snapshot_id or ""}
    tags |= {f"offset.{partition}": str(offset) for partition, offset in sorted(batch.offsets.items())}
    log_batch(settings.mlflow_uri, metrics, tags)


def report_dict(report: BatchReport) -> dict:
    """A JSON-friendly form of a report (Airflow XCom, logs)."""
    return asdict(report)
