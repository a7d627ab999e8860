"""Create ckl's Kafka topics on a cluster and check them: the `kafka-init` job of docker/compose.yaml.

    python docker/kafka_topics.py --replication-factor 3 --min-insync-replicas 2   # create, then check
    python docker/kafka_topics.py --check ...                                       # check only

Topics and partition counts are the project's own (`pipelines.kafka_io.DOCUMENT_TOPICS`: ckl.docs with 3
partitions, ckl.docs.dlq with 1); `--partitions NAME=COUNT` overrides one. Missing topics are created with
the replication factor and `min.insync.replicas`; existing ones are checked: fewer partitions or replicas
than asked is an error (Kafka cannot shrink a topic, and a replication change is a reassignment an operator
plans), a different min.insync.replicas is set. The bootstrap servers come from `--bootstrap` or
CKL_KAFKA_BOOTSTRAP. Exits 0 when every topic is as asked, 1 otherwise, with one line per topic.
"""

import argparse
import os
import sys
import time

from kafka import KafkaAdminClient
from kafka.admin import ConfigResource, ConfigResourceType
from kafka.errors import KafkaError

from pipelines.kafka_io import DOCUMENT_TOPICS

MIN_ISR = "min.insync.replicas"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", default=os.environ.get("CKL_KAFKA_BOOTSTRAP"),
                        help="bootstrap servers, host:port[,host:port...] (default: $CKL_KAFKA_BOOTSTRAP)")
    parser.add_argument("--replication-factor", type=int, required=True)
    parser.add_argument("--min-insync-replicas", type=int, required=True)
    parser.add_argument("--partitions", action="append", default=[], metavar="NAME=COUNT",
                        help="partition count of a topic (default: the project's DOCUMENT_TOPICS)")
    parser.add_argument("--check", action="store_true", help="only check, create or change nothing")
    parser.add_argument("--wait-s", type=float, default=60.0,
                        help="how long to wait for the cluster to answer (default: %(default)s)")
    args = parser.parse_args(argv)
    if not args.bootstrap:
        parser.error("no bootstrap servers: pass --bootstrap or set CKL_KAFKA_BOOTSTRAP")
    if not 1 <= args.min_insync_replicas <= args.replication_factor:
        parser.error("need 1 <= --min-insync-replicas <= --replication-factor")
    topics = dict(DOCUMENT_TOPICS)
    for item in args.partitions:
        name, _, count = item.partition("=")
        if not count.isdigit() or int(count) < 1:
            parser.error(f"--partitions wants NAME=COUNT, not {item!r}")
        topics[name] = int(count)
    args.topics = topics
    return args


def connect(bootstrap: str, wait_s: float) -> KafkaAdminClient:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return KafkaAdminClient(bootstrap_servers=bootstrap, client_id="ckl-kafka-init")
        except KafkaError as error:
            if time.monotonic() > deadline:
                raise SystemExit(f"kafka-init: no Kafka cluster at {bootstrap}: {error}") from None
            time.sleep(2.0)


def describe(admin: KafkaAdminClient, names: list[str]) -> dict[str, dict]:
    """{topic: {"partitions": n, "replicas": fewest replicas of a partition}} of the topics that exist."""
    found = {}
    for topic in admin.describe_topics(names):
        if topic["error_code"] == 0:
            partitions = topic["partitions"]
            found[topic["name"]] = {"partitions": len(partitions),
                                    "replicas": min(len(p["replica_nodes"]) for p in partitions)}
    return found


def min_isr_of(admin: KafkaAdminClient, names: list[str]) -> dict[str, str | None]:
    resources = [ConfigResource(ConfigResourceType.TOPIC, name, configs={MIN_ISR: None}) for name in names]
    found = admin.describe_configs(resources, config_filter="all").get("topic", {})
    return {name: found.get(name, {}).get(MIN_ISR, {}).get("value") for name in names}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    admin = connect(args.bootstrap, args.wait_s)
    try:
        names = list(args.topics)
        existing = describe(admin, names)
        missing = [name for name in names if name not in existing]
        if missing and not args.check:
            brokers = len(admin.describe_cluster()["brokers"])
            if brokers < args.replication_factor:
                print(f"kafka-init: replication factor {args.replication_factor} needs that many brokers, "
                      f"the cluster at {args.bootstrap} has {brokers}", file=sys.stderr)
                return 1
            spec = {name: {"num_partitions": args.topics[name], "replication_factor": args.replication_factor,
                           "configs": {MIN_ISR: str(args.min_insync_replicas)}} for name in missing}
            admin.create_topics(spec, raise_errors=False)
            admin.wait_for_topics(missing)
            existing = describe(admin, names)
        isr = min_isr_of(admin, list(existing))
        wrong_isr = [name for name, value in isr.items() if value != str(args.min_insync_replicas)]
        if wrong_isr and not args.check:
            admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, name,
                                                configs={MIN_ISR: str(args.min_insync_replicas)})
                                 for name in wrong_isr])
            isr = min_isr_of(admin, list(existing))
    finally:
        admin.close()

    ok = True
    for name in names:
        have = existing.get(name)
        want = f"{args.topics[name]} partitions x {args.replication_factor} replicas, " \
               f"{MIN_ISR}={args.min_insync_replicas}"
        if have is None:
            problem = "missing"
        elif have["partitions"] < args.topics[name] or have["replicas"] < args.replication_factor:
            problem = f"has {have['partitions']} partitions x {have['replicas']} replicas"
        elif isr.get(name) != str(args.min_insync_replicas):
            problem = f"has {MIN_ISR}={isr.get(name)}"
        else:
            problem = None
        ok &= problem is None
        print(f"{name}: {'ok' if problem is None else problem} (wanted {want})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
