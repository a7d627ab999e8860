"""`ckl snapshots list`: the model server's pool checkpoints, the points a rollback can go back to."""

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("list",), help="list: the checkpoints on disk, newest first")
    parser.add_argument("--server", metavar="URL", help="model server URL (default: from .ckl/server.json)")


def run(args: argparse.Namespace) -> int:
    from pipelines.settings import resolve_server
    from serving.client import ModelServerClient

    url, token = resolve_server(args.server)
    with ModelServerClient(url, token=token) as client:
        memory, snapshots = client.memory(), client.snapshots()
    print(f"live memory: version {memory.memory_version}, lineage {memory.lineage}"
          + (f" (rolled back from {memory.lineage_parent} to version {memory.lineage_from_version})"
             if memory.lineage_parent else ""))
    print(f"{'snapshot id':<36} {'version':>8}  created (UTC)")
    for snapshot in snapshots:
        print(f"{snapshot.id:<36} {snapshot.memory_version:>8}  {snapshot.created_at:%Y-%m-%d %H:%M:%S}")
    if not snapshots:
        print("(none yet: the server writes one every --checkpoint-every batches, or on POST /v1/snapshots)")
    print("any memory version can be rolled back to: `ckl rollback VERSION --replay|--skip`")
    return 0
