"""The memory bank on a real Lance dataset on disk: append, reopen, idempotence, truncation, compaction, a
SIGKILL between writing an append's data files and its commit, slot formats, and replay of the pool bit for
bit (also against the model's own injection path)."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from compression.bank import BankError, BankLayout, MemoryBank, NewEntry
from compression.replay import replay
from compression.settings import SlotFormat
from model import memory_pool

LAYERS, K, HIDDEN, POOL = 2, 4, 8, 16


def layout(pool_dtype: str = "float32", per_layer: bool = True, slots: SlotFormat | None = None):
    return BankLayout(LAYERS, K, HIDDEN, pool_dtype, per_layer, slots or SlotFormat())


def stream(count: int, dtype=torch.float32, per_layer: bool = True, seed: int = 0):
    """`count` updates of an empty pool as (entries, pool before, pool after each update)."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(LAYERS, POOL, HIDDEN, generator=generator).to(dtype)
    pool, initialized, entries, pools = start, False, [], []
    for i in range(count):
        tokens = torch.randn(LAYERS, K, HIDDEN, generator=generator).to(dtype)
        dropped = memory_pool.dropped_indices(POOL, K, LAYERS, per_layer, generator) if initialized else None
        pool, initialized = memory_pool.replayed_pool(pool, tokens, dropped), True
        pools.append(pool)
        entries.append(NewEntry(f"doc-{i}", 0, f"Person {i} was born in city {i}.", tokens, dropped,
                                source="test", topic="ckl.docs", partition=i % 2, offset=i // 2))
    return entries, start, pools


def test_appends_survive_reopening_with_seqs_texts_and_metadata(tmp_path):
    entries, _, _ = stream(5)
    bank = MemoryBank(tmp_path / "bank", layout())
    assert bank.append(entries[:3], version=1) == [0, 1, 2]
    assert bank.append(entries[3:], version=2) == [3, 4]

    reopened = MemoryBank(tmp_path / "bank")
    assert len(reopened) == 5 and reopened.next_seq == 5
    assert reopened.doc_ids == {f"doc-{i}" for i in range(5)}
    assert reopened.texts() == ([0, 1, 2, 3, 4], [e.text for e in entries])
    infos = reopened.infos(where="version = 2")
    assert [(i["seq"], i["doc_id"], i["partition"], i["offset"]) for i in infos] == [(3, "doc-3", 1, 1),
                                                                                      (4, "doc-4", 0, 2)]
    stats = reopened.stats()
    assert stats["entries"] == 5 and stats["memory_versions"] == 2 and stats["sources"] == {"test": 5}
    assert stats["bytes_on_disk"] > 5 * LAYERS * K * HIDDEN * 4  # at least the exact tokens


def test_a_bank_refuses_another_models_entries_and_a_document_it_holds(tmp_path):
    entries, _, _ = stream(2)
    bank = MemoryBank(tmp_path / "bank", layout())
    bank.append(entries[:1], version=1)
    with pytest.raises(BankError, match="already holds document 'doc-0'"):
        bank.append(entries, version=2)
    assert len(bank) == 1  # all or nothing: doc-1 was not written either
    with pytest.raises(BankError, match="the model needs"):
        MemoryBank(tmp_path / "bank", BankLayout(LAYERS, K, 2 * HIDDEN, "float32", True))
    with pytest.raises(BankError, match="no memory bank"):
        MemoryBank(tmp_path / "nothing-here")


@pytest.mark.parametrize("dtype,per_layer", [(torch.float32, True), (torch.bfloat16, False)])
def test_replay_from_any_checkpoint_rebuilds_the_pool_bit_for_bit(tmp_path, dtype, per_layer):
    entries, start, pools = stream(12, dtype, per_layer)
    bank = MemoryBank(tmp_path / "bank", layout(str(dtype).removeprefix("torch."), per_layer))
    for first in range(0, 12, 4):  # three batches
        bank.append(entries[first : first + 4], version=first // 4 + 1)

    from_empty = replay(start, False, bank.records(0), 0)
    assert torch.equal(from_empty.pool, pools[-1]) and from_empty.entries == 12
    assert from_empty.last_offsets == {"ckl.docs": {0: 5, 1: 5}} and from_empty.last_version == 3
    from_checkpoint = replay(pools[6], True, bank.records(7), 7)  # checkpoint after 7 injections
    assert torch.equal(from_checkpoint.pool, pools[-1]) and from_checkpoint.entries == 5
    with pytest.raises(BankError, match="does not apply to a filled pool"):
        replay(pools[0], True, bank.records(0), 0)  # entry 0 filled an empty pool by tiling


def test_truncation_hides_later_versions_for_good_and_appends_go_on_after_it(tmp_path):
    entries, start, pools = stream(6)
    bank = MemoryBank(tmp_path / "bank", layout())
    for version, first in enumerate(range(0, 6, 2), start=1):
        bank.append(entries[first : first + 2], version=version)

    assert bank.truncate(1) == 4
    reopened = MemoryBank(tmp_path / "bank")
    assert reopened.doc_ids == {"doc-0", "doc-1"} and reopened.next_seq == 2
    assert torch.equal(replay(start, False, reopened.records(0), 0).pool, pools[1])
    assert reopened.append(entries[2:3], version=2) == [2]  # doc-2 may come back after a rollback
    assert [info["doc_id"] for info in reopened.infos()] == ["doc-0", "doc-1", "doc-2"]


def test_compaction_drops_exact_tokens_a_checkpoint_covers_and_keeps_retrieval_slots(tmp_path):
    entries, _, pools = stream(8)
    bank = MemoryBank(tmp_path / "bank", layout())
    for first in range(0, 8, 2):
        bank.append(entries[first : first + 2], version=first // 2 + 1)
    before = bank.stats()["bytes_on_disk"]

    result = bank.compact(covered_seq=5)

    assert result["entries_without_tokens"] == 5 and result["fragments_added"] == 1
    assert bank.stats()["bytes_on_disk"] < before
    with pytest.raises(BankError, match="entry 0 .* was compacted"):
        list(bank.records(0))
    assert torch.equal(replay(pools[4], True, bank.records(5), 5).pool, pools[-1])
    assert [s.shape for s in bank.slots([0, 7])] == [(LAYERS, K, HIDDEN)] * 2
    assert [info["seq"] for info in MemoryBank(tmp_path / "bank").infos()] == list(range(8))


def test_a_write_killed_between_data_files_and_commit_is_never_read(tmp_path):
    entries, _, _ = stream(3)
    bank = MemoryBank(tmp_path / "bank", layout())
    bank.append(entries[:1], version=1)
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path[:0] = {[str(Path(__file__).parent), str(Path(__file__).parents[1])]}
        from test_bank import stream
        from compression.bank import MemoryBank
        entries, _, _ = stream(3)
        bank = MemoryBank({str(tmp_path / "bank")!r})
        bank.append(entries[1:], version=2, before_commit=lambda: os.kill(os.getpid(), signal.SIGKILL))
    """)
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    data_files = list((tmp_path / "bank" / "data").iterdir())
    assert len(data_files) == 2  # the killed append's file is on disk, but no commit names it

    reopened = MemoryBank(tmp_path / "bank")
    assert reopened.doc_ids == {"doc-0"} and reopened.next_seq == 1
    assert reopened.append(entries[1:], version=2) == [1, 2]
    reopened.compact()
    assert len(list((tmp_path / "bank" / "data").iterdir())) == 1  # merged; the orphan is gone
    assert reopened.doc_ids == {"doc-0", "doc-1", "doc-2"}


@pytest.mark.parametrize("slot_format,tolerance", [(SlotFormat(), 1e-3), (SlotFormat(2, "int8"), 2e-2)])
def test_retrieval_slots_keep_the_last_s_tokens_within_their_dtype_precision(tmp_path, slot_format,
                                                                             tolerance):
    entries, _, _ = stream(2)
    bank = MemoryBank(tmp_path / "bank", layout(slots=slot_format))
    bank.append(entries, version=1)
    slots = bank.slots([1, 0])
    kept = slot_format.count(K)
    for got, entry in zip(slots, [entries[1], entries[0]], strict=True):
        expected = entry.tokens[:, -kept:]
        assert got.shape == expected.shape
        assert (got - expected).abs().max() <= tolerance * expected.abs().max()


def test_a_short_tiling_entry_is_kept_and_replayed_bit_for_bit_and_a_short_drop_entry_refused(tmp_path):
    """The first context of T < K tokens into an empty pool gives k = T new tokens, tiled over the pool: the
    bank keeps that entry with its k tokens (and min(S, k) slots); any other entry must have K."""
    entries, start, _ = stream(4)
    short = entries[0].tokens[:, :3]  # k = 3 < K
    entries[0] = NewEntry("short-0", 0, "hi", short, None, topic="ckl.docs", partition=0, offset=0)
    pools, pool = [], start
    for entry in entries:
        pool = memory_pool.replayed_pool(pool, entry.tokens, entry.dropped)
        pools.append(pool)
    assert torch.equal(pools[0], torch.cat([short] * 5 + [short[:, 2:]], dim=1))  # tiled: 5 x 3 + the last 1
    bank = MemoryBank(tmp_path / "bank", layout(slots=SlotFormat(2, "int8")))
    bank.append(entries[:2], version=1)
    bank.append(entries[2:], version=2)

    reopened = MemoryBank(tmp_path / "bank")
    records = list(reopened.records(0))
    assert records[0].tokens.shape == (LAYERS, 3, HIDDEN) and torch.equal(records[0].tokens, short)
    assert torch.equal(replay(start, False, records, 0).pool, pools[-1])
    assert [s.shape[1] for s in reopened.slots([0, 1])] == [2, 2]
    full = MemoryBank(tmp_path / "full-slots", layout())
    full.append(entries[:2], version=1)
    assert [s.shape[1] for s in full.slots([0, 1])] == [3, K]
    assert torch.cat(full.slots([0, 1]), dim=1).shape == (LAYERS, 3 + K, HIDDEN)  # what retrieval does
    reopened.compact(covered_seq=1)  # its exact tokens go, its slots stay
    assert torch.equal(replay(pools[0], True, reopened.records(1), 1).pool, pools[-1])
    assert reopened.slots([0])[0].shape == (LAYERS, 2, HIDDEN)

    bank = MemoryBank(tmp_path / "refusing", layout())
    drops = entries[1].dropped
    for tokens, dropped in [(entries[1].tokens[:, :3], drops), (entries[1].tokens[:, :3], drops[:, :3]),
                            (torch.randn(LAYERS, K + 1, HIDDEN), None),
                            (torch.randn(LAYERS, 0, HIDDEN), None)]:
        with pytest.raises(BankError, match="do not fit the bank's"):
            bank.append([NewEntry("bad", 0, "x", tokens, dropped)], version=1)
    assert len(bank) == 0


@pytest.mark.parametrize("lengths", [(5, 9, 3, 7), (2, 9, 1, 7)])  # (2, ...): a first context shorter than K
def test_recorded_updates_of_the_model_replay_to_its_own_injected_pool(tmp_path, lengths):
    from model import MemoryLLM, MemoryLLMConfig

    config = MemoryLLMConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                             num_tokens=4, num_blocks=4, num_memory_tokens=16, drop_memory_per_layer=True)
    torch.manual_seed(0)
    model = MemoryLLM(config).eval()
    contexts = [torch.randint(3, 64, (n,)) for n in lengths]
    start = model.memory.detach().clone()
    bank = MemoryBank(tmp_path / "bank", BankLayout(2, 4, 16, "float32", True))
    recorded, pool = [], None
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for i, context in enumerate(contexts):  # the server's path: updates recorded off to the side
            tokens, dropped = model.memory_update(context, memory=pool, generator=generator)
            pool = memory_pool.replayed_pool(start if pool is None else pool, tokens, dropped)
            recorded.append((tokens, dropped))
            bank.append([NewEntry(f"doc-{i}", 0, f"context {i}", tokens, dropped)], version=i + 1)
        generator = torch.Generator().manual_seed(1)
        for context in contexts:  # the reference path: inject_memory into the model's own pool
            model.inject_memory(context, generator=generator)

    assert recorded[0][1] is None and recorded[1][1].shape == (2, 4)
    assert recorded[0][0].shape[1] == min(4, lengths[0])  # k = min(K, T) into the empty pool
    assert torch.equal(pool, model.memory)
    replayed = replay(start, False, MemoryBank(tmp_path / "bank").records(0), 0)
    assert torch.equal(replayed.pool, model.memory)
