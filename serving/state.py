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
import random
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compression.bank import BankLayout, MemoryBank, NewEntry
from compression.replay import replay
from compression.retrieval import Retrieved, Retriever
from compression.settings import RetrievalSettings, SlotFormat
from model import MemoryStateError
from model.contexts import split_contexts
from model.prompts import extract_answer, format_question
from monitoring.probes import HELDOUT_TEXT, ProbeBudget, ProbeCosts, ProbeReport, run_probes, sample_probes
from runtime.faults import crash_point
from serving.lineage import Lineage, load_lineage, save_lineage
from serving.runner import ModelRunner
from serving.schemas import InjectDocument
from serving.snapshots import (
    CheckpointPolicy,
    SnapshotInfo,
    list_snapshots,
    prune,
    valid_snapshots,
    write_snapshot,
)
from serving.turns import ModelTurns

log = logging.getLogger(__name__)
# a batch's bank entries are written in groups of this many, each while the next ones are computed
_ENTRIES_PER_WRITE = 8


class NoValidSnapshot(RuntimeError):
    """Snapshots exist but none can be restored: starting empty would silently lose their documents."""


class RollbackRefused(ValueError):
    """A rollback that cannot be done (a version from the future, or one the bank can no longer rebuild);
    nothing was changed."""


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
    excluded: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RemovedEntry:
    """A bank entry a rollback took out: what it was and where it came from in Kafka."""

    seq: int
    doc_id: str
    version: int
    topic: str | None
    partition: int | None
    offset: int | None


@dataclass(frozen=True)
class RollbackResult:
    from_version: int
    to_version: int
    removed: list[RemovedEntry]
    restored_from: str | None  # the checkpoint replayed from (None: the model's own pool)
    lineage: Lineage  # the new lineage (the current one on a dry run)
    previous_lineage: str
    checkpoint: SnapshotInfo | None  # written for the new lineage (None on a dry run)
    replay_from: dict[str, int] = field(default_factory=dict)  # "topic/partition" -> first removed offset


