"""The document source: a consumer-group reader of `ckl.docs` with a dead-letter topic.

Contract, stated in code below:
- auto-commit is off; `poll_batch` hands out up to B messages as valid `Document`s, each with its
  (topic, partition, offset); every invalid message has ALREADY been written to the dead-letter topic
  (original key and bytes, reason/field/source position in headers) and flushed when the batch is
  returned. Bad input never stops the source and never drops a message.
- `commit(batch)` commits the offsets just after the batch; call it only once whatever the batch
  produced is durable. Batches must be committed in the order they were polled.
- Delivery is at least once: uncommitted messages come again after a restart or a rebalance (a
  partition moved to another member restarts from its committed offset), so downstream steps skip
  doc_ids they already have.
"""

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import OffsetAndMetadata

from pipelines.kafka_io import DLQ_TOPIC, DOCS_TOPIC, DOCUMENT_TOPICS, ensure_topics, make_producer
from pipelines.schema import DEFAULT_MAX_TEXT_CHARS, Document, InvalidDocument, parse_document

log = logging.getLogger(__name__)

DEFAULT_GROUP = "ckl-ingest"
# headers of a dead-letter record (values are UTF-8 text)
DLQ_REASON, DLQ_FIELD = "ckl.dlq.reason", "ckl.dlq.field"
DLQ_SOURCE_TOPIC, DLQ_SOURCE_PARTITION, DLQ_SOURCE_OFFSET = (
    "ckl.dlq.source_topic", "ckl.dlq.source_partition", "ckl.dlq.source_offset")
# once a batch has started, a poll that brings nothing for this long means the stream is idle
_IDLE_POLL_MS = 500
# A consumer that died (SIGKILL, lost node) keeps its partitions until its session times out; 10 s lets a
# restarted worker resume soon (kafka-python would pick 30 s against this broker).
SESSION_TIMEOUT_MS = 10_000


@dataclass(frozen=True)
class SourcedDocument:
    """A valid document and where it was read."""

    document: Document
    topic: str
    partition: int
    offset: int


@dataclass(frozen=True)
class Batch:
    """What one `poll_batch` read: the valid documents and how many invalid ones went to the DLQ."""

    topic: str
    documents: tuple[SourcedDocument, ...]
    dead_lettered: int
    offsets: dict[int, int] = field(default_factory=dict)  # partition -> next offset to read

    @property
    def size(self) -> int:
        """Messages read, valid and invalid."""
        return len(self.documents) + self.dead_lettered


@dataclass(frozen=True)
class DeadLetter:
    """A dead-letter record decoded: the original message and why it was rejected."""

    key: bytes | None
    value: bytes | None
    reason: str
    field: str
    source_topic: str
    source_partition: int
    source_offset: int

    @classmethod
    def from_record(cls, record: ConsumerRecord) -> "DeadLetter":
        headers = {name: value.decode() for name, value in record.headers or []}
        return cls(
            key=record.key,
            value=record.value,
            reason=headers[DLQ_REASON],
            field=headers[DLQ_FIELD],
            source_topic=headers[DLQ_SOURCE_TOPIC],
            source_partition=int(headers[DLQ_SOURCE_PARTITION]),
            source_offset=int(headers[DLQ_SOURCE_OFFSET]),
        )


