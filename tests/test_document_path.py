"""The document path on the real broker: validation and DLQ, commits, a broker SIGKILL, `ckl produce`."""

import json
import os
import subprocess
import sys
import time
from collections import Counter

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from pipelines import kafka_io
from pipelines.kafka_io import ensure_topics, make_producer
from pipelines.source import DeadLetter, DocumentSource


def doc(doc_id: str, text: str = "Some text.") -> bytes:
    return json.dumps({"doc_id": doc_id, "text": text}).encode()


def read_topic(bootstrap: str, topic: str, count: int, timeout_s: float = 20) -> list[ConsumerRecord]:
    """The first `count` records of `topic`, read without a consumer group."""
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             consumer_timeout_ms=int(timeout_s * 1000))
    try:
        records = []
        for record in consumer:
            records.append(record)
            if len(records) == count:
                break
        return records
    finally:
        consumer.close()


def committed_offsets(bootstrap: str, group: str) -> dict[int, int]:
    """The group's committed offsets by partition (waits while a restarted broker loads them)."""
    return {tp.partition: offset for tp, offset in kafka_io.committed_offsets(bootstrap, group).items()}


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        return {tp.partition: offset for tp, offset in consumer.end_offsets(partitions).items()}
    finally:
        consumer.close()


def consume_and_commit(source: DocumentSource, until: int, collected: list[str], batch_size: int = 50,
                       timeout_s: float = 60) -> None:
    """Poll and commit batches until `collected` holds `until` doc_ids."""
    deadline = time.monotonic() + timeout_s
    while len(collected) < until:
        assert time.monotonic() < deadline, f"only {len(collected)} of {until} documents arrived"
        batch = source.poll_batch(min(batch_size, until - len(collected)), timeout_s=5)
        collected += [sourced.document.doc_id for sourced in batch.documents]
        source.commit(batch)


BAD_MESSAGES = [  # (case, value, field, reason)
    ("not JSON", b'{"doc_id": "x", "text": ', "$", "not JSON"),
    ("invalid UTF-8", b'{"doc_id": "x", "text": "caf\xe9"}', "$", "not valid UTF-8"),
    ("no value", None, "$", "not JSON"),
    ("not an object", b'["x", "text"]', "$", "expected a JSON object"),
    ("missing doc_id", b'{"text": "t"}', "doc_id", "missing"),
    ("empty doc_id", b'{"doc_id": "", "text": "t"}', "doc_id", "empty"),
    ("missing text", b'{"doc_id": "x"}', "text", "missing"),
    ("empty text", b'{"doc_id": "x", "text": "  "}', "text", "empty"),
    ("doc_id not a string", b'{"doc_id": 7, "text": "t"}', "doc_id", "expected a string, got number"),
    ("source not a string", b'{"doc_id": "x", "text": "t", "source": ["a"]}', "source", "expected a string"),
    ("bad published_at", b'{"doc_id": "x", "text": "t", "published_at": "soon"}', "published_at", "ISO-8601"),
    ("text over the limit", doc("x", "y" * 51), "text", "51 characters, over the limit of 50"),
    ("probes not a list", b'{"doc_id": "x", "text": "t", "probes": "q"}', "probes", "expected a list"),
    ("probe without answer", b'{"doc_id": "x", "text": "t", "probes": [{"question": "q"}]}',
     "probes[0].answer", "missing"),
    ("unknown field", b'{"doc_id": "x", "txt": "t"}', "txt", "unknown field"),
]


