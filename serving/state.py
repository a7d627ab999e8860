"""The server's live state: model + memory, the applied-doc ledger, last Kafka offsets, memory version.

Concurrency contract:
- Writes (inject batches, snapshots) are serialised by one writer lock.
- A batch's new memory is computed off to the side, context by context, from the published pool through
  the model's functional path; the live pool is untouched until the whole batch is done. Then the new
  pool and the new view (version, counts, offsets) are published together, and the ledger updated,
  in one step: a reader sees the state before the batch or after it, never in between.
- The model runs one forward pass at a time (`serving.turns.ModelTurns`): a query holds it for its
  generation, a batch for one context at a time, taking turns, so queries keep being answered between a
  batch's contexts and a batch still makes progress under a stream of queries. (One at a time also keeps
  an inference engine's shared workspaces and the model's adapter switch safe.)

`memory_version` is the server's count of published memory updates (one per batch that applied a
document); it is stored in snapshots, so a restored server reports the version it had. A snapshot
request when nothing changed since the last snapshot (written or restored) returns that snapshot, so a
caller can ask for one after every batch, duplicates-only batches included, at no cost.
"""

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from model import MemoryStateError
from model.prompts import extract_answer, format_question
from pipelines.faults import crash_point
from serving.runner import ModelRunner
from serving.schemas import InjectDocument
from serving.snapshots import SnapshotInfo, list_snapshots, prune, valid_snapshots, write_snapshot
from serving.turns import ModelTurns

log = logging.getLogger(__name__)


class NoValidSnapshot(RuntimeError):
    """Snapshots exist but none can be restored: starting empty would silently lose their documents."""


@dataclass(frozen=True)
class StateView:
    """What readers see of the state; replaced as a whole, never changed in place."""

    memory_version: int
    injections: int
    documents_applied: int
    last_offsets: dict[str, dict[int, int]]


@dataclass(frozen=True)
class BatchResult:
    applied: list[str]
    skipped: list[str]
    injections: int
    memory_version: int
    injection_ms: float