class DocumentSource:
    """Reads documents in batches from one topic in a consumer group; invalid ones go to the DLQ."""

    def __init__(
        self,
        bootstrap: str,
        topic: str = DOCS_TOPIC,
        dlq_topic: str = DLQ_TOPIC,
        group: str = DEFAULT_GROUP,
        max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
        max_poll_interval_ms: int = 600_000,
    ):
        self.topic = topic
        self.dlq_topic = dlq_topic
        self.max_text_chars = max_text_chars
        self._consumer = KafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            group_id=group,
            client_id=f"ckl-source-{group}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",  # a new group reads everything already published
            max_poll_interval_ms=max_poll_interval_ms,  # a batch may take this long before commit
            session_timeout_ms=SESSION_TIMEOUT_MS,
        )
        # the broker never auto-creates topics: make sure dead letters have somewhere to go
        ensure_topics(bootstrap, {dlq_topic: DOCUMENT_TOPICS.get(dlq_topic, 1)})
        self._dlq = make_producer(bootstrap, client_id=f"ckl-dlq-{group}")

    def poll_batch(self, max_docs: int, timeout_s: float = 10.0) -> Batch:
        """Read up to `max_docs` messages (valid and invalid count alike) within `timeout_s`.

        Returns early once the stream is idle; an empty batch means nothing arrived in time. If
        writing to the DLQ fails, the read position is rewound to the start of the batch and the
        error is raised, so the same messages are read again by the next call.
        """
        records = self._poll_records(max_docs, timeout_s)
        try:
            documents, dlq_sends = [], []
            for record in records:
                try:
                    document = parse_document(record.value or b"", self.max_text_chars)
                except InvalidDocument as error:
                    dlq_sends.append(self._send_to_dlq(record, error))
                else:
                    documents.append(SourcedDocument(document, record.topic, record.partition, record.offset))
            if dlq_sends:
                self._dlq.flush()
                for future in dlq_sends:
                    future.get(timeout=30)  # raises if the broker did not take the record
        except BaseException:
            self._rewind(records)
            raise
        offsets: dict[int, int] = {}
        for record in records:
            offsets[record.partition] = max(offsets.get(record.partition, 0), record.offset + 1)
        return Batch(self.topic, tuple(documents), len(dlq_sends), offsets)

    def commit(self, batch: Batch) -> None:
        """Commit the offsets after `batch`: call only once what the batch produced is durable.

        Partitions this consumer no longer owns (a rebalance happened) are not committed: their new
        owner reads them again from the last committed offset.
        """
        assigned = self._consumer.assignment()
        offsets = {TopicPartition(batch.topic, partition): OffsetAndMetadata(offset, "", -1)
                   for partition, offset in batch.offsets.items()}
        lost = [tp.partition for tp in offsets if tp not in assigned]
        if lost:
            log.warning("partitions %s were reassigned before the commit; they will be redelivered", lost)
        owned = {tp: meta for tp, meta in offsets.items() if tp in assigned}
        if owned:
            self._consumer.commit(owned)

    def close(self) -> None:
        """Leave the group without committing anything and release the connections."""
        self._consumer.close(autocommit=False)
        self._dlq.close()

    def __enter__(self) -> "DocumentSource":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _poll_records(self, max_records: int, timeout_s: float) -> list[ConsumerRecord]:
        records: list[ConsumerRecord] = []
        # A rebalance in the middle of a batch rewinds kept partitions to their committed offsets;
        # records already in this batch are then skipped rather than handed out twice.
        next_offsets: dict[tuple[str, int], int] = {}
        deadline = time.monotonic() + timeout_s
        while len(records) < max_records:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                break
            wait_ms = min(remaining_ms, _IDLE_POLL_MS) if records else remaining_ms
            polled = self._consumer.poll(timeout_ms=wait_ms, max_records=max_records - len(records))
            if not polled and records:
                break
            for record in (record for partition_records in polled.values() for record in partition_records):
                position = (record.topic, record.partition)
                if record.offset >= next_offsets.get(position, 0):
                    records.append(record)
                    next_offsets[position] = record.offset + 1
        return records

    def dead_letter(self, documents: Sequence[SourcedDocument], reason: str) -> None:
        """Send valid documents that must not be applied (a rollback excluded them) to the DLQ with
        `reason`; returns once the broker has them all."""
        sends = [
            self._send(sourced.topic, sourced.partition, sourced.offset, sourced.document.to_json().encode(),
                       sourced.document.doc_id.encode(), reason, "doc_id")
            for sourced in documents
        ]
        self._dlq.flush()
        for future in sends:
            future.get(timeout=30)

    def _send_to_dlq(self, record: ConsumerRecord, error: InvalidDocument):
        return self._send(record.topic, record.partition, record.offset, record.value, record.key,
                          error.reason, error.field, record.headers or [])

    def _send(self, topic: str, partition: int, offset: int, value: bytes | None, key: bytes | None,
              reason: str, field_name: str, original_headers: list | tuple = ()):
        log.info("dead-lettering %s[%d]@%d: %s", topic, partition, offset, reason)
        about = {
            DLQ_REASON: reason,
            DLQ_FIELD: field_name,  # may come from the message itself, hence backslashreplace
            DLQ_SOURCE_TOPIC: topic,
            DLQ_SOURCE_PARTITION: str(partition),
            DLQ_SOURCE_OFFSET: str(offset),
        }
        headers = [(name, text.encode("utf-8", "backslashreplace")) for name, text in about.items()]
        headers += list(original_headers)
        return self._dlq.send(self.dlq_topic, value=value, key=key, headers=headers)

    def _rewind(self, records: list[ConsumerRecord]) -> None:
        """Seek back to the first record of each partition in `records`, so they are read again."""
        first: dict[TopicPartition, int] = {}
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            first[tp] = min(first.get(tp, record.offset), record.offset)
        assigned = self._consumer.assignment()
        for tp, offset in first.items():
            if tp in assigned:
                self._consumer.seek(tp, offset)
