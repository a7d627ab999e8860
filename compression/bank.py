"""The memory bank: one entry per injected context, kept in a Lance dataset (Arrow-native, versioned).

An entry holds what its injection did to the pool and what retrieval needs of it later:

    seq          the injection's number (0, 1, ...): the pool after n injections is the pool after entries
                 0..n-1, so replay goes in seq order
    doc_id, chunk, version, created_at, source, published_at, topic, partition, offset, text, probes
    tokens       the K new memory tokens [L, K, d], exactly as they entered the pool (pool dtype); the
                 injection that filled an empty pool by tiling may have k = min(K, T) <= K of them (a first
                 context of T < K tokens): readers take k from the bytes
    dropped      the pool indices that injection dropped ([K], or [L, K] when every layer drops its own);
                 null for the injection that filled an empty pool by tiling
    slots, slot_scale   the retrieval copy (compression/slots.py, in the format of a
                 compression.settings.SlotFormat): min(S, k) tokens per layer

`version` is the server's memory version of the batch that applied the entry; truncating to a version
deletes the later entries (a rollback). Every append is one Lance commit: its data files are written
first and become visible only when the commit's manifest is, so a write cut short by a crash is never
read as data (its orphaned files are removed by `compact`). Lance keeps every committed version and reads
only the columns and rows asked for; `uri` may be a local path or an object-store URI.
"""

import json
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from lance.fragment import write_fragments

from compression.settings import SlotFormat
from compression.slots import (
    DTYPES,
    decode_slots,
    encode_slots,
    slot_count,
    tensor_from_bytes,
    tensor_to_bytes,
    token_count,
)

FORMAT = "ckl-bank/1"

SCHEMA_FIELDS = [
    ("seq", pa.int64()),
    ("doc_id", pa.string()),
    ("chunk", pa.int32()),
    ("version", pa.int64()),
    ("created_at", pa.timestamp("us", tz="UTC")),
    ("source", pa.string()),
    ("published_at", pa.string()),
    ("topic", pa.string()),
    ("partition", pa.int32()),
    ("offset", pa.int64()),
    ("text", pa.string()),
    ("probes", pa.string()),
    ("tokens", pa.large_binary()),
    ("dropped", pa.large_binary()),
    ("slots", pa.large_binary()),
    ("slot_scale", pa.large_binary()),
]
INFO_COLUMNS = [name for name, _ in SCHEMA_FIELDS if name not in ("tokens", "dropped", "slots", "slot_scale")]


class BankError(ValueError):
    """A bank that does not fit the model, or an operation it must refuse."""


@dataclass(frozen=True)
class BankLayout:
    """The shape of every entry: layers L, tokens per injection K, hidden size d, the pool's dtype, whether
    drops are per layer, and the retrieval slots' format."""

    layers: int
    tokens: int
    hidden: int
    pool_dtype: str
    drop_per_layer: bool
    slot_format: SlotFormat = SlotFormat()

    @property
    def slots(self) -> int:
        """S: retrieval slots per layer and entry (an entry of k < K tokens has min(S, k))."""
        return self.slot_format.count(self.tokens)

    def to_metadata(self) -> dict[bytes, bytes]:
        fields = {
            "format": FORMAT, "layers": self.layers, "tokens": self.tokens, "hidden": self.hidden,
            "pool_dtype": self.pool_dtype, "drop_per_layer": self.drop_per_layer,
            "slots": self.slots, "slot_dtype": self.slot_format.dtype,
        }
        return {b"ckl": json.dumps(fields).encode()}

    @classmethod
    def from_metadata(cls, metadata: dict[bytes, bytes] | None) -> "BankLayout":
        try:
            fields = json.loads((metadata or {})[b"ckl"])
        except (KeyError, json.JSONDecodeError) as error:
            raise BankError("not a ckl memory bank (its schema carries no ckl layout)") from error
        if fields.get("format") != FORMAT:
            raise BankError(f"unsupported bank format {fields.get('format')!r}, expected {FORMAT}")
        return cls(fields["layers"], fields["tokens"], fields["hidden"], fields["pool_dtype"],
                   fields["drop_per_layer"], SlotFormat(fields["slots"], fields["slot_dtype"]))


