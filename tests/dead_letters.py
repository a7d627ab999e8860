"""Read the dead-letter topic back in tests."""

from kafka import KafkaConsumer

from pipelines.kafka_io import DLQ_TOPIC
from pipelines.source import DeadLetter


def dead_letters(bootstrap: str, source_topic: str | None = None, dlq: str = DLQ_TOPIC) -> list[DeadLetter]:
    """Every letter in `dlq` (of messages from `source_topic` when given), read without a group."""
    consumer = KafkaConsumer(dlq, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             consumer_timeout_ms=3000)
    try:
        letters = [DeadLetter.from_record(record) for record in consumer]
    finally:
        consumer.close()
    return [letter for letter in letters if source_topic is None or letter.source_topic == source_topic]
