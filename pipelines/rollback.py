"""Rollback of the live memory to an earlier version, used by `ckl rollback` and the `ckl_rollback` DAG.

1. The server takes its memory back to the version, byte for byte (`POST /v1/rollback`: the bank is
   truncated, the pool rebuilt from a checkpoint plus a replay of the bank) and starts a new lineage.
2. `replay`: the consumer group's offsets go back to the first removed document of each partition, and
   ingestion runs until the topic is drained: the removed documents are applied again, except the excluded
   ones, which the server refuses and ingestion dead-letters with reason "excluded by rollback".
   `skip`: the group stays where it is; the removed documents stay out of the memory.
3. MLflow records the rollback (who, from, to, mode, excluded, result), ends the old lineage's run and
   opens the new one's.

Serialised with ingestion: the server runs the rollback under its write lock (never inside a batch), and
Kafka moves a group's offsets only while no consumer of the group runs (step 2 waits for that, then gives
up with a clear error). A batch in flight during the rollback is harmless: what it applied before the
rollback is removed and replayed, what it applied after belongs to the new lineage.
"""

import dataclasses
import logging
from dataclasses import asdict, dataclass, field

from kafka import TopicPartition

from monitoring.tracking import tracker_for
from pipelines.ingest import batches_until_drained, open_client
from pipelines.kafka_io import move_group_offsets
from pipelines.settings import IngestSettings
from serving.client import ModelServerClient

log = logging.getLogger(__name__)

MODES = ("replay", "skip")


@dataclass
class RollbackOutcome:
    """What a rollback did, for the terminal, the DAG's XCom and MLflow."""

    from_version: int
    to_version: int
    mode: str
    excluded: list[str]
    removed: list[str]  # doc_ids taken out of the memory
    pool_sha256: str
    recorded_sha256: str | None  # the pool's checksum MLflow recorded for that version (None: unknown)
    from_lineage: str
    to_lineage: str
    checkpoint: str | None
    replayed: int = 0  # documents applied again (replay)
    dead_lettered: int = 0  # excluded documents sent to the DLQ during the replay
    # "topic/partition" -> the offset the replay starts at
    replay_from: dict[str, int] = field(default_factory=dict)

    @property
    def identical(self) -> bool | None:
        """Whether the restored pool has the checksum recorded for that version (None: nothing recorded)."""
        return None if self.recorded_sha256 is None else self.recorded_sha256 == self.pool_sha256


def resolve_target(client: ModelServerClient, target: str) -> int:
    """A memory version from a version number or a snapshot id."""
    if target.isdigit():
        return int(target)
    for snapshot in client.snapshots():
        if snapshot.id == target:
            return snapshot.memory_version
    raise ValueError(f"{target!r} is neither a memory version nor a snapshot id (see `ckl snapshots list`)")


def rollback(settings: IngestSettings, target: str, mode: str = "replay",
             exclude: list[str] | tuple[str, ...] = ()) -> RollbackOutcome:
    """Roll the server's memory back to `target` (a version or snapshot id) and replay or skip what it
    removed; see the module docstring."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if exclude and mode != "replay":
        raise ValueError("--exclude only applies to --replay (with --skip nothing is re-ingested)")
    with open_client(settings) as client:
        version = resolve_target(client, target)
        result = client.rollback(version, exclude)
    outcome = RollbackOutcome(
        from_version=result.from_version, to_version=result.to_version, mode=mode, excluded=list(exclude),
        removed=list(dict.fromkeys(entry.doc_id for entry in result.removed)), pool_sha256=result.pool_sha256,
        recorded_sha256=None, from_lineage=result.previous_lineage, to_lineage=result.lineage,
        checkpoint=result.checkpoint,
    )
    tracker = tracker_for(settings.mlflow_uri) if settings.mlflow_uri else None
    if tracker is not None:
        outcome.recorded_sha256 = tracker.recorded_pool_sha256(result.previous_lineage, version)
    if tracker is not None and outcome.from_lineage != outcome.to_lineage:
        _switch_lineage(tracker, outcome)  # before the replay, whose batches log to the new lineage
    if mode == "replay" and result.replay_from:
        outcome.replay_from = dict(result.replay_from)
        starts = {_topic_partition(key): offset for key, offset in result.replay_from.items()}
        move_group_offsets(settings.bootstrap, settings.group, starts)
        for topic in sorted({tp.topic for tp in starts}):
            for report in batches_until_drained(dataclasses.replace(settings, topic=topic)):
                outcome.replayed += report.applied
                outcome.dead_lettered += report.excluded
    if tracker is not None and outcome.from_lineage != outcome.to_lineage:
        tracker.log_rollback(asdict(outcome) | {"identical": outcome.identical,
                                                "excluded": ",".join(outcome.excluded),
                                                "removed_documents": len(outcome.removed)})
    return outcome


def rollback_task(target: str, mode: str, exclude: list[str]) -> dict:
    """The `ckl_rollback` DAG's task: a rollback with the resolved settings, failing when the restored pool
    differs from the one recorded for that version; returns the outcome as a dict (XCom)."""
    outcome = rollback(IngestSettings.resolve(), target, mode, exclude)
    if outcome.identical is False:
        raise RuntimeError(f"restored pool {outcome.pool_sha256} differs from the one recorded at version "
                           f"{outcome.to_version} ({outcome.recorded_sha256})")
    return asdict(outcome)


def _topic_partition(key: str) -> TopicPartition:
    """The partition named "topic/partition" (Kafka topic names cannot contain a slash)."""
    topic, partition = key.rsplit("/", 1)
    return TopicPartition(topic, int(partition))


def _switch_lineage(tracker, outcome: RollbackOutcome) -> None:
    """End the old lineage's run; open the new lineage's with the old one's params and its parent."""
    old_run = tracker.lineage_run(outcome.from_lineage)
    tracker.end_lineage(old_run, f"rollback to version {outcome.to_version}")
    tracker.lineage_run(outcome.to_lineage, params=lambda: tracker.params(old_run),
                        parent_lineage=outcome.from_lineage, from_version=outcome.to_version)