class LiveState:
    """The live model and memory with the bookkeeping that makes updates idempotent and durable."""

    def __init__(self, runner: ModelRunner, snapshot_root: Path, context_tokens: int | None = None):
        limit = runner.max_context_tokens
        if context_tokens is not None and not 0 < context_tokens <= limit:
            raise ValueError(
                f"context_tokens must be between 1 and the model's window ({limit}), got {context_tokens}"
            )
        self.runner = runner
        self.snapshot_root = snapshot_root
        self.context_tokens = context_tokens or limit
        self._write_lock = threading.Lock()
        self._model_turns = ModelTurns()
        self._ledger: set[str] = set()
        self._view = StateView(0, runner.num_injections, 0, {})
        self._last_snapshot: SnapshotInfo | None = None  # holds the current state unless a batch changed it

    def view(self) -> StateView:
        """The current state as readers see it."""
        return self._view

    def answer(self, question: str, max_new_tokens: int) -> tuple[str, int]:
        """An answer from the current memory, with the memory version that produced it."""
        prompt = format_question(question)
        with self._model_turns.query():
            memory_version = self._view.memory_version
            generated = self.runner.generate(prompt, max_new_tokens)
        return extract_answer(generated), memory_version

    def contexts(self, text: str) -> list[list[int]]:
        """A text's tokens in consecutive contexts of at most `context_tokens` tokens."""
        ids = self.runner.encode(text)
        return [ids[start : start + self.context_tokens] for start in range(0, len(ids), self.context_tokens)]

    def apply(self, documents: Sequence[InjectDocument]) -> BatchResult:
        """Inject the documents not applied yet, in order; publish the new memory and ledger as one step."""
        with self._write_lock:
            applied: list[str] = []
            skipped: list[str] = []
            contexts: list[list[int]] = []
            for document in documents:
                if document.doc_id in self._ledger or document.doc_id in applied:
                    skipped.append(document.doc_id)
                    continue
                applied.append(document.doc_id)
                contexts += self.contexts(document.text)

            started = time.perf_counter()
            pool = None
            for context in contexts:
                with self._model_turns.update():
                    pool = self.runner.next_pool(pool, context)
                crash_point("mid_inject")  # exactly-once tests: the server dies with a batch half-computed
            injection_ms = (time.perf_counter() - started) * 1000

            view = self._view
            offsets = _advanced(view.last_offsets, documents)
            if applied or offsets != view.last_offsets:
                self._last_snapshot = None
            with self._model_turns.update():
                if pool is not None:
                    self.runner.publish(pool, view.injections + len(contexts))
                self._ledger.update(applied)
                self._view = StateView(
                    memory_version=view.memory_version + (1 if pool is not None else 0),
                    injections=view.injections + len(contexts),
                    documents_applied=len(self._ledger),
                    last_offsets=offsets,
                )
            log.info(
                "batch: %d applied (%d contexts, %.0f ms), %d skipped; memory version %d",
                len(applied), len(contexts), injection_ms, len(skipped), self._view.memory_version,
            )
            return BatchResult(applied, skipped, len(contexts), self._view.memory_version, injection_ms)

    def snapshot(self) -> SnapshotInfo:
        """A snapshot of the current state: the last one if it still holds it, else a new one.

        No batch can be half-way while it is written.
        """
        with self._write_lock:
            if self._last_snapshot is not None and self._last_snapshot.path.is_dir():
                return self._last_snapshot
            view = self._view
            self._last_snapshot = write_snapshot(
                self.snapshot_root,
                memory_version=view.memory_version,
                injections=view.injections,
                write_memory=self.runner.save_memory,
                applied_doc_ids=self._ledger,
                last_offsets=view.last_offsets,
            )
            return self._last_snapshot

    def prune_snapshots(self, keep_last: int) -> list[Path]:
        """Delete all but the newest `keep_last` valid snapshots; never while a snapshot is being written."""
        with self._write_lock:
            removed = prune(self.snapshot_root, keep_last)
            if self._last_snapshot is not None and not self._last_snapshot.path.is_dir():
                self._last_snapshot = None
            return removed

    def restore(self) -> SnapshotInfo | None:
        """Load the newest snapshot that verifies, refusing corrupt ones; None if there are no snapshots.

        Raises NoValidSnapshot when snapshots exist but none verifies.
        """
        with self._write_lock:
            for contents in valid_snapshots(self.snapshot_root):
                try:
                    state = self.runner.load_memory(contents.memory_path)
                except MemoryStateError as error:
                    log.error("refusing snapshot %s: %s; falling back to the previous one",
                              contents.info.path, error)
                    continue
                if state.num_injections != contents.injections:
                    log.error(
                        "refusing snapshot %s: its memory holds %d injections, its manifest says %d; "
                        "falling back to the previous one",
                        contents.info.path, state.num_injections, contents.injections,
                    )
                    continue
                self._ledger = set(contents.applied_doc_ids)
                self._view = StateView(
                    memory_version=contents.info.memory_version,
                    injections=contents.injections,
                    documents_applied=len(self._ledger),
                    last_offsets=contents.last_offsets,
                )
                log.info(
                    "restored snapshot %s: memory version %d, %d documents",
                    contents.info.path, contents.info.memory_version, len(self._ledger),
                )
                self._last_snapshot = contents.info
                return contents.info
            existing = list_snapshots(self.snapshot_root)
            if existing:
                raise NoValidSnapshot(
                    f"none of the {len(existing)} snapshots in {self.snapshot_root} can be restored (see the "
                    "errors above); move them away to start with an empty memory"
                )
            return None


def _advanced(
    offsets: dict[str, dict[int, int]], documents: Sequence[InjectDocument]
) -> dict[str, dict[int, int]]:
    """A copy of `offsets` moved forward to the documents' offsets (a redelivery never moves one back)."""
    advanced = {topic: dict(partitions) for topic, partitions in offsets.items()}
    for document in documents:
        partitions = advanced.setdefault(document.topic, {})
        partitions[document.partition] = max(partitions.get(document.partition, -1), document.offset)
    return advanced
