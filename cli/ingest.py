"""`ckl ingest`: consume documents from Kafka into the model server's memory, batch by batch."""

import argparse

from cli.argtypes import non_negative_int, open_fraction, positive_float, positive_int
from pipelines import settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--until-drained", action="store_true",
                        help="keep going until a poll brings nothing (default: one batch)")
    parser.add_argument("--server", metavar="URL", help="model server URL (default: from .ckl/server.json)")
    parser.add_argument("--bootstrap", metavar="HOST:PORT", help="Kafka (default: from .ckl/services.json)")
    parser.add_argument("--mlflow-uri", metavar="URI", help="MLflow URI (default: from .ckl/services.json)")
    parser.add_argument("--topic", default=settings.DOCS_TOPIC,
                        help="topic to consume (default: %(default)s)")
    parser.add_argument("--group", default=settings.DEFAULT_GROUP,
                        help="consumer group (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=settings.DEFAULT_BATCH_SIZE,
                        help="messages per batch (default: %(default)s)")
    parser.add_argument("--poll-timeout", type=positive_float, default=settings.DEFAULT_POLL_TIMEOUT_S,
                        help="seconds a poll waits for the first message; an empty poll ends --until-drained "
                             "(default: %(default)s)")
    parser.add_argument("--probe-questions", type=non_negative_int, default=settings.DEFAULT_PROBE_QUESTIONS,
                        help="retention probe questions after each batch, 0 for none (default: %(default)s)")
    parser.add_argument("--probe-share", type=open_fraction, default=settings.DEFAULT_PROBE_SHARE,
                        help="probing's time budget as a share of batch time, above 0 and below 1 "
                             "(default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from pipelines.ingest import batches_until_drained, run_one_batch
    from pipelines.settings import IngestSettings

    settings = IngestSettings.resolve(
        bootstrap=args.bootstrap, server_url=args.server, mlflow_uri=args.mlflow_uri, topic=args.topic,
        group=args.group, batch_size=args.batch_size, poll_timeout_s=args.poll_timeout,
        probe_questions=args.probe_questions, probe_share=args.probe_share,
    )
    reports = batches_until_drained(settings) if args.until_drained else iter([run_one_batch(settings)])
    totals = {"consumed": 0, "applied": 0, "duplicates": 0, "dead_lettered": 0, "injections": 0}
    with tqdm(desc="ingest", unit="msg") as progress:
        for report in reports:
            for key in totals:
                totals[key] += getattr(report, key)
            progress.update(report.consumed)
            progress.set_postfix(applied=totals["applied"], dup=totals["duplicates"],
                                 dlq=totals["dead_lettered"], version=report.memory_version)
    print(f"messages consumed: {totals['consumed']}\n"
          f"documents applied: {totals['applied']} ({totals['injections']} contexts injected)\n"
          f"skipped as duplicates: {totals['duplicates']}\n"
          f"sent to the dead-letter topic: {totals['dead_lettered']}")
    return 0
