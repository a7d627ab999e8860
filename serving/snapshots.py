"""Durable snapshots of the server's state: memory state + applied-doc ledger + Kafka offsets + checksums.

A snapshot is one directory `<root>/<version, 12 digits>-<UTC timestamp>/` holding

    memory.safetensors   the model's memory state (pool, version, injections), written by the model
    ledger.json          the sorted doc_ids applied to that memory
    offsets.json         the last Kafka offset applied per topic and partition
    manifest.json        format, memory version, counts, and the sha256 of every other file

It is written into a hidden temporary directory, every file and the directory are fsynced, and only then
is it renamed into place (and the root fsynced): a crash leaves either a whole snapshot or a temporary
directory that `prune` removes, never a half-written snapshot under a snapshot name. Names sort by
version then time, so the newest snapshot is the last name.

`CheckpointPolicy` says when the server writes one (it lives here, free of torch, for `ckl serve --help`).
"""

import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger(__name__)

FORMAT = 1
MEMORY_FILE = "memory.safetensors"
LEDGER_FILE = "ledger.json"
OFFSETS_FILE = "offsets.json"
MANIFEST_FILE = "manifest.json"
TEMP_PREFIX = ".tmp-"
STALE_TEMP_SECONDS = 3600
_NAME = re.compile(r"^(\d{12})-(\d{8}T\d{6}\.\d{6}Z)$")
_TIME_FORMAT = "%Y%m%dT%H%M%S.%fZ"

Offsets = Mapping[str, Mapping[int, int]]


class CorruptSnapshot(Exception):
    """A snapshot that must not be restored: missing files, a checksum mismatch or an unreadable manifest."""


@dataclass(frozen=True)
class SnapshotInfo:
    """Where a snapshot is and what it holds, read from its directory name."""

    id: str
    path: Path
    memory_version: int
    created_at: datetime


@dataclass(frozen=True)
class CheckpointPolicy:
    """When a full pool checkpoint is written after a batch: every n batches or t seconds, whichever first.
    Between checkpoints the memory bank alone makes batches durable (replayed on restart)."""

    every_batches: int = 50
    every_s: float = 600.0

    def __post_init__(self):
        if self.every_batches < 1 or not 0 < self.every_s < math.inf:
            raise ValueError(f"checkpoint every >= 1 batches and a finite number of seconds > 0: "
                             f"{self.every_batches}, {self.every_s}")


@dataclass(frozen=True)
class SnapshotContents:
    """A verified snapshot, ready to restore."""

    info: SnapshotInfo
    memory_path: Path
    injections: int
    applied_doc_ids: frozenset[str]
    last_offsets: dict[str, dict[int, int]]


def write_snapshot(
    root: Path,
    *,
    memory_version: int,
    injections: int,
    write_memory: Callable[[Path], None],
    applied_doc_ids: set[str] | frozenset[str],
    last_offsets: Offsets,
) -> SnapshotInfo:
    """Write one snapshot atomically; `write_memory(path)` saves the memory state to `path`."""
    root.mkdir(parents=True, exist_ok=True)
    created_at = datetime.now(UTC)
    name = f"{memory_version:012d}-{created_at.strftime(_TIME_FORMAT)}"
    temp = root / f"{TEMP_PREFIX}{name}-{os.getpid()}"
    temp.mkdir()
    try:
        write_memory(temp / MEMORY_FILE)
        _write_json(temp / LEDGER_FILE, sorted(applied_doc_ids))
        _write_json(temp / OFFSETS_FILE, _offsets_to_json(last_offsets))
        manifest = {
            "format": FORMAT,
            "memory_version": memory_version,
            "injections": injections,
            "documents": len(applied_doc_ids),
            "created_at": created_at.isoformat(),
            "files": {path.name: _sha256(path) for path in sorted(temp.iterdir())},
        }
        _write_json(temp / MANIFEST_FILE, manifest)
        for path in temp.iterdir():
            _fsync_path(path)
        _fsync_path(temp)
        final = root / name
        os.rename(temp, final)
        _fsync_path(root)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    log.info("snapshot %s written: memory version %d, %d docs", final, memory_version, len(applied_doc_ids))
    return SnapshotInfo(id=name, path=final, memory_version=memory_version, created_at=created_at)


