"""Maintenance of the model server's state, used by the `ckl_maintenance` DAG: snapshot pruning, then
compaction of the memory bank.

Snapshots and the bank live with the server, so both go through its API (under its write lock, never
racing a batch or a snapshot being written). Pruning first lets compaction drop the exact tokens of every
entry the oldest kept checkpoint covers.
"""

from pipelines.settings import DEFAULT_KEEP_LAST, resolve_server
from serving.client import ModelServerClient


def prune_snapshots(
    keep_last: int = DEFAULT_KEEP_LAST, server_url: str | None = None
) -> dict[str, list[str]]:
    """Ask the server to keep only its newest `keep_last` valid snapshots; returns {removed, kept}."""
    url, token = resolve_server(server_url)
    with ModelServerClient(url, token=token) as client:
        return client.prune_snapshots(keep_last).model_dump()


def compact_bank(server_url: str | None = None) -> dict:
    """Ask the server to compact its memory bank; returns what compaction did."""
    url, token = resolve_server(server_url)
    with ModelServerClient(url, token=token) as client:
        return client.compact_bank().model_dump()