@dataclass(frozen=True)
class NewEntry:
    """One injected context to append: what it did to the pool and where it came from."""

    doc_id: str
    chunk: int
    text: str
    tokens: torch.Tensor  # [L, K, d] in the pool's dtype ([L, k, d], 1 <= k <= K, when dropped is None)
    dropped: torch.Tensor | None  # [K] or [L, K]; None for the tiling fill of an empty pool
    source: str | None = None
    published_at: str | None = None
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    probes: list[dict] | None = None


@dataclass(frozen=True)
class PoolRecord:
    """What replay needs of an entry."""

    seq: int
    doc_id: str
    version: int
    tokens: torch.Tensor
    dropped: torch.Tensor | None
    topic: str | None
    partition: int | None
    offset: int | None


class MemoryBank:
    """A memory bank at `uri`: created with `layout` when absent, else opened and checked against it."""

    def __init__(self, uri: str | os.PathLike, layout: BankLayout | None = None):
        self.uri = str(uri)
        schema = pa.schema(SCHEMA_FIELDS, metadata=layout.to_metadata() if layout else None)
        try:
            self._dataset = lance.dataset(self.uri)
        except (FileNotFoundError, ValueError, OSError):
            if layout is None:
                raise BankError(f"no memory bank at {self.uri}") from None
            self._dataset = lance.write_dataset(schema.empty_table(), self.uri, mode="create")
        self.layout = BankLayout.from_metadata(self._dataset.schema.metadata)
        if layout is not None and (self.layout.layers, self.layout.tokens, self.layout.hidden,
                                   self.layout.pool_dtype) != (layout.layers, layout.tokens,
                                                               layout.hidden, layout.pool_dtype):
            raise BankError(
                f"the bank at {self.uri} holds entries of {self.layout}, the model needs {layout}; "
                "use another bank for another model"
            )
        self._schema = self._dataset.schema
        self._load_index()

    # ------------------------------------------------------------------------------------------ reading

    def _load_index(self) -> None:
        """seq -> row position (Lance's take() addresses rows by position) and the doc_ids held."""
        table = self._dataset.to_table(columns=["seq", "doc_id"])
        seqs = table.column("seq").to_numpy()
        self._positions_by_seq = np.argsort(seqs, kind="stable")
        self._sorted_seqs = seqs[self._positions_by_seq]
        self._doc_ids = set(table.column("doc_id").to_pylist())

    @property
    def lance_version(self) -> int:
        """The Lance dataset version (one per commit)."""
        return self._dataset.version

    def __len__(self) -> int:
        return len(self._sorted_seqs)

    @property
    def next_seq(self) -> int:
        """The seq the next entry gets: one past the last entry (0 when empty)."""
        return int(self._sorted_seqs[-1]) + 1 if len(self._sorted_seqs) else 0

    def holds(self, doc_id: str) -> bool:
        return doc_id in self._doc_ids

    @property
    def doc_ids(self) -> frozenset[str]:
        return frozenset(self._doc_ids)

    @property
    def documents(self) -> int:
        """How many distinct documents the bank holds."""
        return len(self._doc_ids)

    def _positions(self, seqs: Sequence[int]) -> np.ndarray:
        wanted = np.asarray(seqs, dtype=np.int64)
        found = np.searchsorted(self._sorted_seqs, wanted)
        if len(wanted) and (found.max() >= len(self._sorted_seqs) or
                            (self._sorted_seqs[found] != wanted).any()):
            raise BankError(f"the bank holds no entry with some of the seqs {list(seqs)[:10]}")
        return self._positions_by_seq[found]

    def _take(self, seqs: Sequence[int], columns: list[str]) -> pa.Table:
        return self._dataset.take(self._positions(seqs).tolist(), columns=columns)

    def slots(self, seqs: Sequence[int]) -> list[torch.Tensor]:
        """The retrieval slots [L, S, d] (float32) of the entries `seqs`, in that order (fewer than S for an
        entry of fewer tokens)."""
        table = self._take(seqs, ["seq", "slots", "slot_scale"])
        layers, hidden, slot_format = self.layout.layers, self.layout.hidden, self.layout.slot_format
        decoded = []
        columns = (table.column(name).to_pylist() for name in ("seq", "slots", "slot_scale"))
        for seq, values, scales in zip(*columns, strict=True):
            try:
                count = slot_count(slot_format, values, layers, hidden)
            except ValueError as error:
                raise BankError(f"entry {seq}: unreadable retrieval slots: {error}") from None
            if count > self.layout.slots:
                raise BankError(f"entry {seq}: {count} retrieval slots, the bank keeps {self.layout.slots}")
            decoded.append(decode_slots(slot_format, values, scales, (layers, count, hidden)))
        return decoded

    def infos(self, seqs: Sequence[int] | None = None, where: str | None = None) -> list[dict]:
        """Entry metadata (no tensors) as dicts, by seq or SQL filter, in seq order."""
        if seqs is not None:
            table = self._take(seqs, INFO_COLUMNS)
        else:
            table = self._dataset.to_table(columns=INFO_COLUMNS, filter=where)
        rows = table.sort_by("seq").to_pylist()
        for row in rows:
            row["probes"] = json.loads(row["probes"]) if row["probes"] else []
        return rows

    def to_arrow(self) -> pa.Table:
        """Every entry, every column, as one Arrow table (in storage order)."""
        return self._dataset.to_table()

    def reload(self) -> None:
        """Read the newest committed version (another process appends: a read replica)."""
        self._dataset = lance.dataset(self.uri)
        self._load_index()

    def texts(self, from_seq: int = 0) -> tuple[list[int], list[str]]:
        """The (seq, text) of the entries from `from_seq` on, in seq order: what retrieval keys are built
        from."""
        table = self._dataset.to_table(columns=["seq", "text"], filter=f"seq >= {int(from_seq)}" if from_seq
                                       else None).sort_by("seq")
        return table.column("seq").to_pylist(), table.column("text").to_pylist()

    def records(self, from_seq: int = 0, batch_size: int = 64) -> Iterator[PoolRecord]:
        """The entries with seq >= from_seq in seq order, with their exact tokens and drops (for replay)."""
        start = int(np.searchsorted(self._sorted_seqs, from_seq))
        pending = self._sorted_seqs[start:]
        layout = self.layout
        dtype = DTYPES[layout.pool_dtype]
        columns = ["seq", "doc_id", "version", "tokens", "dropped", "topic", "partition", "offset"]
        for first in range(0, len(pending), batch_size):
            for row in self._take(pending[first : first + batch_size].tolist(), columns).to_pylist():
                if row["tokens"] is None:
                    raise BankError(
                        f"entry {row['seq']} ({row['doc_id']}) was compacted: its exact tokens are gone, so "
                        "the pool cannot be replayed from before it; restore a checkpoint at or after it"
                    )
                dropped = None
                if row["dropped"] is not None:
                    drop_shape = (layout.layers, layout.tokens) if layout.drop_per_layer else (layout.tokens,)
                    dropped = tensor_from_bytes(row["dropped"], torch.int32, drop_shape).long()
                count = self._token_count(row["seq"], row["tokens"], dtype, tiling=dropped is None)
                yield PoolRecord(
                    seq=row["seq"], doc_id=row["doc_id"], version=row["version"],
                    tokens=tensor_from_bytes(row["tokens"], dtype, (layout.layers, count, layout.hidden)),
                    dropped=dropped, topic=row["topic"], partition=row["partition"], offset=row["offset"],
                )

    def _token_count(self, seq: int, data: bytes, dtype: torch.dtype, tiling: bool) -> int:
        """k of a stored entry's exact tokens: K, or 1..K for a tiling entry; BankError otherwise."""
        try:
            count = token_count(data, dtype, self.layout.layers, self.layout.hidden)
        except ValueError as error:
            raise BankError(f"entry {seq}: unreadable tokens: {error}") from None
        if count > self.layout.tokens or (count != self.layout.tokens and not tiling):
            raise BankError(f"entry {seq}: {count} tokens per layer, expected "
                            f"{'at most ' if tiling else ''}{self.layout.tokens}")
        return count

    # ------------------------------------------------------------------------------------------ writing

    def append(self, entries: Sequence[NewEntry], version: int,
               before_commit: Callable[[], None] | None = None) -> list[int]:
        """Append entries as one commit (all or nothing); returns their seqs (next_seq, next_seq + 1, ...).

        Refuses a doc_id the bank already holds (the caller skips applied documents before injecting).
        `before_commit` runs after the data files are written and before the commit (crash tests).
        """
        pending = self.begin_append(version)
        pending.add(entries)
        return pending.commit(before_commit)

    def begin_append(self, version: int) -> "PendingAppend":
        """An append built piece by piece: each `add` writes its entries' data files on a background
        thread (while the caller computes the next ones), `commit` makes them all visible at once."""
        return PendingAppend(self, version)

    def write_fragments(self, entries: Sequence[NewEntry], seqs: Sequence[int], version: int) -> list:
        """The data files (Lance fragments) of entries, not yet part of the dataset (see PendingAppend)."""
        now = datetime.now(UTC)
        slot_values, slot_scales = zip(*(encode_slots(self.layout.slot_format, e.tokens) for e in entries),
                                       strict=True)
        columns = {
            "seq": list(seqs),
            "doc_id": [e.doc_id for e in entries],
            "chunk": [e.chunk for e in entries],
            "version": [version] * len(entries),
            "created_at": [now] * len(entries),
            "source": [e.source for e in entries],
            "published_at": [e.published_at for e in entries],
            "topic": [e.topic for e in entries],
            "partition": [e.partition for e in entries],
            "offset": [e.offset for e in entries],
            "text": [e.text for e in entries],
            "probes": [json.dumps(e.probes) if e.probes else None for e in entries],
            "tokens": [tensor_to_bytes(e.tokens) for e in entries],
            "dropped": [None if e.dropped is None else tensor_to_bytes(e.dropped.to(torch.int32))
                        for e in entries],
            "slots": list(slot_values),
            "slot_scale": list(slot_scales),
        }
        return write_fragments(pa.table(columns, schema=self._schema), self.uri)

    def commit_fragments(self, fragments: list, seqs: Sequence[int], doc_ids: Sequence[str]) -> None:
        """Make written fragments part of the dataset in one commit, and index them."""
        rows_before = self._dataset.count_rows()
        self._dataset = lance.LanceDataset.commit(
            self.uri, lance.LanceOperation.Append(fragments), read_version=self._dataset.version
        )
        # appended rows come last and their seqs are the largest: extend the index instead of rereading it
        self._sorted_seqs = np.concatenate([self._sorted_seqs, np.asarray(seqs, dtype=np.int64)])
        self._positions_by_seq = np.concatenate(
            [self._positions_by_seq, np.arange(rows_before, rows_before + len(seqs))]
        )
        self._doc_ids.update(doc_ids)

    def check_shape(self, entry: NewEntry) -> None:
        """Tokens [L, K, d] in the pool's dtype, or [L, k, d] with 1 <= k <= K for a tiling entry (the first
        context of T < K tokens into an empty pool gives k = T); drops [K] or [L, K]."""
        layout = self.layout
        expected = (layout.layers, layout.tokens, layout.hidden)
        shape = tuple(entry.tokens.shape)
        tiling = entry.dropped is None
        fits = shape == expected or (tiling and len(shape) == 3 and 1 <= shape[1] <= layout.tokens
                                     and (shape[0], shape[2]) == (layout.layers, layout.hidden))
        if not fits or str(entry.tokens.dtype) != f"torch.{layout.pool_dtype}":
            allowed = f" (a tiling entry: 1 to {layout.tokens} tokens)" if tiling else ""
            raise BankError(f"entry {entry.doc_id!r}: tokens {shape} {entry.tokens.dtype}"
                            f" do not fit the bank's {expected} {layout.pool_dtype}{allowed}")
        if entry.dropped is not None:
            drop_shape = (layout.layers, layout.tokens) if layout.drop_per_layer else (layout.tokens,)
            if tuple(entry.dropped.shape) != drop_shape:
                raise BankError(f"entry {entry.doc_id!r}: dropped indices {tuple(entry.dropped.shape)}, "
                                f"expected {drop_shape}")

    def truncate(self, version: int) -> int:
        """Delete the entries of memory versions after `version` (a rollback); returns how many."""
        later = self._dataset.count_rows(filter=f"version > {int(version)}")
        if later:
            self._dataset.delete(f"version > {int(version)}")
            self._dataset = lance.dataset(self.uri)
            self._load_index()
        return later

    def entries_without_tokens(self, from_seq: int, to_seq: int) -> int:
        """How many entries with from_seq <= seq < to_seq lost their exact tokens to compaction (a replay
        over them is impossible)."""
        if to_seq <= from_seq:
            return 0
        return self._dataset.count_rows(
            filter=f"seq >= {int(from_seq)} AND seq < {int(to_seq)} AND tokens IS NULL")

    def compact(self, covered_seq: int | None = None) -> dict:
        """Drop the exact tokens of entries below `covered_seq` (a checkpoint covers them; their retrieval
        slots stay), merge small files, and delete old versions and orphaned files of crashed writes."""
        dropped_tokens = 0
        if covered_seq is not None and covered_seq > 0:
            result = self._dataset.update({"tokens": "NULL", "dropped": "NULL"},
                                          where=f"seq < {int(covered_seq)} AND tokens IS NOT NULL")
            dropped_tokens = int(result["num_rows_updated"])
            self._dataset = lance.dataset(self.uri)
        metrics = self._dataset.optimize.compact_files()
        self._dataset = lance.dataset(self.uri)
        cleanup = self._dataset.cleanup_old_versions(older_than=timedelta(0), delete_unverified=True)
        self._load_index()
        return {"entries_without_tokens": dropped_tokens, "fragments_removed": metrics.fragments_removed,
                "fragments_added": metrics.fragments_added, "bytes_removed": cleanup.bytes_removed}

    # ------------------------------------------------------------------------------------------- stats

    def stats(self) -> dict:
        """Entries, documents, versions, sources, time span and bytes on disk."""
        table = self._dataset.to_table(columns=["doc_id", "version", "created_at", "source"])
        sources = table.column("source").fill_null("-").value_counts().to_pylist()
        created = table.column("created_at")
        return {
            "uri": self.uri,
            "entries": table.num_rows,
            "documents": self.documents,
            "memory_versions": len(pc.unique(table.column("version"))),
            "first_entry_at": pc.min(created).as_py() if table.num_rows else None,
            "last_entry_at": pc.max(created).as_py() if table.num_rows else None,
            "sources": {item["values"]: item["counts"] for item in sources},
            "lance_version": self.lance_version,
            "bytes_on_disk": _disk_bytes(self.uri),
            "layout": {"layers": self.layout.layers, "tokens": self.layout.tokens,
                       "hidden": self.layout.hidden, "pool_dtype": self.layout.pool_dtype,
                       "slots": self.layout.slots, "slot_dtype": self.layout.slot_format.dtype},
        }


