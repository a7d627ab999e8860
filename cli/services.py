"""`ckl services up|down|status`: the local Kafka broker (with ZooKeeper) and MLflow tracking server.

up      start what is not running (running services are reused), wait until each answers,
        write .ckl/services.json (kafka_bootstrap, mlflow_uri, pids, ports, logs), and create the
        project's topics if missing (ckl.docs with 3 partitions, its dead-letter topic ckl.docs.dlq), so
        any Kafka client can publish documents
down    stop everything gracefully (SIGTERM, then SIGKILL after a timeout); no process is left
status  what runs where: pid, address, memory, log; exit code 0 only when every service answers
State and logs live in .ckl/ (or $CKL_HOME); logs in .ckl/logs/.
"""

import argparse
import json
import time
from dataclasses import asdict

from cli.argtypes import positive_float
from localservices.stack import LocalServices
from runtime.supervisor import DEFAULT_READY_TIMEOUT_S, ServiceError, ServiceStatus


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("action", choices=["up", "down", "status"], help="what to do")
    parser.add_argument("--timeout", type=positive_float, default=DEFAULT_READY_TIMEOUT_S,
                        help=f"seconds to wait for each service (default {DEFAULT_READY_TIMEOUT_S:.0f})")
    parser.add_argument("--json", action="store_true", help="status as JSON")


def run(args: argparse.Namespace) -> int:
    services = LocalServices()
    if args.action == "up":
        from pipelines.kafka_io import DOCUMENT_TOPICS, ensure_topics

        started = time.perf_counter()
        try:
            info = services.start(timeout=args.timeout)
        except ServiceError as error:
            print(f"ckl services up failed: {error}")
            return 1
        topics = ensure_topics(info["kafka_bootstrap"], DOCUMENT_TOPICS)  # any Kafka client can publish
        print(f"services up in {time.perf_counter() - started:.1f} s")
        print(f"  kafka_bootstrap  {info['kafka_bootstrap']}")
        print("  topics           " + ", ".join(f"{name} ({n} partitions)" for name, n in topics.items()))
        print(f"  mlflow_uri       {info['mlflow_uri']}")
        print(f"  written to       {services.info_path}")
        return 0
    if args.action == "down":
        try:
            services.stop()
        except ServiceError as error:
            print(f"ckl services down failed: {error}")
            return 1
        print("services down")
        return 0
    statuses = services.status()
    if args.json:
        print(json.dumps([asdict(status) for status in statuses], indent=2))
    else:
        print(format_status(statuses))
    return 0 if all(status.state == "up" for status in statuses) else 1


def format_status(statuses: list[ServiceStatus]) -> str:
    """A small table: service, state, pid, address, memory, log."""
    rows = [("SERVICE", "STATE", "PID", "ADDRESS", "RSS", "LOG")]
    for status in statuses:
        rows.append((
            status.name, status.state, str(status.pid or "-"), status.address or "-",
            f"{status.rss_mb:.0f} MB" if status.rss_mb is not None else "-", status.log,
        ))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
        for row in rows
    )
