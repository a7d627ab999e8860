"""Rollback and retention probes of the live state on a real bank and real checkpoints (tiny random model,
no services): byte-identical pools, truncation, lineages, exclusions, restarts, refusals, probe budgets."""

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from tiny_checkpoint import make_tiny_checkpoint

from compression.settings import RetrievalSettings, SlotFormat
from monitoring.probes import BUCKETS, ProbeBudget, bucket_seqs, probe_metrics, sample_probes, token_f1
from serving.lineage import load_lineage
from serving.runner import ModelRunner
from serving.schemas import InjectDocument
from serving.snapshots import CheckpointPolicy, list_snapshots
from serving.state import LiveState, RollbackRefused, open_bank

CONTEXT_TOKENS = 16
CITIES = ["Lisbon", "Oslo", "Cairo", "Lima", "Perth", "Quito", "Riga", "Sofia", "Turin", "Utrecht", "Vienna"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-checkpoint"))


@pytest.fixture
def runner(checkpoint) -> Iterator[ModelRunner]:
    saved = dict(os.environ)  # DeepSpeed sets distributed defaults in the environment
    try:
        yield ModelRunner(checkpoint)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def live_state(runner: ModelRunner, state_dir: Path, every_batches: int = 2) -> LiveState:
    bank, retriever = open_bank(runner, str(state_dir / "bank"), SlotFormat(), RetrievalSettings())
    return LiveState(runner, state_dir / "snapshots", bank, retriever, CONTEXT_TOKENS,
                     CheckpointPolicy(every_batches=every_batches, every_s=3600))


def document(index: int) -> InjectDocument:
    city = CITIES[index % len(CITIES)]
    return InjectDocument(
        doc_id=f"doc-{index}", text=f"Person {index} lives in {city}.", topic="ckl.docs", partition=index % 2,
        offset=index, probes=[{"question": f"Where does person {index} live?", "answer": city}],
    )


def ingest_batches(state: LiveState, batches: int, per_batch: int = 2) -> dict[int, str]:
    """Apply `batches` batches; returns the pool sha256 after each memory version (0: before any)."""
    recorded = {state.view().memory_version: state.runner.pool_sha256()}
    start = state.bank.documents
    for batch in range(batches):
        first = start + batch * per_batch
        state.apply([document(i) for i in range(first, first + per_batch)])
        recorded[state.view().memory_version] = state.runner.pool_sha256()
    return recorded


def test_rollback_restores_the_pool_byte_for_byte_truncates_the_bank_and_starts_a_lineage(runner, tmp_path):
    state = live_state(runner, tmp_path)
    recorded = ingest_batches(state, 5)  # checkpoints at versions 2 and 4
    before = state.lineage

    result = state.rollback(3)

    assert runner.pool_sha256() == recorded[3]
    assert state.view().memory_version == 3 and state.view().documents_applied == 6
    removed = list(dict.fromkeys(entry.doc_id for entry in result.removed))
    assert removed == ["doc-6", "doc-7", "doc-8", "doc-9"]
    assert {entry.version for entry in result.removed} == {4, 5}
    assert state.bank.documents == 6 and not state.bank.holds("doc-6")
    assert result.restored_from is not None and result.restored_from.startswith("000000000002-")
    assert state.lineage.parent == before.id and state.lineage.from_version == 3
    assert load_lineage(tmp_path / "lineage.json") == state.lineage
    assert sorted(s.memory_version for s in list_snapshots(tmp_path / "snapshots")) == [2, 3]  # 4 set aside
    assert len(list((tmp_path / "rolled_back" / before.id).iterdir())) == 1
    # retrieval forgot the removed entries too
    assert state.answer("Where does person 7 live?", 4, retrieve=True)[2] != ["doc-7"]


def test_rolled_back_state_survives_a_restart_and_goes_on_in_the_new_lineage(runner, tmp_path):
    state = live_state(runner, tmp_path)
    recorded = ingest_batches(state, 4)
    state.rollback(1, exclude=["doc-4"])
    lineage = state.lineage

    restarted = live_state(runner, tmp_path)
    restarted.restore()
    assert runner.pool_sha256() == recorded[1]
    assert restarted.lineage == lineage and restarted.view().memory_version == 1

    result = restarted.apply([document(4), document(5), document(2)])
    assert result.excluded == ["doc-4"] and result.applied == ["doc-5", "doc-2"]
    assert result.memory_version == 2 and not restarted.bank.holds("doc-4")


def test_rollback_to_version_zero_gives_the_checkpoints_own_pool(runner, tmp_path):
    state = live_state(runner, tmp_path)
    recorded = ingest_batches(state, 3)
    state.rollback(0)
    assert runner.pool_sha256() == recorded[0]
    assert len(state.bank) == 0 and state.view().memory_version == 0


def test_rollback_refusals_and_no_ops_change_nothing(runner, tmp_path):
    state = live_state(runner, tmp_path)
    ingest_batches(state, 3)
    lineage, sha = state.lineage, runner.pool_sha256()

    with pytest.raises(RollbackRefused, match="not between 0 and the current version 3"):
        state.rollback(4)
    dry = state.rollback(1, dry_run=True)
    assert list(dict.fromkeys(entry.doc_id for entry in dry.removed)) == ["doc-2", "doc-3", "doc-4", "doc-5"]
    same = state.rollback(3)  # a retried request: already there, nothing new to exclude
    assert same.removed == [] and same.checkpoint is None
    assert state.lineage == lineage and runner.pool_sha256() == sha and state.bank.documents == 6


def test_rollback_refuses_a_version_whose_tokens_compaction_dropped(runner, tmp_path):
    state = live_state(runner, tmp_path, every_batches=100)
    ingest_batches(state, 4)
    state.snapshot()  # the only checkpoint: version 4
    state.compact_bank()  # entries it covers lose their exact tokens
    sha = runner.pool_sha256()
    with pytest.raises(RollbackRefused, match="lost their exact tokens to compaction"):
        state.rollback(2)
    assert runner.pool_sha256() == sha and state.bank.documents == 8


def test_probes_ask_stored_questions_by_age_without_changing_the_memory(runner, tmp_path):
    state = live_state(runner, tmp_path)
    ingest_batches(state, 8, per_batch=2)  # 16 entries: ages 0..15
    sha, version = runner.pool_sha256(), state.view().memory_version

    report = state.probe(ProbeBudget(questions=6), seed=1)

    assert runner.pool_sha256() == sha and state.view().memory_version == version
    assert report.questions == 6 and set(report.buckets) == {"0", "1-10", "11-100"}
    assert report.buckets["0"].asked == 1 and report.degradation_loss > 0
    metrics = probe_metrics(report.to_dict())
    assert 0 <= metrics["retention/bank/em/age_1-10"] <= 1 and "degradation_loss" in metrics
    assert state.probe(ProbeBudget(questions=0)).questions == 0
    # a time budget smaller than the loss and a question were seen to cost: nothing runs
    spent = state.probe(ProbeBudget(questions=50, max_ms=0.001))
    assert spent.questions == 0 and spent.degradation_loss is None
    # unspent budgets carry over: a few calls later there is room for a question, and the time spent stays
    # within what the calls granted (plus the last item's overrun)
    share = ProbeBudget(questions=50, max_ms=report.elapsed_ms / report.questions / 3)
    reports = [state.probe(share)]
    while not reports[-1].questions:
        reports.append(state.probe(share))
        assert len(reports) < 30
    assert sum(r.elapsed_ms for r in reports) <= (len(reports) + 3) * share.max_ms + report.elapsed_ms


def test_token_f1_and_age_buckets():
    assert token_f1("the University of Oslo", "University of Oslo.") == pytest.approx(2 * 0.75 / 1.75)
    assert token_f1("Oslo", "oslo") == 1.0 and token_f1("Lima", "Oslo") == 0.0
    assert token_f1("", "") == 1.0
    ranges = {bucket.name: bucket_seqs(bucket, 2000) for bucket in BUCKETS}
    assert ranges["0"] == range(1999, 2000) and ranges["1-10"] == range(1989, 1999)
    assert ranges["101-1000"] == range(999, 1899) and ranges["over-1000"] == range(0, 999)
    assert len(bucket_seqs(BUCKETS[2], 5)) == 0


def test_sampling_spreads_the_budget_over_buckets_and_skips_entries_without_probes():
    rows = {seq: {"seq": seq, "doc_id": f"d{seq}",
                  "probes": [] if seq % 2 else [{"question": f"q{seq}", "answer": "a"}]}
            for seq in range(300)}
    probes = sample_probes(300, ProbeBudget(questions=7), lambda seqs: [rows[s] for s in seqs],
                           random.Random(0))
    by_bucket = {}
    for probe in probes:
        by_bucket.setdefault(probe.bucket, []).append(probe)
        assert probe.seq % 2 == 0 and probe.age == 299 - probe.seq and probe.question == f"q{probe.seq}"
    assert set(by_bucket) <= {"0", "1-10", "11-100", "101-1000"}
    assert "0" not in by_bucket  # the newest entry (seq 299) has no probes
    assert 5 <= len(probes) <= 7 and len(by_bucket["1-10"]) == 2


def test_repeating_a_rollback_returns_where_its_replay_starts_again(runner, tmp_path):
    """A replay cut short (ingestion still running) is finished by running the same rollback again."""
    state = live_state(runner, tmp_path)
    ingest_batches(state, 3)  # doc-0..5, offsets 0..5, partitions alternating
    first = state.rollback(1)
    assert first.replay_from == {"ckl.docs/0": 2, "ckl.docs/1": 3}  # doc-2 and doc-3 come first
    again = state.rollback(1)
    assert again.lineage == first.lineage and again.replay_from == first.replay_from
    state.apply([document(2)])
    assert state.rollback(2).replay_from == {}  # not a repeat: nothing removed, nothing to replay


def test_a_read_replica_follows_the_writers_batches_and_rollbacks(runner, checkpoint, tmp_path):
    """Two live states on the same checkpoints and bank: the replica catches up bit for bit."""
    writer = live_state(runner, tmp_path)
    replica_runner = ModelRunner(checkpoint)
    replica = live_state(replica_runner, tmp_path)
    replica.restore()
    assert replica.follow() is False  # nothing new

    ingest_batches(writer, 3)
    assert replica.follow() is True
    assert replica_runner.pool_sha256() == runner.pool_sha256()
    assert replica.view() == writer.view()
    assert replica.answer("Where does person 5 live?", 4, retrieve=True)[2] == ["doc-5"]  # new keys too

    writer.rollback(1)
    ingest_batches(writer, 1)
    assert replica.follow() is True
    assert replica.lineage == writer.lineage and replica.view() == writer.view()
    assert replica_runner.pool_sha256() == runner.pool_sha256()