def test_each_invalid_message_goes_to_the_dlq_while_the_valid_ones_of_its_batch_go_through(kafka, topic_name):
    dlq = f"{topic_name}.dlq"
    ensure_topics(kafka.bootstrap, {topic_name: 2, dlq: 1})
    producer = make_producer(kafka.bootstrap)
    sent = 0
    bad_futures = []  # (case, future of its send)
    for i, case in enumerate(BAD_MESSAGES):
        partition = i % 2
        producer.send(topic_name, value=doc(f"ok-{i}"), key=f"ok-{i}".encode(), partition=partition)
        bad_futures.append((case, producer.send(topic_name, value=case[1], key=f"bad-{i}".encode(),
                                                headers=[("origin", case[0].encode())], partition=partition)))
        sent += 2
    producer.flush()
    producer.close()
    bad_at = {(meta.partition, meta.offset): case
              for case, meta in ((case, future.get(timeout=10)) for case, future in bad_futures)}

    with DocumentSource(kafka.bootstrap, topic_name, dlq, group=topic_name, max_text_chars=50) as source:
        batch = source.poll_batch(max_docs=sent, timeout_s=20)
        assert batch.size == sent, "the whole topic fits in one batch"
        source.commit(batch)

    valid_ids = sorted(d.document.doc_id for d in batch.documents)
    assert valid_ids == sorted(f"ok-{i}" for i in range(len(BAD_MESSAGES)))
    assert batch.dead_lettered == len(BAD_MESSAGES)
    assert batch.next_offsets == {0: 2 * len(BAD_MESSAGES[0::2]), 1: 2 * len(BAD_MESSAGES[1::2])}
    records = read_topic(kafka.bootstrap, dlq, len(BAD_MESSAGES))
    assert len(records) == len(BAD_MESSAGES)
    for record in records:
        letter = DeadLetter.from_record(record)
        assert letter.source_topic == topic_name
        case, value, field, reason = bad_at[(letter.source_partition, letter.source_offset)]
        assert (letter.value, letter.field) == (value, field), case
        assert reason in letter.reason, case
        assert letter.key.startswith(b"bad-"), case
        assert dict(record.headers)["origin"] == case.encode(), "the original headers are kept"


def test_uncommitted_batch_is_delivered_again_and_committed_one_is_not(kafka, topic_name):
    dlq = f"{topic_name}.dlq"
    ensure_topics(kafka.bootstrap, {topic_name: 1, dlq: 1})
    producer = make_producer(kafka.bootstrap)
    for i in range(10):
        producer.send(topic_name, value=doc(f"d{i}"))
    producer.flush()
    producer.close()

    def new_source() -> DocumentSource:
        return DocumentSource(kafka.bootstrap, topic_name, dlq, group=topic_name)

    with new_source() as source:
        first = source.poll_batch(max_docs=6)
    with new_source() as source:
        again = source.poll_batch(max_docs=6)
        source.commit(again)
    with new_source() as source:
        rest = source.poll_batch(max_docs=6)

    ids = [[d.document.doc_id for d in batch.documents] for batch in (first, again, rest)]
    assert ids == [[f"d{i}" for i in range(6)], [f"d{i}" for i in range(6)], [f"d{i}" for i in range(6, 10)]]
    assert [d.offset for d in again.documents] == [d.offset for d in first.documents]
    assert committed_offsets(kafka.bootstrap, topic_name) == {0: 6}


def test_a_redelivered_batch_does_not_dead_letter_a_message_twice(kafka, topic_name):
    dlq = f"{topic_name}.dlq"
    ensure_topics(kafka.bootstrap, {topic_name: 1, dlq: 1})
    producer = make_producer(kafka.bootstrap)
    for i in range(8):  # offsets 0, 2, 4, 6 invalid
        producer.send(topic_name, value=doc(f"d{i}") if i % 2 else b"not json")
    producer.flush()
    producer.close()

    def new_source() -> DocumentSource:
        return DocumentSource(kafka.bootstrap, topic_name, dlq, group=topic_name)

    with new_source() as source:  # dead-letters 0, 2, 4, then dies before its commit
        first = source.poll_batch(max_docs=5)
    with new_source() as source:  # 0-6 again: only 6 is sent
        again = source.poll_batch(max_docs=7)
        source.commit(again)
    with new_source() as source:  # 7, after a commit that recorded where the DLQ ended; then excluded
        rest = source.poll_batch(max_docs=8)
        source.commit(rest)
        source.dead_letter(rest.documents, "excluded by rollback")
    # moved back as `ckl rollback --replay` does (no metadata): the whole DLQ is read back
    kafka_io.move_group_offsets(kafka.bootstrap, topic_name, {TopicPartition(topic_name, 0): 0})
    with new_source() as source:
        replay = source.poll_batch(max_docs=8)
        source.dead_letter(replay.documents, "excluded by rollback")

    assert [b.dead_lettered for b in (first, again, rest, replay)] == [3, 4, 0, 4]
    assert [d.offset for d in replay.documents] == [1, 3, 5, 7]
    letters = [DeadLetter.from_record(r) for r in read_topic(kafka.bootstrap, dlq, 9, timeout_s=5)]
    assert sorted(letter.source_offset for letter in letters) == list(range(8)), "each message once"
    assert {letter.reason for letter in letters if letter.source_offset % 2} == {"excluded by rollback"}