def _disk_bytes(uri: str) -> int | None:
    """Bytes under a local bank directory (None for object-store URIs)."""
    if "://" in uri:
        return None
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(uri) for name in names)


class PendingAppend:
    """Entries of one memory version on their way into the bank: written as data files as they come (one
    background thread, so the writing overlaps computing the next entries) and committed together, all or
    nothing. Nothing is visible before `commit`; an append abandoned or failed leaves only unreferenced
    files."""

    def __init__(self, bank: MemoryBank, version: int):
        self.bank, self.version = bank, version
        self._seqs: list[int] = []
        self._doc_ids: list[str] = []
        self._writes: list[Future] = []
        self._executor: ThreadPoolExecutor | None = None

    def add(self, entries: Sequence[NewEntry]) -> None:
        """Check the entries and start writing their data files."""
        for entry in entries:  # (a document's contexts are entries that share its doc_id)
            if self.bank.holds(entry.doc_id):
                raise BankError(f"the bank already holds document {entry.doc_id!r}")
            self.bank.check_shape(entry)
        if not entries:
            return
        first = self.bank.next_seq + len(self._seqs)
        seqs = list(range(first, first + len(entries)))
        self._seqs += seqs
        self._doc_ids += [entry.doc_id for entry in entries]
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckl-bank-write")
        write = self._executor.submit(self.bank.write_fragments, list(entries), seqs, self.version)
        self._writes.append(write)

    def commit(self, before_commit: Callable[[], None] | None = None) -> list[int]:
        """Wait for the data files, then commit them as one version of the dataset; returns the seqs.
        `before_commit` runs in between (crash tests)."""
        try:
            fragments = [fragment for write in self._writes for fragment in write.result()]
        finally:
            if self._executor is not None:
                self._executor.shutdown()
        if not fragments:
            return []
        if before_commit is not None:
            before_commit()
        self.bank.commit_fragments(fragments, self._seqs, self._doc_ids)
        return list(self._seqs)
