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
- Dead letters are written once per source message. A commit records, in its offset metadata, where
  the DLQ ended; when a partition's messages come again, the DLQ is read from there and messages whose
  source position it already holds are counted as dead-lettered, not sent again. (Without that metadata,
  after offsets were moved by hand or by `ckl rollback --replay`, the whole DLQ is read once.)
- A message too large for the DLQ even though the broker took it on the source topic (a topic with a
  larger max.message.bytes than the DLQ's) is dead-lettered as a reference: a JSON value naming its
  topic, partition, offset and size, with header ckl.dlq.reference = "true".
"""

import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import MessageSizeTooLargeError, RecordListTooLargeError
from kafka.structs import OffsetAndMetadata

from documents.model import DEFAULT_MAX_TEXT_CHARS, Document
from documents.parse import InvalidDocument, parse_document
from pipelines.kafka_io import (
    DLQ_MAX_MESSAGE_BYTES,
    DOCUMENT_TOPICS,
    ensure_topics,
    make_producer,
)
from pipelines.settings import DEFAULT_GROUP, DLQ_TOPIC, DOCS_TOPIC

log = logging.getLogger(__name__)

# headers of a dead-letter record (values are UTF-8 text)
DLQ_REASON, DLQ_FIELD = "ckl.dlq.reason", "ckl.dlq.field"
DLQ_SOURCE_TOPIC, DLQ_SOURCE_PARTITION, DLQ_SOURCE_OFFSET = (
    "ckl.dlq.source_topic", "ckl.dlq.source_partition", "ckl.dlq.source_offset")
DLQ_REFERENCE = "ckl.dlq.reference"  # "true": the value names the message instead of copying it
_TOO_LARGE = (MessageSizeTooLargeError, RecordListTooLargeError)
# once a batch has started and every partition is read to its end, a poll that brings nothing for this long
# means the stream is idle: the batch ends short instead of waiting for the timeout
_IDLE_POLL_MS = 500
# A consumer that died (SIGKILL, lost node) keeps its partitions until its session times out; 10 s lets a
# restarted worker resume soon (kafka-python would pick 30 s against this broker).
SESSION_TIMEOUT_MS = 10_000
DLQ_END_REFRESH_S = 60.0  # how old the DLQ end recorded with a commit may be


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
    next_offsets: dict[int, int] = field(default_factory=dict)  # partition -> next offset to read (to commit)

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
    reference: bool = False  # the value is {"topic", "partition", "offset", "size"} of a too large message

    @classmethod
    def from_record(cls, record: ConsumerRecord) -> "DeadLetter":
        headers = {name: value.decode("utf-8", "replace") for name, value in record.headers or []}
        return cls(
            key=record.key,
            value=record.value,
            reason=headers[DLQ_REASON],
            field=headers[DLQ_FIELD],
            source_topic=headers[DLQ_SOURCE_TOPIC],
            source_partition=int(headers[DLQ_SOURCE_PARTITION]),
            source_offset=int(headers[DLQ_SOURCE_OFFSET]),
            reference=headers.get(DLQ_REFERENCE) == "true",
        )


@dataclass(frozen=True)
class _Letter:
    """A dead letter to send: the original message, its source position and why."""

    topic: str
    partition: int
    offset: int
    value: bytes | None
    key: bytes | None
    reason: str
    field: str
    headers: tuple = ()

    @classmethod
    def of_invalid(cls, record: ConsumerRecord, error: InvalidDocument) -> "_Letter":
        """The letter of a message that is not a valid document."""
        return cls(record.topic, record.partition, record.offset, record.value, record.key, error.reason,
                   error.field, tuple(record.headers or ()))

    def as_reference(self) -> "_Letter":
        """The same letter with a JSON reference to the message instead of its bytes (and headers)."""
        about = {"topic": self.topic, "partition": self.partition, "offset": self.offset,
                 "size": len(self.value or b"") + len(self.key or b"")}
        reason = f"{self.reason}; the message ({about['size']} bytes) is too large to copy"
        return _Letter(self.topic, self.partition, self.offset, json.dumps(about).encode(), self.key,
                       reason, self.field, ((DLQ_REFERENCE, b"true"),))


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
        self._bootstrap = bootstrap
        self._dlq = make_producer(bootstrap, client_id=f"ckl-dlq-{group}",
                                  max_request_size=DLQ_MAX_MESSAGE_BYTES)
        self._dlq_reader: KafkaConsumer | None = None  # reads the DLQ back (no group), made when needed
        # partition -> its source offsets at or after the committed one that the DLQ already holds
        self._dead_lettered: dict[int, set[int]] = {}
        self._dlq_end: tuple[float, dict[int, int]] | None = None  # (when asked, DLQ end per partition)

    def poll_batch(self, max_docs: int, timeout_s: float = 10.0) -> Batch:
        """Read up to `max_docs` messages (valid and invalid count alike) within `timeout_s`.

        Returns early once the stream is idle (every partition read to its end and nothing new within
        half a second); an empty batch means nothing arrived in time. If writing to the DLQ fails, the
        read position is rewound to the start of the batch and the error is raised, so the same messages
        are read again by the next call.
        """
        records = self._poll_records(max_docs, timeout_s)
        try:
            documents, letters = [], []
            for record in records:
                try:
                    document = parse_document(record.value or b"", self.max_text_chars)
                except InvalidDocument as error:
                    letters.append(_Letter.of_invalid(record, error))
                else:
                    documents.append(SourcedDocument(document, record.topic, record.partition, record.offset))
            self._send_letters(letters)
        except BaseException:
            self._rewind(records)
            raise
        offsets: dict[int, int] = {}
        for record in records:
            offsets[record.partition] = max(offsets.get(record.partition, 0), record.offset + 1)
        return Batch(self.topic, tuple(documents), len(letters), offsets)

    def commit(self, batch: Batch) -> None:
        """Commit the offsets after `batch`: call only once what the batch produced is durable.

        Partitions this consumer no longer owns (a rebalance happened) are not committed: their new
        owner reads them again from the last committed offset.
        """
        assigned = self._consumer.assignment()
        offsets = {TopicPartition(batch.topic, partition): OffsetAndMetadata(offset, "", -1)
                   for partition, offset in batch.next_offsets.items()}
        lost = [tp.partition for tp in offsets if tp not in assigned]
        if lost:
            log.warning("partitions %s were reassigned before the commit; they will be redelivered", lost)
        owned = {tp: meta for tp, meta in offsets.items() if tp in assigned}
        if owned:
            # where the DLQ ends now: dead letters of messages after this commit can only come later
            metadata = json.dumps({"dlq_end": self._recent_dlq_end()}, separators=(",", ":"))
            self._consumer.commit({tp: OffsetAndMetadata(m.offset, metadata, -1) for tp, m in owned.items()})
            for tp, meta in owned.items():
                known = self._dead_lettered.get(tp.partition, set())
                self._dead_lettered[tp.partition] = {offset for offset in known if offset >= meta.offset}

    def close(self) -> None:
        """Leave the group without committing anything and release the connections."""
        self._consumer.close(autocommit=False)
        self._dlq.close()
        if self._dlq_reader is not None:
            self._dlq_reader.close()

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
            if not polled and records and self._caught_up():
                break
            for record in (record for partition_records in polled.values() for record in partition_records):
                position = (record.topic, record.partition)
                if record.offset >= next_offsets.get(position, 0):
                    records.append(record)
                    next_offsets[position] = record.offset + 1
        return records

    def _caught_up(self) -> bool:
        """Whether every assigned partition has been read to its last known end (its high watermark)."""
        for tp in self._consumer.assignment():
            highwater = self._consumer.highwater(tp)
            if highwater is None or self._consumer.position(tp) < highwater:
                return False
        return True

    def dead_letter(self, documents: Sequence[SourcedDocument], reason: str) -> None:
        """Send valid documents that must not be applied (a rollback excluded them) to the DLQ with
        `reason`, unless it holds them already; returns once the broker has them all."""
        self._send_letters([
            _Letter(sourced.topic, sourced.partition, sourced.offset, sourced.document.to_json().encode(),
                    sourced.document.doc_id.encode(), reason, "doc_id")
            for sourced in documents
        ])

    def _send_letters(self, letters: Sequence[_Letter]) -> None:
        """Write the letters whose source position the DLQ does not hold yet, and wait for the broker.
        A letter too large for the DLQ is written as a reference instead."""
        self._load_dead_lettered({letter.partition for letter in letters})
        new = [letter for letter in letters if letter.offset not in self._dead_lettered[letter.partition]]
        if not new:
            return
        sent, too_large = [], []
        for letter in new:
            try:  # the producer refuses a record over its max_request_size right away
                sent.append((letter, self._send(letter)))
            except _TOO_LARGE:
                too_large.append(letter)
        self._dlq.flush()
        for letter, future in sent:
            try:
                future.get(timeout=30)  # raises if the broker did not take the record
            except _TOO_LARGE:
                too_large.append(letter)
        if too_large:
            references = [self._send(letter.as_reference()) for letter in too_large]
            self._dlq.flush()
            for future in references:
                future.get(timeout=30)
        for letter in new:
            self._dead_lettered[letter.partition].add(letter.offset)

    def _send(self, letter: _Letter):
        log.info("dead-lettering %s[%d]@%d: %s", letter.topic, letter.partition, letter.offset, letter.reason)
        about = {
            DLQ_REASON: letter.reason,
            DLQ_FIELD: letter.field,  # may come from the message itself, hence backslashreplace
            DLQ_SOURCE_TOPIC: letter.topic,
            DLQ_SOURCE_PARTITION: str(letter.partition),
            DLQ_SOURCE_OFFSET: str(letter.offset),
        }
        headers = [(name, text.encode("utf-8", "backslashreplace")) for name, text in about.items()]
        headers += list(letter.headers)
        return self._dlq.send(self.dlq_topic, value=letter.value, key=letter.key, headers=headers)

    def _load_dead_lettered(self, partitions: Iterable[int]) -> None:
        """Learn which messages of these partitions (from their committed offsets on) the DLQ holds, for the
        partitions not known yet: read the DLQ from where the last commit saw it end."""
        assigned = {tp.partition for tp in self._consumer.assignment() if tp.topic == self.topic}
        for partition in [p for p in self._dead_lettered if p not in assigned]:
            del self._dead_lettered[partition]  # revoked: a later owner of it may have dead-lettered more
        missing = set(partitions) - set(self._dead_lettered)
        if not missing:
            return
        floors, starts = {}, {}
        for partition in missing:
            committed = self._consumer.committed(TopicPartition(self.topic, partition), metadata=True)
            floors[partition] = committed.offset if committed else 0
            ends = _recorded_dlq_end(committed.metadata if committed else "")
            for dlq_partition in self._dlq_partitions():
                start = ends.get(dlq_partition, 0)
                starts[dlq_partition] = min(starts.get(dlq_partition, start), start)
        held = {partition: set() for partition in missing}
        for letter in self._read_dlq(starts):
            if letter.source_topic == self.topic and letter.source_partition in held:
                if letter.source_offset >= floors[letter.source_partition]:
                    held[letter.source_partition].add(letter.source_offset)
        self._dead_lettered.update(held)

    def _dlq_partitions(self) -> list[int]:
        reader = self._reader()
        return sorted(reader.partitions_for_topic(self.dlq_topic) or {0})

    def _recent_dlq_end(self) -> dict[int, int]:
        """Where the DLQ ended, asked of the broker at most once every DLQ_END_REFRESH_S seconds (not one
        round trip per batch). An end older than the commit is safe: a redelivery reads the DLQ from
        there, a little further back than needed, and finds every letter of the messages after the
        commit, since those can only be written after it."""
        if self._dlq_end is None or time.monotonic() - self._dlq_end[0] > DLQ_END_REFRESH_S:
            self._dlq_end = (time.monotonic(), self._dlq_end_offsets())
        return self._dlq_end[1]

    def _dlq_end_offsets(self) -> dict[int, int]:
        tps = [TopicPartition(self.dlq_topic, p) for p in self._dlq_partitions()]
        return {tp.partition: offset for tp, offset in self._reader().end_offsets(tps).items()}

    def _read_dlq(self, starts: dict[int, int]) -> list["DeadLetter"]:
        """Every dead letter from `starts` (DLQ partition -> offset) to the DLQ's current end."""
        reader = self._reader()
        tps = [TopicPartition(self.dlq_topic, p) for p in starts]
        ends = reader.end_offsets(tps)
        reader.assign(tps)
        for tp in tps:
            reader.seek(tp, starts[tp.partition])
        letters = []
        while any(reader.position(tp) < ends[tp] for tp in tps):
            for records in reader.poll(timeout_ms=1000).values():
                letters += [DeadLetter.from_record(record) for record in records]
        if not any(starts.values()):
            log.info("read the whole DLQ (%d letters): no commit recorded where it ended", len(letters))
        return letters

    def _reader(self) -> KafkaConsumer:
        if self._dlq_reader is None:
            self._dlq_reader = KafkaConsumer(bootstrap_servers=self._bootstrap, group_id=None,
                                             enable_auto_commit=False, client_id="ckl-dlq-reader")
        return self._dlq_reader

    def _rewind(self, records: list[ConsumerRecord]) -> None:
        """Seek back to the first record of each partition in `records`, so they are read again."""
        first: dict[TopicPartition, int] = {}
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            first[tp] = min(first.get(tp, record.offset), record.offset)
        assigned = self._consumer.assignment()
        for tp, offset in first.items():
            self._dead_lettered.pop(tp.partition, None)  # a failed send may have written some letters
            if tp in assigned:
                self._consumer.seek(tp, offset)


def _recorded_dlq_end(metadata: str) -> dict[int, int]:
    """The DLQ end offsets a commit recorded in its metadata ({} when none were)."""
    try:
        return {int(p): int(offset) for p, offset in json.loads(metadata)["dlq_end"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}
