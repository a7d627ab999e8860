"""Kafka plumbing shared by the document path: topic names, topic creation, the producer.

Topics are created by the project with explicit partition counts (never by broker auto-creation,
whose count is whatever the broker's default happens to be).
"""

import logging
import time

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError

from pipelines.settings import DLQ_TOPIC, DOCS_TOPIC

log = logging.getLogger(__name__)

# name -> partition count used when the project creates the topic
DOCUMENT_TOPICS: dict[str, int] = {DOCS_TOPIC: 3, DLQ_TOPIC: 1}
# The broker's default largest message (message.max.bytes) plus room for the dead-letter headers: whatever
# the broker took on ckl.docs fits the DLQ with its reason and source position.
DLQ_MAX_MESSAGE_BYTES = 1_000_012 + 64 * 1024
# name -> topic configs set when the project creates the topic
TOPIC_CONFIGS: dict[str, dict[str, str]] = {DLQ_TOPIC: {"max.message.bytes": str(DLQ_MAX_MESSAGE_BYTES)}}

_TOPIC_ALREADY_EXISTS = 36


def ensure_topics(bootstrap: str, partitions: dict[str, int], replication_factor: int = 1) -> dict[str, int]:
    """Create the missing topics of {name: partition count}; existing topics are left unchanged.

    Idempotent and safe against a concurrent creator. New topics get their TOPIC_CONFIGS. Returns the
    partition count each topic has now (an existing topic keeps its own count and configs; a partition
    count other than the requested one is logged).
    """
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="ckl-admin")
    try:
        existing = {t["name"]: len(t["partitions"]) for t in admin.describe_topics() if t["error_code"] == 0}
        missing = {name: count for name, count in partitions.items() if name not in existing}
        if missing:
            spec = {name: {"num_partitions": count, "replication_factor": replication_factor,
                           "configs": TOPIC_CONFIGS.get(name, {})}
                    for name, count in missing.items()}
            response = admin.create_topics(spec, raise_errors=False)
            for topic in response["topics"]:
                if topic["error_code"] not in (0, _TOPIC_ALREADY_EXISTS):
                    raise RuntimeError(f"cannot create topic {topic['name']}: {topic['error_message']}")
            admin.wait_for_topics(list(missing))
            log.info("created topics %s", missing)
        for name, count in partitions.items():
            if name in existing and existing[name] != count:
                log.warning("topic %s exists with %d partitions (wanted %d); left as it is",
                            name, existing[name], count)
        return {name: existing.get(name, count) for name, count in partitions.items()}
    finally:
        admin.close()


def make_producer(bootstrap: str, client_id: str = "ckl-producer", **config) -> KafkaProducer:
    """A producer that sends raw bytes and waits for all in-sync replicas (idempotent, retries); `config`
    adds or overrides KafkaProducer settings."""
    return KafkaProducer(**{"bootstrap_servers": bootstrap, "client_id": client_id, "acks": "all",
                            "linger_ms": 5, **config})


def committed_offsets(bootstrap: str, group: str, timeout_s: float = 30.0) -> dict[TopicPartition, int]:
    """The group's committed offsets; waits while a restarted broker is still loading them."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="ckl-admin")
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                offsets = admin.list_group_offsets({group: None})[group]
                return {tp: meta.offset for tp, meta in offsets.items()}
            except KafkaError as error:
                if not error.retriable or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
    finally:
        admin.close()


def consumer_lag(bootstrap: str, topic: str, group: str) -> int:
    """Messages of `topic` not yet committed by `group` (all of them if the group never committed)."""
    committed = committed_offsets(bootstrap, group)
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, client_id="ckl-lag")
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        ends = consumer.end_offsets(partitions)
        return sum(end - max(committed.get(tp, 0), 0) for tp, end in ends.items())
    finally:
        consumer.close()


def topic_size(bootstrap: str, topic: str) -> int:
    """Messages currently held by `topic` (0 if it does not exist)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, client_id="ckl-size")
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        ends, starts = consumer.end_offsets(partitions), consumer.beginning_offsets(partitions)
        return sum(ends[tp] - starts[tp] for tp in partitions)
    finally:
        consumer.close()


class GroupBusy(RuntimeError):
    """A consumer group still has running members (its offsets can only be moved while it is empty)."""


def group_members(bootstrap: str, group: str) -> int:
    """How many consumers are members of `group` right now."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="ckl-admin")
    try:
        return _members(admin, group)
    finally:
        admin.close()


def _members(admin: KafkaAdminClient, group: str) -> int:
    return len(admin.describe_groups([group])[group]["members"])


def move_group_offsets(bootstrap: str, group: str, offsets: dict[TopicPartition, int],
                       wait_s: float = 120.0) -> None:
    """Set `group`'s committed offsets (the next message each partition reads). Kafka allows it only while
    the group has no members: waits up to `wait_s` for running consumers to leave, then raises GroupBusy."""
    from kafka.errors import NoError
    from kafka.structs import OffsetAndMetadata

    deadline = time.monotonic() + wait_s
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="ckl-admin")
    try:
        while True:
            if _members(admin, group) == 0:
                request = {tp: OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()}
                errors = admin.alter_group_offsets(group, request)
                failed = {tp: error for tp, error in errors.items() if error is not NoError}
                if not failed:
                    log.info("moved the offsets of group %s: %s", group, offsets)
                    return
                log.info("moving the offsets of group %s failed (%s); retrying", group, failed)
            if time.monotonic() > deadline:
                raise GroupBusy(f"consumer group {group} still has running members after {wait_s:.0f} s: "
                                "stop ingestion (pause the ckl_ingest DAG) and try again")
            time.sleep(1.0)
    finally:
        admin.close()
