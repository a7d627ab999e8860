"""The model server: snapshots on disk, turn-taking, and a real `ckl serve` subprocess with a tiny random
model (queries, idempotent injection, tokens, limits, restart after SIGKILL, corrupt snapshots, load)."""

import json
import logging
import math
import os
import queue
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from tiny_checkpoint import make_tiny_checkpoint

from compression.settings import KEY_KINDS, RetrievalSettings, SlotFormat
from serving.app import MAX_RETRY_AFTER_S, create_app, retry_after_seconds
from serving.client import ModelServerClient, ServerError
from serving.metrics import RECENT_LATENCY_WEIGHT, ServerMetrics
from serving.process import ServerProcess, stop_running_server
from serving.runner import ModelRunner
from serving.schemas import ErrorResponse, InjectDocument, MemoryResponse
from serving.settings import ServerSettings
from serving.snapshots import (
    LEDGER_FILE,
    MEMORY_FILE,
    TEMP_PREFIX,
    CheckpointPolicy,
    CorruptSnapshot,
    list_snapshots,
    prune,
    read_snapshot,
    valid_snapshots,
    write_snapshot,
)
from serving.state import LiveState, NoValidSnapshot, open_bank
from serving.turns import ModelTurns

CONTEXT_TOKENS = 16
WRITE_TOKEN = "test-write-token"
SENTENCES = [
    "Ada Lovelace was born in London in 1815.",
    "The river flows north through the valley to the sea.",
    "Millbrook is the town on its bank, known for its mills.",
    "Kafka topics hold documents that the server injects in order.",
]


def document(doc_id: str, offset: int, sentences: int = 2, partition: int = 0) -> dict:
    text = " ".join(SENTENCES[(offset + i) % len(SENTENCES)] for i in range(sentences))
    return {"doc_id": doc_id, "text": text, "topic": "ckl.docs", "partition": partition, "offset": offset}