def test_a_message_too_large_for_the_dlq_is_dead_lettered_as_a_reference(kafka, topic_name):
    dlq, size = f"{topic_name}.dlq", 2_000_000
    ensure_topics(kafka.bootstrap, {dlq: 1})  # the DLQ keeps the broker's default limit of about 1 MB
    admin = KafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    try:  # a source topic configured for messages larger than the DLQ takes
        admin.create_topics({topic_name: {"num_partitions": 1, "replication_factor": 1,
                                          "configs": {"max.message.bytes": str(3 * size)}}})
        admin.wait_for_topics([topic_name])
    finally:
        admin.close()
    producer = make_producer(kafka.bootstrap, max_request_size=3 * size)
    producer.send(topic_name, value=b"x" * size, key=b"huge").get(timeout=30)
    producer.send(topic_name, value=doc("after")).get(timeout=30)
    producer.close()

    with DocumentSource(kafka.bootstrap, topic_name, dlq, group=topic_name) as source:
        batch = source.poll_batch(max_docs=2, timeout_s=20)
        source.commit(batch)

    assert [d.document.doc_id for d in batch.documents] == ["after"], "the partition is not blocked"
    letter = DeadLetter.from_record(read_topic(kafka.bootstrap, dlq, 1)[0])
    assert letter.reference and letter.key == b"huge"
    assert json.loads(letter.value) == {"topic": topic_name, "partition": 0, "offset": 0, "size": size + 4}
    assert "too large to copy" in letter.reason and "not JSON" in letter.reason


def test_group_resumes_after_broker_sigkill_with_no_gap_and_no_duplicate(kafka, topic_name):
    dlq, group, total = f"{topic_name}.dlq", topic_name, 1000
    ensure_topics(kafka.bootstrap, {topic_name: 3, dlq: 1})
    all_ids = [f"doc-{i:04d}" for i in range(total)]
    producer = make_producer(kafka.bootstrap)
    for doc_id in all_ids:
        producer.send(topic_name, value=doc(doc_id, f"Text of {doc_id}."), key=doc_id.encode())
    producer.flush()
    producer.close()

    committed_ids: list[str] = []
    first = DocumentSource(kafka.bootstrap, topic_name, dlq, group=group)
    consume_and_commit(first, until=400, collected=committed_ids)
    before_kill = committed_offsets(kafka.bootstrap, group)
    assert sum(before_kill.values()) == 400

    kafka.kill()
    kafka.start()

    assert committed_offsets(kafka.bootstrap, group) == before_kill, "committed offsets survive the SIGKILL"
    consume_and_commit(first, until=700, collected=committed_ids)  # the same consumer goes on
    in_flight = first.poll_batch(max_docs=50)  # read, but never made durable: the consumer dies now
    first.close()
    assert in_flight.size == 50

    second = DocumentSource(kafka.bootstrap, topic_name, dlq, group=group)
    try:
        consume_and_commit(second, until=total, collected=committed_ids)
        assert second.poll_batch(max_docs=50, timeout_s=2).size == 0, "nothing beyond the 1,000 documents"
    finally:
        second.close()

    counts = Counter(committed_ids)
    assert sorted(counts) == all_ids, "no gap"
    assert set(counts.values()) == {1}, "no duplicate"
    assert {d.document.doc_id for d in in_flight.documents} <= set(committed_ids[700:])
    assert committed_offsets(kafka.bootstrap, group) == end_offsets(kafka.bootstrap, topic_name)


def test_ckl_produce_publishes_every_line_as_is_keyed_by_doc_id(kafka, topic_name, tmp_path):
    lines = [doc("a"), doc("b"), b"this is {not json", b"", b'{"doc_id": "c"}', doc("d")]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_bytes(b"\n".join(lines) + b"\n")
    state = tmp_path / "state"  # the default bootstrap comes from services.json
    state.mkdir()
    (state / "services.json").write_text(json.dumps({"kafka_bootstrap": kafka.bootstrap}))

    result = subprocess.run(
        [sys.executable, "-m", "cli", "produce", topic_name, str(jsonl), "--partitions", "2"],
        capture_output=True, text=True, env={**os.environ, "CKL_HOME": str(state)}, timeout=120,
    )

    assert result.returncode == 0, result.stderr
    assert "published 5 of 5 messages" in result.stdout
    assert "1 empty lines skipped" in result.stdout
    records = read_topic(kafka.bootstrap, topic_name, 5)
    assert {r.value: r.key for r in records} == {
        doc("a"): b"a", doc("b"): b"b", b"this is {not json": None, b'{"doc_id": "c"}': b"c", doc("d"): b"d",
    }
    assert {r.partition for r in records} <= {0, 1}
    assert ensure_topics(kafka.bootstrap, {topic_name: 5}) == {topic_name: 2}, "created with 2 partitions"
