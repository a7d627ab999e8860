"""The bank as the memory's write-ahead log: a pool checkpoint + the entries after it = the pool now.

An injection changes the pool by two things only, both kept in its bank entry: the new tokens (K, or
k <= K for the first context into an empty pool, which tiles them) and the indices it dropped.
Re-applying them in seq order (`model.memory_pool.replayed_pool`: tensor indexing, no model forward)
rebuilds the pool bit for bit, so full checkpoints can be rare and a batch is durable as soon as its
entries are.
"""

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from compression.bank import BankError, PoolRecord
from model.memory_pool import replayed_pool


@dataclass
class Replayed:
    """The pool after replay, with what the replayed entries tell about the state."""

    pool: torch.Tensor
    initialized: bool
    entries: int = 0
    doc_ids: set[str] = field(default_factory=set)
    last_offsets: dict[str, dict[int, int]] = field(default_factory=dict)
    last_version: int | None = None


def replay(pool: torch.Tensor, initialized: bool, records: Iterable[PoolRecord],
           first_seq: int) -> Replayed:
    """Re-apply `records` (seq order, starting at `first_seq`) to a checkpoint's pool; returns the result.

    A gap in the seqs, or a tiling entry meeting a filled pool, means the bank and the checkpoint do not
    belong together: BankError.
    """
    result = Replayed(pool=pool, initialized=initialized)
    expected = first_seq
    for record in records:
        if record.seq != expected:
            raise BankError(f"replay expected entry {expected}, the bank has {record.seq} next")
        if (record.dropped is None) == result.initialized:
            state = "a filled" if result.initialized else "an empty"
            raise BankError(f"entry {record.seq} ({record.doc_id}) does not apply to {state} pool")
        result.pool = replayed_pool(result.pool, record.tokens.to(result.pool.device), record.dropped)
        result.initialized = True
        result.entries += 1
        result.doc_ids.add(record.doc_id)
        result.last_version = record.version
        if record.topic is not None and record.partition is not None and record.offset is not None:
            partitions = result.last_offsets.setdefault(record.topic, {})
            partitions[record.partition] = max(partitions.get(record.partition, -1), record.offset)
        expected += 1
    return result