class LiveState:
    """The live model and memory with the bookkeeping that makes updates idempotent and durable."""

    def __init__(self, runner: ModelRunner, snapshot_root: Path, bank: MemoryBank,
                 retriever: Retriever | None = None, context_tokens: int | None = None,
                 checkpoints: CheckpointPolicy | None = None, lineage_path: Path | None = None):
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
        self.lineage_path = lineage_path or snapshot_root.parent / "lineage.json"
        self.lineage = load_lineage(self.lineage_path)
        self._write_lock = threading.Lock()
        self.model_turns = ModelTurns()  # whose turn the model is: queries and the writer take turns
        self._view = StateView(0, runner.num_injections, 0, {})
        self._last_snapshot: SnapshotInfo | None = None  # holds the current state unless a batch changed it
        self._batches_since_checkpoint = 0
        self._last_checkpoint_at = time.monotonic()
        self._probe_costs = ProbeCosts()  # what the loss and one question cost, learnt as probes run
        self._probe_credit_ms = 0.0  # probing time granted by time budgets and not spent yet

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
        with self.model_turns.query():
            memory_version = self._view.memory_version
            retrieved = self.retriever.retrieve(question) if use_bank else Retrieved([], [], None)
            generated = self.runner.generate(prompt, max_new_tokens, retrieved=retrieved.tokens)
        return extract_answer(generated), memory_version, list(dict.fromkeys(retrieved.doc_ids))

    def contexts(self, text: str) -> list[list[int]]:
        """A text's tokens in consecutive contexts of at most `context_tokens` tokens."""
        return split_contexts(self.runner.encode(text), self.context_tokens)

    def apply(self, documents: Sequence[InjectDocument]) -> BatchResult:
        """Inject the documents not applied yet, in order; append their bank entries (the batch is durable
        then), and publish the new memory; write a checkpoint when one is due."""
        with self._write_lock:
            applied: list[str] = []
            skipped: list[str] = []
            excluded: list[str] = []
            contexts: list[tuple[InjectDocument, int, list[int], str]] = []
            for document in documents:
                if document.doc_id in self.lineage.excluded:
                    excluded.append(document.doc_id)
                    continue
                if self.bank.holds(document.doc_id) or document.doc_id in applied:
                    skipped.append(document.doc_id)
                    continue
                applied.append(document.doc_id)
                chunks = self.contexts(document.text)
                contexts += [
                    (document, chunk, ids, document.text if len(chunks) == 1 else self.runner.decode(ids))
                    for chunk, ids in enumerate(chunks)
                ]

            view = self._view
            version = view.memory_version + (1 if contexts else 0)
            started = time.perf_counter()
            pool = None
            entries: list[NewEntry] = []
            append = self.bank.begin_append(version)  # entries are written while the next ones are computed
            for document, chunk, ids, text in contexts:
                with self.model_turns.update():
                    pool, tokens, dropped = self.runner.next_pool(pool, ids)
                entries.append(_entry(document, chunk, text, tokens, dropped))
                if len(entries) % _ENTRIES_PER_WRITE == 0:
                    append.add(entries[-_ENTRIES_PER_WRITE:])
                crash_point("mid_inject")  # exactly-once tests: the server dies with a batch half-computed
            append.add(entries[len(entries) - len(entries) % _ENTRIES_PER_WRITE :])
            injection_ms = (time.perf_counter() - started) * 1000

            seqs = append.commit(before_commit=lambda: crash_point("mid_append"))
            crash_point("after_append")  # durable, not yet published: a restart replays it from the bank
            offsets = _advanced(view.last_offsets, documents)
            if applied or offsets != view.last_offsets:
                self._last_snapshot = None
            with self.model_turns.update():
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
            return BatchResult(applied, skipped, len(contexts), version, injection_ms, checkpoint, excluded)

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
            return self._restore()

    def _restore(self) -> SnapshotInfo | None:
        """`restore` with the write lock held."""
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
        self.runner.model.set_memory_state(self.runner.base_state)
        self._replay(0, 0, {})
        if len(self.bank):
            log.info("no snapshot: replayed the whole bank (%d entries) onto the checkpoint's memory",
                     len(self.bank))
        return None

    def rollback(self, version: int, exclude: Sequence[str] = (), dry_run: bool = False) -> RollbackResult:
        """Take the memory back to memory version `version`, byte for byte, and start a new lineage.

        The checkpoints of later versions are set aside (`<state>/rolled_back/<lineage>/`), the bank is
        truncated to `version`, and the pool rebuilt from the newest checkpoint at or before it plus a replay;
        a checkpoint of the result is written. `exclude` doc_ids are refused from then on. A dry run only
        says what would be removed. Raises RollbackRefused, changing nothing, when it cannot be done.
        """
        with self._write_lock:
            current = self._view.memory_version
            if not 0 <= version <= current:
                raise RollbackRefused(f"version {version} is not between 0 and the current version {current}")
            removed = [
                RemovedEntry(row["seq"], row["doc_id"], row["version"], row["topic"], row["partition"],
                             row["offset"])
                for row in self.bank.infos(where=f"version > {int(version)}")
            ]
            base = self._rebuild_base(version, self.bank.next_seq - len(removed))
            previous = self.lineage
            if dry_run:
                return RollbackResult(current, version, removed, base, previous, previous.id, None,
                                      _first_offsets(removed))
            if not removed and version == current and previous.excluded.issuperset(exclude):
                # a repeated request: nothing to do, but its replay may not have finished
                repeat = previous.from_version == version
                return RollbackResult(current, version, removed, base, previous, previous.id, None,
                                      previous.replay_from if repeat else {})
            self._set_aside_checkpoints(version, previous.id)
            self.bank.truncate(version)
            if self.retriever is not None:
                self.retriever.truncate(self.bank.next_seq - 1)
            self._last_snapshot = None
            self._restore()
            self.lineage = Lineage.new(previous, version, frozenset(exclude), _first_offsets(removed))
            save_lineage(self.lineage_path, self.lineage)
            checkpoint = self._write_checkpoint()
            log.warning("rolled back from version %d to %d (%d entries removed); lineage %s -> %s",
                        current, version, len(removed), previous.id, self.lineage.id)
            return RollbackResult(current, version, removed, base, self.lineage, previous.id, checkpoint,
                                  self.lineage.replay_from)

    def _rebuild_base(self, version: int, entries: int) -> str | None:
        """The checkpoint a rollback to `version` (the bank's first `entries` entries) replays from (None:
        the model's own pool); RollbackRefused when the bank no longer holds the tokens that replay needs."""
        for contents in valid_snapshots(self.snapshot_root):
            if contents.info.memory_version <= version and contents.injections <= entries:
                base, first_seq = contents.info.id, contents.injections
                break
        else:
            base, first_seq = None, 0
        missing = self.bank.entries_without_tokens(first_seq, entries)
        if missing:
            raise RollbackRefused(
                f"cannot rebuild version {version}: {missing} of the entries after "
                f"{'checkpoint ' + base if base else 'the empty pool'} lost their exact tokens to compaction "
                "(roll back to a version with a checkpoint at or before it, see `ckl snapshots list`)"
            )
        return base

    def _set_aside_checkpoints(self, version: int, lineage: str) -> None:
        """Move the checkpoints of versions after `version` out of the snapshot root."""
        later = [info for info in list_snapshots(self.snapshot_root) if info.memory_version > version]
        if later:
            aside = self.snapshot_root.parent / "rolled_back" / lineage
            aside.mkdir(parents=True, exist_ok=True)
            for info in later:
                shutil.move(info.path, aside / info.path.name)
            log.info("set aside %d checkpoints of versions after %d in %s", len(later), version, aside)

    def follow(self) -> bool:
        """A read replica's catch-up with the writer sharing its checkpoints and bank: replay the entries
        the writer appended since, or restore from scratch after a rollback. Returns whether the memory
        changed. The writer's appends are atomic, so a replica never sees half a batch."""
        with self._write_lock:
            self.bank.reload()
            lineage = load_lineage(self.lineage_path)
            known = self._view.injections
            if lineage != self.lineage or self.bank.next_seq < known:  # rolled back: start over
                self.lineage = lineage
                with self.model_turns.update():
                    self._restore()
                if self.retriever is not None:
                    self.retriever = Retriever(self.bank, self.retriever.settings)
                log.info("replica: lineage %s, restored at memory version %d", lineage.id,
                         self._view.memory_version)
                return True
            if self.bank.next_seq == known:
                return False
            with self.model_turns.update():
                self._replay(known, self._view.memory_version, self._view.last_offsets)
            if self.retriever is not None:
                self.retriever.add(*self.bank.texts(known))
            log.info("replica: caught up to memory version %d", self._view.memory_version)
            return True

    def probe(self, budget: ProbeBudget, seed: int | None = None, max_new_tokens: int = 16) -> ProbeReport:
        """Ask stored probes of entries sampled by age, from the pool alone and with the bank, and the
        degradation loss on a held-out text; reads the memory, never changes it (no batch runs meanwhile).
        Time budgets not spent carry over to later calls."""
        with self._write_lock:
            next_seq = self.bank.next_seq
            rng = random.Random(next_seq if seed is None else seed)
            probes = sample_probes(next_seq, budget, self.bank.infos, rng)

            def ask(question: str, retrieve: bool) -> str:
                return self.answer(question, max_new_tokens, retrieve)[0]

            def loss() -> float:
                with self.model_turns.query():
                    return self.runner.lm_loss(HELDOUT_TEXT)

            if budget.max_ms is None:
                return run_probes(probes, ask, loss, budget, self._probe_costs)
            # time budgets accumulate while unspent, so probes that cost more than one call's budget still
            # run every few calls and the share of time they take converges to the budget's
            costs = self._probe_costs
            cap = 10 * budget.max_ms + (costs.loss_ms or 0.0) + (costs.question_ms or 0.0)
            self._probe_credit_ms = min(self._probe_credit_ms + budget.max_ms, cap)
            granted = ProbeBudget(budget.questions, self._probe_credit_ms)
            report = run_probes(probes, ask, loss, granted, costs)
            self._probe_credit_ms -= report.elapsed_ms
            return report

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


def _first_offsets(entries: Sequence[RemovedEntry]) -> dict[str, int]:
    """Per "topic/partition", the Kafka offset of the first of the entries (where their replay starts)."""
    first: dict[str, int] = {}
    for entry in entries:
        if entry.topic is not None and entry.partition is not None and entry.offset is not None:
            key = f"{entry.topic}/{entry.partition}"
            first[key] = min(first.get(key, entry.offset), entry.offset)
    return first


def _advanced(
    offsets: dict[str, dict[int, int]], documents: Sequence[InjectDocument]
) -> dict[str, dict[int, int]]:
    """A copy of `offsets` moved forward to the documents' offsets (a redelivery never moves one back)."""
    advanced = {topic: dict(partitions) for topic, partitions in offsets.items()}
    for document in documents:
        partitions = advanced.setdefault(document.topic, {})
        partitions[document.partition] = max(partitions.get(document.partition, -1), document.offset)
    return advanced
