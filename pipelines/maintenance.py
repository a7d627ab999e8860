"""Maintenance of the model server's state, used by the `ckl_maintenance` DAG: snapshot pruning.

Snapshots live on the server's disk, so pruning goes through its API (under its write lock, never racing
a snapshot being written).
"""

from pipelines.ingest import resolve_server
from serving.client import ModelServerClient

DEFAULT_KEEP_LAST = 10


def prune_snapshots(
    keep_last: int = DEFAULT_KEEP_LAST, server_url: str | None = None
) -> dict[str, list[str]]:
    """Ask the server to keep only its newest `keep_last` valid snapshots; returns {removed, kept}."""
    url, token = resolve_server(server_url)
    with ModelServerClient(url, token=token) as client:
        return client.prune_snapshots(keep_last).model_dump()
