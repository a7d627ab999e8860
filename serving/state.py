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

Durability: the memory bank (compression/) is the memory's write-ahead log. A batch's entries (each
context's new tokens and dropped indices, with its text and Kafka position) are appended as one commit
before the batch is published; once `apply` returns, the batch is durable and its offsets may be
committed. Full pool checkpoints (snapshots) are written every `checkpoint_every_batches` batches or
`checkpoint_every_s` seconds, and on request. A restarted server restores the newest valid checkpoint
and replays the bank's entries after it, bit for bit. The applied-doc ledger is the bank's doc_ids.

`memory_version` is the server's count of published memory updates (one per batch that applied a
document); entries carry it, so a restored server reports the version it had. A snapshot request when
nothing changed since the last snapshot (written or restored) returns that snapshot.
"""

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from compression.bank import BankLayout, MemoryBank, NewEntry
from compression.replay import replay
from compression.retrieval import RetrievalSettings, Retrieved, Retriever
from compression.slots import SlotFormat
from model import MemoryStateError
from model.prompts import extract_answer, format_question
from pipelines.faults import crash_point
from serving.runner import ModelRunner
from serving.schemas import InjectDocument
from serving.settings import CheckpointPolicy
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
    checkpoint: SnapshotInfo | None = None


class LiveState:
    """The live model and memory with the bookkeeping that makes updates idempotent and durable."""

    def __init__(self, runner: ModelRunner, snapshot_root: Path, bank: MemoryBank,
                 retriever: Retriever | None = None, context_tokens: int | None = None,
                 checkpoints: CheckpointPolicy | None = None):
        limit = runner.max_context_tokens
        if context_tokens is not None and not 0 < context_tokens <= limit:
            raise ValueError(
                f"context_tokens must be between 1 and the model's window ({limit}), got {context_tokens}"
            )
        self.runner = runner
        self.snapshot_root = snapshot_root
        self.bank = bank
        self.retriever = retriever
        self.context_tokens = context_tokens or limit
        self.checkpoints = checkpoints or CheckpointPolicy()
        self._write_lock = threading.Lock()
        self._model_turns = ModelTurns()
        self._view = StateView(0, runner.num_injections, 0, {})
        self._last_snapshot: SnapshotInfo | None = None  # holds the current state unless a batch changed it
        self._batches_since_checkpoint = 0
        self._last_checkpoint_at = time.monotonic()

    def view(self) -> StateView:
        """The current state as readers see it."""
        return self._view

    def answer(self, question: str, max_new_tokens: int, retrieve: bool | None = None
               ) -> tuple[str, int, list[str]]:
        """An answer from the current memory, with the memory version that produced it and the doc_ids of
        the bank entries retrieved for it (`retrieve` None: the server's setting)."""
        prompt = format_question(question)
        use_bank = self.retriever is not None and (
            self.retriever.settings.enabled if retrieve is None else retrieve
        )
        with self._model_turns.query():
            memory_version = self._view.memory_version
            retrieved = self.retriever.retrieve(question) if use_bank else Retrieved([], [], None)
            generated = self.runner.generate(prompt, max_new_tokens, retrieved=retrieved.tokens)
        return extract_answer(generated), memory_version, list(dict.fromkeys(retrieved.doc_ids))

    def contexts(self, text: str) -> list[list[int]]:
        """A text's tokens in consecutive contexts of at most `context_tokens` tokens."""
        ids = self.runner.encode(text)
        return [ids[start : start + self.context_tokens] for start in range(0, len(ids), self.context_tokens)]

    def apply(self, documents: Sequence[InjectDocument]) -> BatchResult:
        """Inject the documents not applied yet, in order; append their bank entries (the batch is durable
        then), and publish the new memory; write a checkpoint when one is due."""
        with self._write_lock:
            applied: list[str] = []
            skipped: list[str] = []
            contexts: list[tuple[InjectDocument, int, list[int], str]] = []
            for document in documents:
                if self.bank.holds(document.doc_id) or document.doc_id in applied:
                    skipped.append(document.doc_id)
                    continue
                applied.append(document.doc_id)
                chunks = self.contexts(document.text)
                contexts += [
                    (document, chunk, ids, document.text if len(chunks) == 1 else self.runner.decode(ids))
                    for chunk, ids in enumerate(chunks)
                ]

            started = time.perf_counter()
            pool = None
            entries: list[NewEntry] = []
            for document, chunk, ids, text in contexts:
                with self._model_turns.update():
                    pool, tokens, dropped = self.runner.next_pool(pool, ids)
                entries.append(_entry(document, chunk, text, tokens, dropped))
                crash_point("mid_inject")  # exactly-once tests: the server dies with a batch half-computed
            injection_ms = (time.perf_counter() - started) * 1000

            view = self._view
            version = view.memory_version + (1 if pool is not None else 0)
            seqs = self.bank.append(entries, version, before_commit=lambda: crash_point("mid_append"))
            crash_point("after_append")  # durable, not yet published: a restart replays it from the bank
            offsets = _advanced(view.last_offsets, documents)
            if applied or offsets != view.last_offsets:
                self._last_snapshot = None
            with self._model_turns.update():
                if pool is not None:
                    self.runner.publish(pool, view.injections + len(contexts))
                if self.retriever is not None:
                    self.retriever.add(seqs, [entry.text for entry in entries])
                self._view = StateView(
                    memory_version=version,
                    injections=view.injections + len(contexts),
                    documents_applied=self.bank.documents,
                    last_offsets=offsets,
                )
            log.info(
                "batch: %d applied (%d contexts, %.0f ms), %d skipped; memory version %d",
                len(applied), len(contexts), injection_ms, len(skipped), self._view.memory_version,
            )
            checkpoint = self._checkpoint_if_due() if applied else None
            return BatchResult(applied, skipped, len(contexts), version, injection_ms, checkpoint)

    def _checkpoint_if_due(self) -> SnapshotInfo | None:
        self._batches_since_checkpoint += 1
        due = (self._batches_since_checkpoint >= self.checkpoints.every_batches
               or time.monotonic() - self._last_checkpoint_at >= self.checkpoints.every_s)
        return self._write_checkpoint() if due else None

    def _write_checkpoint(self) -> SnapshotInfo:
        """A snapshot of the current state (the write lock is held), unless the last one still holds it."""
        if self._last_snapshot is None or not self._last_snapshot.path.is_dir():
            view = self._view
            self._last_snapshot = write_snapshot(
                self.snapshot_root,
                memory_version=view.memory_version,
                injections=view.injections,
                write_memory=self.runner.save_memory,
                applied_doc_ids=self.bank.doc_ids,
                last_offsets=view.last_offsets,
            )
        self._batches_since_checkpoint = 0
        self._last_checkpoint_at = time.monotonic()
        return self._last_snapshot

    def snapshot(self) -> SnapshotInfo:
        """A checkpoint of the current state now: the last one if it still holds it, else a new one.

        No batch can be half-way while it is written.
        """
        with self._write_lock:
            return self._write_checkpoint()

    def prune_snapshots(self, keep_last: int) -> list[Path]:
        """Delete all but the newest `keep_last` valid snapshots; never while a snapshot is being written."""
        with self._write_lock:
            removed = prune(self.snapshot_root, keep_last)
            if self._last_snapshot is not None and not self._last_snapshot.path.is_dir():
                self._last_snapshot = None
            return removed

    def compact_bank(self) -> dict:
        """Compact the bank: the exact tokens of entries every kept checkpoint covers are dropped (their
        retrieval slots stay), small files merged, old versions and orphaned files removed."""
        with self._write_lock:
            covered = min((contents.injections for contents in valid_snapshots(self.snapshot_root)),
                          default=None)
            result = self.bank.compact(covered)
            log.info("bank compacted (entries below seq %s covered by checkpoints): %s", covered, result)
            return result | {"covered_seq": covered}

    def restore(self) -> SnapshotInfo | None:
        """Load the newest checkpoint that verifies and fits the bank, then replay the bank's entries after
        it; with no checkpoint, replay the whole bank onto the model's own pool. Returns the checkpoint used.

        Raises NoValidSnapshot when checkpoints exist but none can be restored.
        """
        with self._write_lock:
            for contents in valid_snapshots(self.snapshot_root):
                if contents.injections > self.bank.next_seq:
                    log.error(
                        "refusing snapshot %s: it holds %d injections, the bank only %d entries (a bank "
                        "truncated by a rollback, or another bank); falling back to the previous one",
                        contents.info.path, contents.injections, self.bank.next_seq,
                    )
                    continue
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
                self._replay(contents.injections, contents.info.memory_version, contents.last_offsets)
                log.info(
                    "restored snapshot %s: memory version %d, %d documents",
                    contents.info.path, self._view.memory_version, self._view.documents_applied,
                )
                self._last_snapshot = contents.info if self._view.injections == contents.injections else None
                return contents.info
            existing = list_snapshots(self.snapshot_root)
            if existing:
                raise NoValidSnapshot(
                    f"none of the {len(existing)} snapshots in {self.snapshot_root} can be restored (see the "
                    "errors above); move them away to start with an empty memory"
                )
            if len(self.bank):
                self.runner.model.set_memory_state(self.runner.base_state)
                self._replay(0, 0, {})
                log.info("no snapshot: replayed the whole bank (%d entries) onto the checkpoint's memory",
                         len(self.bank))
            return None

    def _replay(self, first_seq: int, base_version: int, base_offsets: dict[str, dict[int, int]]) -> None:
        """Replay the bank's entries from `first_seq` onto the live pool and publish the result."""
        pool, initialized = self.runner.live_pool()
        started = time.perf_counter()
        result = replay(pool, initialized, self.bank.records(first_seq), first_seq)
        if result.entries:
            self.runner.publish(result.pool, first_seq + result.entries)
            log.info("replayed %d bank entries (seq %d-%d) in %.0f ms", result.entries, first_seq,
                     first_seq + result.entries - 1, (time.perf_counter() - started) * 1000)
        offsets = {topic: dict(parts) for topic, parts in base_offsets.items()}
        for topic, parts in result.last_offsets.items():
            for partition, offset in parts.items():
                offsets.setdefault(topic, {})
                offsets[topic][partition] = max(offsets[topic].get(partition, -1), offset)
        self._view = StateView(
            memory_version=max(base_version, result.last_version or 0),
            injections=first_seq + result.entries,
            documents_applied=self.bank.documents,
            last_offsets=offsets,
        )


def open_bank(runner: ModelRunner, uri: str, slot_format: SlotFormat,
              retrieval: RetrievalSettings) -> tuple[MemoryBank, Retriever]:
    """The memory bank for the hosted model at `uri` (created when absent) and its retriever."""
    layers, tokens, hidden, pool_dtype, per_layer = runner.memory_shape
    bank = MemoryBank(uri, BankLayout(layers, tokens, hidden, pool_dtype, per_layer, slot_format))
    return bank, Retriever(bank, retrieval)


def _entry(document: InjectDocument, chunk: int, text: str, tokens: torch.Tensor,
           dropped: torch.Tensor | None) -> NewEntry:
    """The bank entry of one injected context."""
    return NewEntry(
        doc_id=document.doc_id,
        chunk=chunk,
        text=text,
        tokens=tokens,
        dropped=dropped,
        source=document.source,
        published_at=document.published_at,
        topic=document.topic,
        partition=document.partition,
        offset=document.offset,
        probes=[probe.model_dump() for probe in document.probes] if document.probes else None,
    )


def _advanced(
    offsets: dict[str, dict[int, int]], documents: Sequence[InjectDocument]
) -> dict[str, dict[int, int]]:
    """A copy of `offsets` moved forward to the documents' offsets (a redelivery never moves one back)."""
    advanced = {topic: dict(partitions) for topic, partitions in offsets.items()}
    for document in documents:
        partitions = advanced.setdefault(document.topic, {})
        partitions[document.partition] = max(partitions.get(document.partition, -1), document.offset)
    return advanced
