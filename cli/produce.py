"""`ckl produce TOPIC FILE.jsonl`: publish each line of a JSONL file as one Kafka message.

Lines are published as they are (bytes, trailing newline removed, not validated), so bad documents can
be sent on purpose; the consumer is the one that validates. The key is the line's `--key-field` when the
line is a JSON object with a string there, so one document's versions stay on one partition. Empty lines
are skipped. The topic is created if missing (`--partitions`).
"""

import argparse
import json
import sys
import time
from pathlib import Path

from cli.argtypes import positive_int
from pipelines.kafka_io import DOCUMENT_TOPICS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("topic", metavar="TOPIC", help="topic to publish to, e.g. ckl.docs")
    parser.add_argument("file", metavar="FILE.jsonl", type=Path, help="one message per line")
    parser.add_argument("--bootstrap", metavar="HOST:PORT",
                        help="Kafka bootstrap server (default: kafka_bootstrap of .ckl/services.json)")
    parser.add_argument("--key-field", default="doc_id",
                        help="JSON field used as the message key (default: doc_id)")
    parser.add_argument("--partitions", type=positive_int,
                        help="partition count if the topic must be created (default: 3 for ckl.docs, else 1)")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from pipelines.kafka_io import ensure_topics, make_producer

    if not args.file.is_file():
        print(f"error: {args.file} is not a file", file=sys.stderr)
        return 2
    from kafka.errors import KafkaError

    from runtime.addresses import load_services_info
    from runtime.supervisor import ServiceError

    try:
        bootstrap = args.bootstrap or load_services_info()["kafka_bootstrap"]
        ensure_topics(bootstrap, {args.topic: args.partitions or DOCUMENT_TOPICS.get(args.topic, 1)})
    except (ServiceError, KafkaError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1

    started = time.monotonic()
    producer = make_producer(bootstrap)
    futures, keyed, skipped = [], 0, 0
    try:
        with args.file.open("rb") as lines, tqdm(total=args.file.stat().st_size, unit="B", unit_scale=True,
                                                 desc=f"produce {args.topic}") as progress:
            for line in lines:
                progress.update(len(line))
                value = line.rstrip(b"\r\n")
                if not value:
                    skipped += 1
                    continue
                key = message_key(value, args.key_field)
                keyed += key is not None
                futures.append(producer.send(args.topic, value=value, key=key))
        producer.flush()
    finally:
        producer.close()
    failures = [future.exception for future in futures if future.failed()]
    published = len(futures) - len(failures)
    print(f"published {published} of {len(futures)} messages to {args.topic} on {bootstrap} "
          f"in {time.monotonic() - started:.1f} s ({keyed} keyed by {args.key_field}, "
          f"{len(futures) - keyed} without key, {skipped} empty lines skipped)")
    if failures:
        print(f"error: {len(failures)} not published; first error: {failures[0]}", file=sys.stderr)
        return 1
    return 0


def message_key(value: bytes, key_field: str) -> bytes | None:
    """The UTF-8 bytes of `value[key_field]` when `value` is a JSON object with a string there, else None."""
    try:
        message = json.loads(value)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    key = message.get(key_field) if isinstance(message, dict) else None
    return key.encode("utf-8", "backslashreplace") if isinstance(key, str) and key else None