def flip_byte(path: Path, position: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0xFF
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------------------- snapshots on disk


def fake_memory(content: bytes = b"pool bytes"):
    def write(path: Path) -> None:
        path.write_bytes(content)

    return write


def snapshot_at(root: Path, version: int, doc_ids=("a", "b")) -> Path:
    return write_snapshot(
        root,
        memory_version=version,
        injections=3 * version,
        write_memory=fake_memory(f"pool {version}".encode()),
        applied_doc_ids=set(doc_ids),
        last_offsets={"ckl.docs": {0: 41, 2: 7}},
    ).path


def test_snapshot_round_trip_keeps_ledger_offsets_and_counts(tmp_path):
    path = snapshot_at(tmp_path, 7, doc_ids=("b", "a"))
    contents = read_snapshot(list_snapshots(tmp_path)[0])
    assert contents.info.path == path and contents.info.memory_version == 7
    assert contents.injections == 21
    assert contents.applied_doc_ids == {"a", "b"}
    assert contents.last_offsets == {"ckl.docs": {0: 41, 2: 7}}
    assert contents.memory_path.read_bytes() == b"pool 7"
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {MEMORY_FILE, LEDGER_FILE, "offsets.json"}


@pytest.mark.parametrize("damage", ["flip memory byte", "edit ledger", "delete memory", "truncate manifest"])
def test_damaged_snapshot_is_refused_naming_what_is_wrong(tmp_path, damage):
    path = snapshot_at(tmp_path, 1)
    if damage == "flip memory byte":
        flip_byte(path / MEMORY_FILE)
        expected = f"{MEMORY_FILE}: sha256"
    elif damage == "edit ledger":
        (path / LEDGER_FILE).write_text('["a", "b", "c"]')
        expected = f"{LEDGER_FILE}: sha256"
    elif damage == "delete memory":
        (path / MEMORY_FILE).unlink()
        expected = f"{MEMORY_FILE}: missing"
    else:
        (path / "manifest.json").write_text('{"format": 1, "memory_')
        expected = "manifest.json: unreadable"
    with pytest.raises(CorruptSnapshot, match=re.escape(expected)):
        read_snapshot(list_snapshots(tmp_path)[0])


def test_the_newest_valid_snapshot_skips_a_corrupt_newest_snapshot_with_a_logged_reason(tmp_path, caplog):
    snapshot_at(tmp_path, 1)
    newest = snapshot_at(tmp_path, 2)
    flip_byte(newest / MEMORY_FILE)
    with caplog.at_level(logging.ERROR, logger="serving.snapshots"):
        restored = next(valid_snapshots(tmp_path), None)
    assert restored.info.memory_version == 1
    assert f"refusing corrupt snapshot {newest}" in caplog.text


def test_failed_write_leaves_neither_snapshot_nor_temporary_directory(tmp_path):
    def failing_memory(path: Path) -> None:
        path.write_bytes(b"half a po")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_snapshot(tmp_path, memory_version=1, injections=1, write_memory=failing_memory,
                       applied_doc_ids={"a"}, last_offsets={})
    assert list(tmp_path.iterdir()) == []


def test_prune_keeps_the_newest_valid_snapshots_and_removes_stale_temporaries(tmp_path):
    paths = [snapshot_at(tmp_path, version) for version in range(1, 6)]
    flip_byte(paths[-1] / MEMORY_FILE)  # the newest is corrupt: kept for inspection, not counted
    stale = tmp_path / f"{TEMP_PREFIX}000000000006-crashed"
    stale.mkdir()
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    fresh = tmp_path / f"{TEMP_PREFIX}000000000006-being-written"
    fresh.mkdir()

    removed = prune(tmp_path, keep_last=2)

    assert sorted(removed) == sorted([paths[0], paths[1], stale])
    assert [info.memory_version for info in list_snapshots(tmp_path)] == [5, 4, 3]
    assert fresh.exists()
    assert next(valid_snapshots(tmp_path), None).info.memory_version == 4


# -------------------------------------------------------------------------------------------- turn-taking


def test_writer_and_waiting_queries_alternate_turns():
    turns = ModelTurns()
    order: list[str] = []
    release_first = threading.Event()

    def first_query() -> None:
        with turns.query():
            release_first.wait()

    def query(name: str) -> None:
        with turns.query():
            order.append(name)
            time.sleep(0.01)

    def writer() -> None:
        for step in range(3):
            with turns.update():
                order.append(f"W{step}")
                time.sleep(0.01)

    threads = [threading.Thread(target=first_query)]
    threads[0].start()
    time.sleep(0.05)
    for name in ["q0", "q1", "q2", "q3", "q4"]:
        threads.append(threading.Thread(target=query, args=(name,)))
        threads[-1].start()
        time.sleep(0.01)
    threads.append(threading.Thread(target=writer))
    threads[-1].start()
    time.sleep(0.05)
    release_first.set()
    for thread in threads:
        thread.join(timeout=10)
    assert order == ["W0", "q0", "W1", "q1", "W2", "q2", "q3", "q4"]


# ------------------------------------------------------------------------------------- a real `ckl serve`


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-checkpoint"))


def start_server(checkpoint: Path, state: Path, write_token: str | None = WRITE_TOKEN, **options):
    extra_args = ["--context-tokens", str(CONTEXT_TOKENS)]
    return ServerProcess(checkpoint, state, write_token, extra_args=extra_args, **options).start()


@pytest.fixture
def fresh_server(checkpoint, tmp_path) -> Iterator[ServerProcess]:
    """A server of its own (its own snapshots) for tests that kill and restart it."""
    server = start_server(checkpoint, tmp_path / "state")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory) -> Iterator[ServerProcess]:
    server = start_server(checkpoint, tmp_path_factory.mktemp("serve-state"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def client(server) -> Iterator[ModelServerClient]:
    with ModelServerClient(server.url, token=WRITE_TOKEN) as client:
        yield client


def test_query_returns_an_answer_and_the_memory_version(client):
    result = client.query("Where was Ada Lovelace born?", max_new_tokens=8)
    assert isinstance(result.answer, str) and "\n" not in result.answer
    assert result.memory_version == client.memory().memory_version


def test_inject_applies_each_doc_once_and_a_redelivery_changes_nothing(client):
    before = client.memory()
    batch = [document("inject-a", 10, sentences=3), document("inject-b", 11), document("inject-a", 12)]
    expected_contexts = sum(
        math.ceil(len(client_tokens) / CONTEXT_TOKENS) for client_tokens in _token_counts(client, batch[:2])
    )

    result = client.inject(batch)

    assert result.applied == ["inject-a", "inject-b"]
    assert result.skipped_duplicates == ["inject-a"]  # repeated within the batch: the first one counts
    assert result.injections == expected_contexts and expected_contexts > 2
    assert result.memory_version == before.memory_version + 1
    after = client.memory()
    assert after.injections == before.injections + expected_contexts
    assert after.documents_applied == before.documents_applied + 2
    assert after.last_offsets["ckl.docs"][0] >= 12

    again = client.inject(batch[:2])

    assert again.applied == [] and again.skipped_duplicates == ["inject-a", "inject-b"]
    assert again.injections == 0 and again.memory_version == after.memory_version
    assert client.memory() == after


def test_queries_retrieve_the_bank_entry_they_ask_about_unless_told_not_to(client):
    client.inject([
        {"doc_id": "bank-curie", "text": "Marie Curie was born in Warsaw and studied in Paris.",
         "topic": "ckl.docs", "partition": 1, "offset": 100,
         "probes": [{"question": "Where was Marie Curie born?", "answer": "Warsaw"}]},
        {"doc_id": "bank-turing", "text": "Alan Turing was born in London and worked at Bletchley Park.",
         "topic": "ckl.docs", "partition": 1, "offset": 101},
    ])

    assert client.query("Where was Marie Curie born?", max_new_tokens=4).retrieved == ["bank-curie"]
    assert client.query("What did Alan Turing work on?", max_new_tokens=4).retrieved == ["bank-turing"]
    assert client.query("Where was Marie Curie born?", max_new_tokens=4, retrieve=False).retrieved == []
    retrieval = client.health().retrieval
    assert retrieval.enabled and retrieval.top_k == 1 and retrieval.keys == "bm25"


def _token_counts(client: ModelServerClient, documents: list[dict]) -> list[list[int]]:
    """The documents' token ids, with the checkpoint's own tokenizer."""
    from model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(client.health().checkpoint)
    return [tokenizer(d["text"], add_special_tokens=False).input_ids for d in documents]


def test_writes_need_the_bearer_token_and_reads_are_open(server):
    body = {"documents": [document("token-doc", 1)]}
    missing = httpx.post(f"{server.url}/v1/inject", json=body)
    wrong = httpx.post(f"{server.url}/v1/snapshots", headers={"Authorization": "Bearer nope"})
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert "missing bearer token" in missing.json()["detail"]
    assert wrong.status_code == 401 and "invalid bearer token" in wrong.json()["detail"]
    query = {"question": "Who?", "max_new_tokens": 2}
    assert httpx.post(f"{server.url}/v1/query", json=query).status_code == 200
    assert httpx.get(f"{server.url}/v1/memory").json()["documents_applied"] >= 0
    with ModelServerClient(server.url) as anonymous, pytest.raises(ServerError) as error:
        anonymous.inject([document("token-doc", 1)])
    assert error.value.status == 401


def test_limits_are_refused_with_clear_4xx_messages(server):
    limits = httpx.get(f"{server.url}/v1/health").json()["limits"]
    headers = {"Authorization": f"Bearer {WRITE_TOKEN}"}
    too_many = [document(f"d{i}", i) for i in range(limits["max_batch_documents"] + 1)]
    cases = [
        ("/v1/query", {"question": "x" * (limits["max_question_chars"] + 1)}, 413, "over the limit of"),
        ("/v1/query", {"question": "Who?", "max_new_tokens": limits["max_new_tokens"] + 1}, 422, "max_new"),
        ("/v1/query", {"question": ""}, 422, "at least 1 character"),
        ("/v1/inject", {"documents": too_many}, 413, "documents, over the limit"),
        ("/v1/inject", {"documents": [{**document("big", 1), "text": "y" * (limits["max_text_chars"] + 1)}]},
         413, "'big' has"),
        ("/v1/inject", {"documents": [{**document("blank", 1), "text": "   "}]}, 422, "non-whitespace"),
        ("/v1/inject", {"documents": [{"doc_id": "no-offset", "text": "t", "topic": "t", "partition": 0}]},
         422, "offset"),
    ]
    memory_before = httpx.get(f"{server.url}/v1/memory").json()
    for path, body, status, message in cases:
        response = httpx.post(f"{server.url}{path}", json=body, headers=headers)
        assert response.status_code == status, (path, response.text)
        assert message in response.text, (path, response.text)
    assert httpx.get(f"{server.url}/v1/memory").json() == memory_before


def test_metrics_are_in_prometheus_text_format(server, client):
    client.query("Where is Millbrook?", max_new_tokens=2)
    httpx.post(f"{server.url}/v1/inject", json={"documents": []})  # 401: counted as an error
    httpx.get(f"{server.url}/no/such/path/42")  # 404: counted under one label for all unknown paths
    response = httpx.get(f"{server.url}/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")

    samples: dict[str, float] = {}
    types: dict[str, str] = {}
    for line in response.text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            types[name] = kind
        elif not line.startswith("# HELP "):
            match = re.fullmatch(r'([a-z_]+)(\{[a-z_]+="[^"]*"(?:,[a-z_]+="[^"]*")*\})? (\S+)', line)
            assert match, f"not a sample line: {line!r}"
            samples[match.group(1) + (match.group(2) or "")] = float(match.group(3))

    assert types["ckl_query_latency_seconds"] == "histogram" and types["ckl_queries_total"] == "counter"
    assert samples["ckl_queries_total"] >= 1
    buckets = [value for key, value in samples.items() if key.startswith("ckl_query_latency_seconds_bucket")]
    assert buckets == sorted(buckets) and buckets[-1] == samples["ckl_query_latency_seconds_count"]
    assert samples['ckl_errors_total{path="/v1/inject",status="401"}'] >= 1
    assert samples['ckl_errors_total{path="unmatched",status="404"}'] >= 1
    assert "no/such/path" not in response.text
    for name in ("ckl_injections_total", "ckl_documents_applied_total", "ckl_memory_version"):
        assert name in samples


def test_openapi_page_documents_every_endpoint_and_the_bearer_scheme(server):
    spec = httpx.get(f"{server.url}/openapi.json").json()
    assert set(spec["paths"]) == {
        "/v1/query", "/v1/inject", "/v1/snapshots", "/v1/snapshots/prune", "/v1/memory", "/v1/health",
        "/v1/bank/compact", "/v1/probe", "/v1/rollback",
        "/metrics",
    }
    assert spec["paths"]["/v1/inject"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert "InjectDocument" in spec["components"]["schemas"]
    assert httpx.get(f"{server.url}/docs").status_code == 200

    # every status the routes answer with is declared, the refusals with their {"detail": ...} body
    responses = {(method.upper(), path): operation["responses"]
                 for path, operations in spec["paths"].items() for method, operation in operations.items()}
    read, write, body = {"200", "401"}, {"200", "401", "503"}, {"400", "413", "422"}
    assert {operation: set(declared) for operation, declared in responses.items()} == {
        ("POST", "/v1/query"): read | body | {"503"},
        ("POST", "/v1/inject"): write | body,
        ("POST", "/v1/probe"): write | body,
        ("POST", "/v1/rollback"): write | body | {"409"},
        ("POST", "/v1/snapshots/prune"): write | body,
        ("POST", "/v1/snapshots"): write,
        ("POST", "/v1/bank/compact"): write,
        ("GET", "/v1/snapshots"): read, ("GET", "/v1/memory"): read, ("GET", "/v1/health"): read,
        ("GET", "/metrics"): read,
    }
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    for declared in responses.values():
        assert all(response["content"]["application/json"]["schema"] == error
                   for status, response in declared.items() if status not in ("200", "422"))
        assert "WWW-Authenticate" in declared["401"]["headers"]
    assert "Retry-After" in responses[("POST", "/v1/query")]["503"]["headers"]
    assert spec["components"]["schemas"]["ErrorResponse"]["required"] == ["detail"]


def test_queries_during_a_batch_see_the_old_or_the_new_memory_never_errors(server, client):
    before = client.memory()
    batch = [document(f"concurrent-{i}", 100 + i, sentences=4, partition=1) for i in range(20)]
    done = threading.Event()
    inject_window: list[float] = []
    answers: list[tuple[float, int]] = []  # (completion time, memory version)
    memory_views: list[tuple[int, int, int]] = []
    errors: list[str] = []

    def inject() -> None:
        inject_window.append(time.monotonic())
        try:
            client.inject(batch)
        finally:
            inject_window.append(time.monotonic())
            done.set()

    def ask(index: int) -> None:
        with ModelServerClient(server.url) as reader:
            while True:
                finished = done.is_set()
                try:
                    result = reader.query(f"Question {index}: where does the river flow?", max_new_tokens=4)
                    answers.append((time.monotonic(), result.memory_version))
                except Exception as error:  # any failure is what this test looks for
                    errors.append(repr(error))
                if finished:
                    return

    def watch_memory() -> None:
        with ModelServerClient(server.url) as reader:
            while not done.is_set():
                view = reader.memory()
                memory_views.append((view.memory_version, view.injections, view.documents_applied))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(50)]
    threads.append(threading.Thread(target=watch_memory))
    for thread in threads:
        thread.start()
    time.sleep(0.5)  # the query clients are busy before the batch arrives
    injector = threading.Thread(target=inject)
    injector.start()
    for thread in [injector, *threads]:
        thread.join(timeout=120)

    after = client.memory()
    assert not errors
    assert after.memory_version == before.memory_version + 1
    assert after.documents_applied == before.documents_applied + 20
    assert {version for _, version in answers} == {before.memory_version, after.memory_version}
    started, finished = inject_window
    assert any(started < at < finished for at, version in answers if version == before.memory_version)
    old_view = (before.memory_version, before.injections, before.documents_applied)
    new_view = (after.memory_version, after.injections, after.documents_applied)
    assert set(memory_views) <= {old_view, new_view}


def test_snapshot_then_sigkill_then_restart_restores_the_same_state_and_answers(fresh_server):
    question = "Where was Ada Lovelace born?"
    with ModelServerClient(fresh_server.url, token=WRITE_TOKEN) as client:
        client.inject([document("kept-a", 5, sentences=3), document("kept-b", 3, partition=2)])
        state_before, answer_before = client.memory(), client.query(question, max_new_tokens=8)
        snapshot = client.snapshot()
        assert client.snapshot() == snapshot  # nothing changed: no second snapshot
        assert [s.id for s in client.snapshots()] == [snapshot.id]
        assert snapshot.memory_version == state_before.memory_version == 1

    url = fresh_server.url
    fresh_server.kill()
    fresh_server.start()

    assert fresh_server.url == url  # back on the same port: clients keep their URL
    with ModelServerClient(fresh_server.url, token=WRITE_TOKEN) as client:
        assert client.memory() == state_before
        assert client.memory().last_offsets == {"ckl.docs": {0: 5, 2: 3}}
        assert client.query(question, max_new_tokens=8) == answer_before
        redelivered = client.inject([document("kept-a", 5, sentences=3), document("kept-b", 3, partition=2)])
        assert redelivered.applied == [] and client.memory() == state_before
    assert f"restored snapshot {snapshot.path}" in fresh_server.log()


def test_without_any_checkpoint_a_killed_server_replays_its_bank_to_the_same_pool_bit_for_bit(fresh_server):
    with ModelServerClient(fresh_server.url, token=WRITE_TOKEN) as client:
        client.inject([document("wal-a", 1, sentences=3)])
        client.inject([document("wal-b", 2), document("wal-c", 3, partition=1)])
        before = client.memory()
        assert client.snapshots() == []  # checkpoints are periodic: none is due after two batches

    fresh_server.kill()
    fresh_server.start()

    with ModelServerClient(fresh_server.url, token=WRITE_TOKEN) as client:
        assert client.memory() == before  # pool_sha256 included: the bank's replay is exact
        assert client.inject([document("wal-b", 2)]).applied == []
    assert f"replayed the whole bank ({before.bank_entries} entries)" in fresh_server.log()


def test_a_fresh_server_applies_a_first_document_shorter_than_k_and_a_restart_replays_it(fresh_server):
    """Into the checkpoint's empty pool a context of T < K tokens gives k = T new tokens, tiled over the pool;
    the bank keeps that short entry, retrieves it, and a restart replays it to the same pool."""
    with ModelServerClient(fresh_server.url, token=WRITE_TOKEN) as client:
        assert client.memory().injections == 0
        assert client.inject([document("short", 0) | {"text": "Oslo"}]).applied == ["short"]
        assert client.inject([document("after", 1)]).applied == ["after"]
        assert client.query("Oslo", max_new_tokens=2, retrieve=True).retrieved[0] == "short"
        before = client.memory()
        assert before.documents_applied == 2 and client.snapshots() == []

    fresh_server.kill()
    fresh_server.start()

    with ModelServerClient(fresh_server.url, token=WRITE_TOKEN) as client:
        assert client.memory() == before  # pool_sha256 included
    assert f"replayed the whole bank ({before.bank_entries} entries)" in fresh_server.log()


def test_compaction_keeps_what_the_oldest_checkpoint_needs_and_the_state_restores_after_it(fresh_server):
    with ModelServerClient(fresh_server.url, token=WRITE_TOKEN) as client:
        client.inject([document("compact-a", 1)])
        checkpoint, at_checkpoint = client.snapshot(), client.memory().injections
        client.inject([document("compact-b", 2)])
        result = client.compact_bank()
        before = client.memory()
    assert result.covered_seq == result.entries_without_tokens == at_checkpoint > 0

    fresh_server.kill()
    fresh_server.start()

    with ModelServerClient(fresh_server.url, token=WRITE_TOKEN) as client:
        assert client.memory() == before
    assert f"restored snapshot {checkpoint.path}" in fresh_server.log()


@pytest.fixture
def runner(checkpoint) -> Iterator[ModelRunner]:
    """The tiny checkpoint hosted in this process; the distributed defaults DeepSpeed sets are undone."""
    saved = dict(os.environ)
    try:
        yield ModelRunner(checkpoint)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def live_state(runner: ModelRunner, state_dir: Path) -> LiveState:
    """A live state laid out as `ckl serve` lays it out in `state_dir` (snapshots/, bank/)."""
    bank, retriever = open_bank(runner, str(state_dir / "bank"), SlotFormat(), RetrievalSettings())
    return LiveState(runner, state_dir / "snapshots", bank, retriever, CONTEXT_TOKENS)


def test_queries_over_the_waiting_cap_get_503_and_writes_are_not_refused(runner, checkpoint, tmp_path):
    """The real app over a live state, with the model's turn held as a batch's context holds it: one query is
    handed to the model, `max_waiting_queries` (1) wait, the rest are refused at once with 503, Retry-After
    and a {"detail": ...} body, and counted; an inject is taken up meanwhile; once the turn is released the
    waiting queries and the inject are answered, and new queries are accepted again."""
    state = live_state(runner, tmp_path)
    settings = ServerSettings(checkpoint, tmp_path / "snapshots", context_tokens=CONTEXT_TOKENS,
                              write_token=WRITE_TOKEN, max_waiting_queries=1)
    question = {"question": "Where was Ada Lovelace born?", "max_new_tokens": 2}
    answers: queue.Queue[httpx.Response] = queue.Queue()
    with TestClient(create_app(state, settings, ServerMetrics())) as http:

        def ask() -> None:
            answers.put(http.post("/v1/query", json=question))

        def refused_total() -> float:
            metrics = http.get("/metrics").text
            refused = r'^ckl_errors_total\{path="/v1/query",status="503"\} (\S+)$'
            return float(re.search(refused, metrics, re.MULTILINE).group(1))

        inject_answer: list[httpx.Response] = []
        inject = threading.Thread(target=lambda: inject_answer.append(
            http.post("/v1/inject", json={"documents": [document("capped", 1)]},
                      headers={"Authorization": f"Bearer {WRITE_TOKEN}"})))
        askers = [threading.Thread(target=ask) for _ in range(4)]
        try:
            with state.model_turns.update():  # the model is busy: no query can be answered
                for thread in askers:
                    thread.start()
                refused = [answers.get(timeout=30) for _ in range(2)]  # 1 handed over + 1 waiting: 2 over
                for response in refused:
                    assert response.status_code == 503, response.text
                    assert response.headers["retry-after"] == "1"
                    detail = ErrorResponse.model_validate(response.json(), strict=True).detail
                    assert set(response.json()) == {"detail"} and "(the limit is 1)" in detail
                assert refused_total() == 2
                assert http.get("/v1/health").status_code == 200  # cheap reads are not capped either
                inject.start()
                time.sleep(0.5)
                assert inject.is_alive()  # waiting for the model, not refused
                assert answers.empty()  # the two admitted queries still wait
        finally:  # the turn is released: every request ends before the app shuts down
            for thread in [inject, *askers]:
                if thread.is_alive():
                    thread.join(timeout=60)

        answered = [answers.get_nowait() for _ in range(2)]
        assert [response.status_code for response in answered] == [200, 200]
        assert inject_answer[0].status_code == 200 and inject_answer[0].json()["applied"] == ["capped"]
        assert http.post("/v1/query", json=question).status_code == 200
        assert refused_total() == 2


def test_a_refused_query_is_told_to_wait_about_as_long_as_recent_queries_took(runner, checkpoint, tmp_path):
    """After queries that took 2.4 s from arrival to answer, a query refused for the waiting queries is told
    to retry in 3 s (header and detail); the wait told is whole seconds from 1 to MAX_RETRY_AFTER_S."""
    assert [retry_after_seconds(s) for s in (None, 0.003, 1.0, 2.4, 1e9)] == [1, 1, 1, 3, MAX_RETRY_AFTER_S]
    metrics = ServerMetrics()
    for seconds in (2.0, 2.0, 4.0):
        metrics.observe_query(seconds)
    assert metrics.recent_query_seconds() == pytest.approx(2.0 + RECENT_LATENCY_WEIGHT * 2.0)

    state = live_state(runner, tmp_path)
    settings = ServerSettings(checkpoint, tmp_path / "snapshots", context_tokens=CONTEXT_TOKENS,
                              max_waiting_queries=0)
    metrics = ServerMetrics()
    metrics.observe_query(2.4)
    question = {"question": "Where was Ada Lovelace born?", "max_new_tokens": 2}
    answers: queue.Queue[httpx.Response] = queue.Queue()
    with TestClient(create_app(state, settings, metrics)) as http:
        askers = [threading.Thread(target=lambda: answers.put(http.post("/v1/query", json=question)))
                  for _ in range(2)]
        try:
            with state.model_turns.update():  # one query is handed to the model and waits; none more may
                for thread in askers:
                    thread.start()
                refused = answers.get(timeout=30)
        finally:
            for thread in askers:
                thread.join(timeout=60)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "3"
    assert refused.json()["detail"].endswith("retry in 3 s")
    assert answers.get_nowait().status_code == 200


def test_corrupt_newest_snapshot_is_refused_and_the_previous_one_restored_plus_bank_replay(
    runner, checkpoint, tmp_path
):
    state_dir = tmp_path / "state"
    writer = live_state(runner, state_dir)  # snapshots and bank as a server writes them
    writer.apply([InjectDocument(**document("first", 1))])
    first = writer.snapshot()
    writer.apply([InjectDocument(**document("second", 2))])
    second_view, second = writer.view(), writer.snapshot()
    second_pool = runner.pool_sha256()
    flip_byte(second.path / MEMORY_FILE)

    server = start_server(checkpoint, state_dir)
    try:
        log = server.log()
        assert f"refusing corrupt snapshot {second.path}: {MEMORY_FILE}: sha256" in log
        assert f"restored snapshot {first.path}" in log
        assert re.search(r"replayed \d+ bank entries", log)
        with ModelServerClient(server.url, token=WRITE_TOKEN) as client:
            # the older checkpoint + the bank's entry after it = the state the corrupt snapshot held
            assert client.memory() == MemoryResponse(**asdict(second_view), bank_entries=len(writer.bank),
                                                     pool_sha256=second_pool, lineage=writer.lineage.id)
            assert client.inject([document("second", 2)]).applied == []
    finally:
        server.stop()


def test_restore_refuses_to_start_empty_when_no_snapshot_verifies(runner, tmp_path):
    writer = live_state(runner, tmp_path)
    writer.apply([InjectDocument(**document("only", 1))])
    only = writer.snapshot()
    (only.path / LEDGER_FILE).write_text("[]")

    with pytest.raises(NoValidSnapshot, match=f"none of the 1 snapshots in {tmp_path / 'snapshots'}"):
        live_state(runner, tmp_path).restore()


def test_snapshot_is_written_again_only_when_memory_ledger_or_offsets_changed(runner, tmp_path):
    state = live_state(runner, tmp_path)
    state.apply([InjectDocument(**document("a", 1))])
    first = state.snapshot()
    assert state.snapshot() == first
    state.apply([InjectDocument(**document("a", 1))])  # a redelivery at the same offset: no change
    assert state.snapshot() == first
    state.apply([InjectDocument(**document("a", 9))])  # a redelivery at a later offset moves the offsets
    second = state.snapshot()
    assert second != first and read_snapshot(second).last_offsets == {"ckl.docs": {0: 9}}
    assert [info.path for info in list_snapshots(tmp_path / "snapshots")] == [second.path, first.path]


def test_without_write_token_writes_are_refused_and_a_read_token_guards_reads(checkpoint, tmp_path):
    server = start_server(checkpoint, tmp_path / "state", write_token=None, read_token="reader")
    try:
        assert httpx.get(f"{server.url}/v1/memory").status_code == 401
        with ModelServerClient(server.url, token="reader") as reader:
            assert reader.health().writes_enabled is False
            with pytest.raises(ServerError) as refused:
                reader.inject([document("nope", 1)])
        assert refused.value.status == 503 and "CKL_WRITE_TOKEN" in str(refused.value)
    finally:
        server.stop()


def test_stop_running_server_shuts_down_the_server_its_state_dir_names(checkpoint, tmp_path):
    server = start_server(checkpoint, tmp_path / "state")
    try:
        assert stop_running_server(server.state)  # what `ckl serve --stop` does
        assert server.wait_gone(30)
        assert "Application shutdown complete" in server.log()
        assert not (server.state / "server.json").exists()
    finally:
        server.kill()


@pytest.mark.parametrize("values,field", [
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"query_concurrency": 0}, "query_concurrency"),
    ({"max_body_bytes": -1}, "max_body_bytes"), ({"max_waiting_queries": -1}, "max_waiting_queries"),
    ({"context_tokens": 0}, "context_tokens"), ({"follow_s": 0.0}, "follow_s"),
    ({"follow_s": math.inf}, "follow_s"),
])
def test_server_settings_refuse_impossible_limits_by_name(tmp_path, values, field):
    with pytest.raises(ValueError, match=field):
        ServerSettings(tmp_path, tmp_path / "snapshots", **values)
    allowed = ServerSettings(tmp_path, tmp_path / "snapshots", max_waiting_queries=0, follow_s=0.5)
    assert (allowed.max_waiting_queries, allowed.follow_s) == (0, 0.5)


def test_retrieval_settings_refuse_an_unknown_key_index():
    with pytest.raises(ValueError, match="unknown key index kind 'tfidf'"):
        RetrievalSettings(keys="tfidf")
    assert [RetrievalSettings(keys=kind).keys for kind in KEY_KINDS] == list(KEY_KINDS)


@pytest.mark.parametrize("every_batches,every_s", [(0, 60.0), (10, 0.0), (10, math.inf), (10, math.nan)])
def test_checkpoint_policy_refuses_impossible_intervals(every_batches, every_s):
    with pytest.raises(ValueError, match="checkpoint every"):
        CheckpointPolicy(every_batches, every_s)
    assert CheckpointPolicy(1, 0.5).every_batches == 1