def list_snapshots(root: Path) -> list[SnapshotInfo]:
    """Every snapshot directory under `root`, newest first (not verified: see `read_snapshot`)."""
    if not root.is_dir():
        return []
    infos = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_dir():
            created_at = datetime.strptime(match.group(2), _TIME_FORMAT).replace(tzinfo=UTC)
            infos.append(SnapshotInfo(path.name, path, int(match.group(1)), created_at))
    return sorted(infos, key=lambda info: info.id, reverse=True)


def read_snapshot(info: SnapshotInfo) -> SnapshotContents:
    """Verify a snapshot's manifest and checksums and read it; raises CorruptSnapshot saying what is wrong."""
    manifest = _read_json(info.path / MANIFEST_FILE)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptSnapshot(f"{MANIFEST_FILE}: not a format-{FORMAT} manifest")
    if manifest.get("memory_version") != info.memory_version:
        raise CorruptSnapshot(
            f"{MANIFEST_FILE}: memory version {manifest.get('memory_version')!r} does not match the "
            f"directory name ({info.memory_version})"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not {MEMORY_FILE, LEDGER_FILE, OFFSETS_FILE} <= set(files):
        raise CorruptSnapshot(f"{MANIFEST_FILE}: the file list is missing or incomplete")
    for name, expected in files.items():
        path = info.path / name
        if not path.is_file():
            raise CorruptSnapshot(f"{name}: missing")
        actual = _sha256(path)
        if actual != expected:
            raise CorruptSnapshot(f"{name}: sha256 {actual} does not match the manifest's {expected}")
    ledger = _read_json(info.path / LEDGER_FILE)
    offsets = _read_json(info.path / OFFSETS_FILE)
    try:
        return SnapshotContents(
            info=info,
            memory_path=info.path / MEMORY_FILE,
            injections=int(manifest["injections"]),
            applied_doc_ids=frozenset(str(doc_id) for doc_id in ledger),
            last_offsets={
                str(topic): {int(p): int(o) for p, o in parts.items()} for topic, parts in offsets.items()
            },
        )
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise CorruptSnapshot(f"malformed contents ({type(error).__name__}: {error})") from None


def valid_snapshots(root: Path) -> Iterator[SnapshotContents]:
    """Verified snapshots, newest first; each refused one is logged with the reason and skipped."""
    for info in list_snapshots(root):
        try:
            yield read_snapshot(info)
        except CorruptSnapshot as error:
            log.error("refusing corrupt snapshot %s: %s; falling back to the previous one", info.path, error)


def prune(root: Path, keep_last: int) -> list[Path]:
    """Delete snapshots older than the newest `keep_last` valid ones, and stale temporary directories.

    Corrupt snapshots newer than the oldest kept one stay for inspection; returns the removed paths.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be at least 1, got {keep_last}")
    removed = []
    kept_valid = 0
    for info in list_snapshots(root):
        if kept_valid >= keep_last:
            shutil.rmtree(info.path)
            removed.append(info.path)
            continue
        try:
            read_snapshot(info)
            kept_valid += 1
        except CorruptSnapshot as error:
            log.warning("keeping corrupt snapshot %s for inspection: %s", info.path, error)
    if root.is_dir():
        for path in root.glob(f"{TEMP_PREFIX}*"):
            if time.time() - path.stat().st_mtime > STALE_TEMP_SECONDS:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    if removed:
        _fsync_path(root)
        log.info("pruned %d snapshot paths under %s", len(removed), root)
    return removed


def _offsets_to_json(offsets: Offsets) -> dict[str, dict[str, int]]:
    return {
        topic: {str(partition): int(offset) for partition, offset in sorted(parts.items())}
        for topic, parts in sorted(offsets.items())
    }


def _write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, indent=1, ensure_ascii=False), encoding="utf-8")


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CorruptSnapshot(f"{path.name}: missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptSnapshot(f"{path.name}: unreadable ({error})") from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes its entries durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
