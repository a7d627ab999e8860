"""`ckl rollback`: take the live memory back to an earlier version and replay or skip what came after."""

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="VERSION_OR_SNAPSHOT",
                        help="memory version, or snapshot id (see `ckl snapshots list`), to go back to")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--replay", action="store_const", const="replay", dest="mode",
                      help="re-ingest the removed documents from Kafka (except --exclude)")
    mode.add_argument("--skip", action="store_const", const="skip", dest="mode",
                      help="leave the removed documents out; the consumer group stays past them")
    parser.add_argument("--exclude", default="", metavar="DOC_IDS",
                        help="comma-separated doc_ids never to apply again (dead-lettered as 'excluded by "
                             "rollback'); with --replay")
    parser.add_argument("--server", metavar="URL", help="model server URL (default: from .ckl/server.json)")
    parser.add_argument("--bootstrap", metavar="HOST:PORT", help="Kafka (default: from .ckl/services.json)")
    parser.add_argument("--mlflow-uri", metavar="URI", help="MLflow URI (default: from .ckl/services.json)")
    parser.add_argument("--group", default=None, help="consumer group (default: ckl-ingest)")


def run(args: argparse.Namespace) -> int:
    from pipelines.kafka_io import GroupBusy
    from pipelines.rollback import rollback
    from pipelines.settings import IngestSettings
    from serving.client import ServerError

    settings = IngestSettings.resolve(bootstrap=args.bootstrap, server_url=args.server,
                                      mlflow_uri=args.mlflow_uri, group=args.group)
    exclude = [doc_id.strip() for doc_id in args.exclude.split(",") if doc_id.strip()]
    try:
        outcome = rollback(settings, args.target, args.mode, exclude)
    except (ValueError, GroupBusy) as error:
        print(f"rollback refused: {error}")
        return 2
    except ServerError as error:
        print(f"rollback refused by the server: {error}")
        return 2
    print(f"memory version {outcome.from_version} -> {outcome.to_version} ({outcome.mode}); "
          f"lineage {outcome.from_lineage} -> {outcome.to_lineage}")
    print(f"  removed from the memory: {len(outcome.removed)} documents")
    kept = sorted(set(outcome.excluded) - set(outcome.removed))
    if kept:
        print(f"  note: {', '.join(kept)} applied at or before version {outcome.to_version}: they stay in "
              "the memory (roll back further to take them out); only later deliveries are refused")
    print(f"  pool sha256 restored: {outcome.pool_sha256}")
    if outcome.recorded_sha256 is not None:
        verdict = "byte-identical" if outcome.identical else "DIFFERENT"
        print(f"  pool sha256 recorded at version {outcome.to_version}: {outcome.recorded_sha256} "
              f"({verdict})")
    if outcome.replay_from:
        starts = ", ".join(f"{where}@{offset}" for where, offset in sorted(outcome.replay_from.items()))
        print(f"  replayed from {starts}: {outcome.replayed} documents applied again, "
              f"{outcome.dead_lettered} excluded and dead-lettered")
    print(f"  checkpoint: {outcome.checkpoint or '-'}")
    return 0 if outcome.identical is not False else 1
