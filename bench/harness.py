"""What the end-to-end benches share: the documents, the local stack (Kafka + MLflow, `ckl serve`), publishing
and the ingestion settings. Used by bench/pipeline.py and bench/load.py.

Import it after putting the repository root first on sys.path (see those files): run as a script, the bench
folder comes first and bench/model.py would shadow the `model` package.
"""

import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from documents.model import Document
from localservices.stack import LocalServices
from pipelines.kafka_io import DOCUMENT_TOPICS, ensure_topics, make_producer
from pipelines.settings import DEFAULT_GROUP, DLQ_TOPIC, DOCS_TOPIC, IngestSettings
from serving.process import ServerProcess
from synthetic.bios import bio_document, generate_people


def documents(count: int, seed: int = 0) -> list[Document]:
    """Biographies of `count` held-out people (with their probes), doc_ids bench-00000, bench-00001, ..."""
    rng = random.Random(seed)
    people = generate_people(count, "heldout", seed)
    return [bio_document(person, rng, f"bench-{i:05d}") for i, person in enumerate(people)]


@contextmanager
def local_services(state: Path) -> Iterator[dict]:
    """Kafka and MLflow in `state` (`ckl services up`) for the block; yields their services.json."""
    services = LocalServices(state)
    try:
        yield services.start()
    finally:
        services.stop()


@contextmanager
def model_server(checkpoint: Path, state: Path, write_token: str) -> Iterator[ServerProcess]:
    """A `ckl serve` of `checkpoint` with its state (snapshots, bank, log) in `state`, for the block."""
    server = ServerProcess(checkpoint, state, write_token=write_token)
    try:
        yield server.start()
    finally:
        server.stop()


def publish(bootstrap: str, topic: str, docs: Sequence[Document]) -> int:
    """Publish the documents to `topic` keyed by doc_id (created with the partitions `ckl.docs` has, the DLQ
    too); returns how many the broker acknowledged."""
    ensure_topics(bootstrap, {topic: DOCUMENT_TOPICS[DOCS_TOPIC], DLQ_TOPIC: DOCUMENT_TOPICS[DLQ_TOPIC]})
    producer = make_producer(bootstrap)
    try:
        futures = [producer.send(topic, value=doc.to_json().encode(), key=doc.doc_id.encode())
                   for doc in docs]
        producer.flush()
    finally:
        producer.close()
    return sum(future.succeeded() for future in futures)


def ingest_settings(services: dict, server: ServerProcess, write_token: str, batch_size: int,
                    probe_questions: int, topic: str = DOCS_TOPIC,
                    group: str = DEFAULT_GROUP) -> IngestSettings:
    """What `ckl ingest` would use against these services and this server (3 s poll timeout: the topic is
    complete before ingestion starts, an empty poll means it is drained)."""
    return IngestSettings(bootstrap=services["kafka_bootstrap"], server_url=server.url,
                          write_token=write_token, mlflow_uri=services["mlflow_uri"], topic=topic,
                          group=group, batch_size=batch_size, poll_timeout_s=3.0,
                          probe_questions=probe_questions)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table, numbers right-aligned."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---:|" * len(headers)]
    lines += ["| " + " | ".join(str(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)
