"""The memory's lineage: which line of history the live memory belongs to, kept in `<state>/lineage.json`.

A lineage starts when a server first starts on an empty state, and again at every rollback: the
memory's history forks at the version rolled back to. MLflow groups a lineage's batches under one parent
run (monitoring.tracking). A lineage started by a rollback names its parent, the version it forked at,
and the doc_ids the rollback excluded; exclusions carry over to later lineages, so an excluded document
is refused (and dead-lettered by ingestion) whenever it comes back. It also keeps where a replay of the
documents it removed starts in Kafka ("topic/partition" -> offset), so a replay cut short can be run again.
"""

import json
import os
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path


@dataclass(frozen=True)
class Lineage:
    id: str
    started_at: str
    parent: str | None = None
    from_version: int | None = None
    excluded: frozenset[str] = field(default_factory=frozenset)
    replay_from: dict[str, int] = field(default_factory=dict)

    @classmethod
    def new(cls, parent: "Lineage | None" = None, from_version: int | None = None,
            exclude: frozenset[str] = frozenset(), replay_from: dict[str, int] | None = None) -> "Lineage":
        """A fresh lineage; forked from `parent` at `from_version` when given, keeping its exclusions."""
        excluded = (parent.excluded if parent else frozenset()) | exclude
        return cls(uuid.uuid4().hex[:12], datetime.now(UTC).isoformat(timespec="seconds"),
                   parent.id if parent else None, from_version, excluded, dict(replay_from or {}))


def load_lineage(path: Path) -> Lineage:
    """The lineage in `path`; a new one (written there) when the file does not exist yet."""
    if not path.is_file():
        lineage = Lineage.new()
        save_lineage(path, lineage)
        return lineage
    data = json.loads(path.read_text())
    return Lineage(data["id"], data["started_at"], data.get("parent"), data.get("from_version"),
                   frozenset(data.get("excluded", ())), data.get("replay_from", {}))


def save_lineage(path: Path, lineage: Lineage) -> None:
    """Write the lineage atomically (temporary file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    with open(temp, "w") as file:
        json.dump(asdict(lineage) | {"excluded": sorted(lineage.excluded)}, file, indent=1)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temp, path)
