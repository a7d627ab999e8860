"""Ingestion end to end on real services: the real broker, the real MLflow server and a real `ckl serve`
(tiny random model). `ckl ingest` as a user runs it, exactly once under SIGKILLs of the ingestion process
at every step of a batch and of the server mid-batch, and the Airflow DAGs `ckl_ingest` and
`ckl_maintenance`."""

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from dead_letters import dead_letters
from repo_dags import load_dag
from tiny_checkpoint import make_tiny_checkpoint

from model.tokenizer import load_tokenizer
from monitoring.tracking import MLFLOW_URI_ENV, experiment_name
from pipelines.kafka_io import DLQ_TOPIC, consumer_lag, ensure_topics, make_producer
from pipelines.settings import BOOTSTRAP_ENV, SERVER_URL_ENV
from runtime.faults import CRASH_ENV
from serving.client import ModelServerClient
from serving.process import ServerProcess, ckl_command
from serving.settings import WRITE_TOKEN_ENV

WRITE_TOKEN = "test-ingest-token"
CONTEXT_TOKENS = 96  # every test document fits one context
DOCS = 10
BATCH_SIZE = 4
AFTER_CRASH_POLL_TIMEOUT_S = 15  # longer than the broker's session timeout of the killed consumer
SERVER_ENV = {"OMP_NUM_THREADS": "1"}  # the machine is shared; one thread per server is plenty
CRASH_STEPS = ["after_consume", "after_inject", "before_commit"]
# where the model server dies: computing the batch, writing its bank entries (data files written, commit
# not), and after the entries are durable but before the batch is published and answered
# (a minute each: the default suite kills it mid-append; the other two run with the slow tests)
SERVER_CRASH_STEPS = [pytest.param("mid_inject", marks=pytest.mark.slow), "mid_append",
                      pytest.param("after_append", marks=pytest.mark.slow)]
BATCH_METRICS = {"documents", "dlq", "injections", "injection_ms", "documents_per_s", "memory_version"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-checkpoint"))


def server_process(checkpoint: Path, state: Path, **env: str) -> ServerProcess:
    extra_args = ["--context-tokens", str(CONTEXT_TOKENS)]
    return ServerProcess(checkpoint, state, WRITE_TOKEN, extra_args=extra_args, env=SERVER_ENV | env)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory) -> Iterator[ServerProcess]:
    """One server for the module; tests compare its counters before and after their own documents."""
    server = server_process(checkpoint, tmp_path_factory.mktemp("serve-state")).start()
    try:
        yield server
    finally:
        server.stop()


def memory_counts(server: ServerProcess) -> tuple[int, int]:
    """(documents applied, contexts injected) as the server reports them."""
    with ModelServerClient(server.url) as client:
        memory = client.memory()
    return memory.documents_applied, memory.injections


def publish(bootstrap: str, topic: str, valid: int, invalid: int = 0) -> list[str]:
    """`invalid` malformed messages, then `valid` short one-context documents, on a new 2-partition topic;
    returns the valid doc_ids."""
    ensure_topics(bootstrap, {topic: 2, DLQ_TOPIC: 1})
    doc_ids = [f"{topic}-{i}" for i in range(valid)]
    producer = make_producer(bootstrap)
    try:
        for i in range(invalid):
            producer.send(topic, json.dumps({"doc_id": f"{topic}-bad-{i}"}).encode())  # no text
        for i, doc_id in enumerate(doc_ids):
            document = {"doc_id": doc_id, "text": f"Fact {i}: the mill by the river opened in {1800 + i}."}
            producer.send(topic, json.dumps(document).encode())
        producer.flush()
    finally:
        producer.close()
    return doc_ids


def ingest(kafka, mlflow_server, server: ServerProcess, topic: str,
           crash_at: str | None = None, poll_timeout: float = 5) -> subprocess.CompletedProcess:
    """`ckl ingest --until-drained` in a subprocess, optionally set to SIGKILL itself at `crash_at`.

    After a killed consumer, the broker hands its partitions on only once its session times out (10 s):
    a rerun needs a longer `poll_timeout`, or its first poll comes back empty and it stops.
    """
    command = [ckl_command(), "ingest", "--until-drained", "--bootstrap", kafka.bootstrap,
               "--server", server.url, "--mlflow-uri", mlflow_server.uri, "--topic", topic, "--group", topic,
               "--batch-size", str(BATCH_SIZE), "--poll-timeout", str(poll_timeout)]
    env = {name: value for name, value in os.environ.items() if name != CRASH_ENV}
    env[WRITE_TOKEN_ENV] = WRITE_TOKEN
    if crash_at:
        env[CRASH_ENV] = crash_at
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def assert_each_document_applied_once(
    kafka, server: ServerProcess, topic: str, before: tuple[int, int]
) -> None:
    documents, injections = memory_counts(server)
    assert documents - before[0] == DOCS  # the ledger: none lost, none counted twice
    assert injections - before[1] == DOCS  # one context per document: none injected twice
    assert consumer_lag(kafka.bootstrap, topic, topic) == 0


def test_ingest_until_drained_applies_valid_docs_dead_letters_bad_ones_and_logs_each_batch(
    kafka, mlflow_server, server, topic_name
):
    import mlflow

    doc_ids = publish(kafka.bootstrap, topic_name, DOCS, invalid=2)
    before = memory_counts(server)

    result = ingest(kafka, mlflow_server, server, topic_name)

    assert result.returncode == 0, result.stderr[-3000:]
    assert "messages consumed: 12\n" in result.stdout
    assert f"documents applied: {DOCS} ({DOCS} contexts injected)\n" in result.stdout
    assert "skipped as duplicates: 0\n" in result.stdout
    assert "sent to the dead-letter topic: 2" in result.stdout
    assert_each_document_applied_once(kafka, server, topic_name, before)
    letters = dead_letters(kafka.bootstrap, topic_name)
    assert sorted(json.loads(letter.value)["doc_id"] for letter in letters) == [
        f"{topic_name}-bad-0", f"{topic_name}-bad-1"
    ]

    client = mlflow.MlflowClient(tracking_uri=mlflow_server.uri)
    experiment = client.get_experiment_by_name(experiment_name())
    runs = client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.topic = '{topic_name}' AND tags.`ckl.kind` = 'batch'")
    assert len(runs) == 3  # 12 messages in batches of 4
    # nested under the server's lineage run, which holds every batch's metrics at step = memory version
    lineage_run = client.get_run(runs[0].data.tags["mlflow.parentRunId"])
    assert lineage_run.data.tags["ckl.kind"] == "lineage"
    assert lineage_run.data.tags["ckl.lineage"] == runs[0].data.tags["lineage"]
    assert lineage_run.data.params["batch_size"] == str(BATCH_SIZE)
    steps = {metric.step for metric in client.get_metric_history(lineage_run.info.run_id, "documents")}
    assert {int(run.data.tags["memory_version"]) for run in runs} <= steps
    assert all(len(run.data.tags["pool_sha256"]) == 64 for run in runs)
    assert all(BATCH_METRICS <= set(run.data.metrics) for run in runs)
    assert sum(run.data.metrics["documents"] for run in runs) == len(doc_ids)
    assert sum(run.data.metrics["dlq"] for run in runs) == 2
    assert sum(run.data.metrics["injections"] for run in runs) == DOCS
    offset_tags = [{k: v for k, v in run.data.tags.items() if k.startswith("next_offset.")}
                   for run in runs]
    assert all(offset_tags)
    next_offsets = {k: max(int(tags.get(k, 0)) for tags in offset_tags)
                    for k in ("next_offset.0", "next_offset.1")}
    assert sum(next_offsets.values()) == 12  # the next offsets after every message of both partitions


def test_documents_longer_than_one_context_are_applied_once_with_a_bank_entry_per_context(
    kafka, mlflow_server, server, checkpoint, topic_name
):
    texts = [" ".join(f"Line {line} of report {i}: the mill by the river ground {line * 7} sacks of grain."
                      for line in range(12)) for i in range(3)]
    tokenizer = load_tokenizer(checkpoint)
    lengths = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]
    contexts = [-(-length // CONTEXT_TOKENS) for length in lengths]
    assert all(count > 1 for count in contexts)  # the test needs documents of several contexts
    ensure_topics(kafka.bootstrap, {topic_name: 2, DLQ_TOPIC: 1})
    producer = make_producer(kafka.bootstrap)
    try:
        for i, text in enumerate(texts):
            producer.send(topic_name, json.dumps({"doc_id": f"{topic_name}-long-{i}", "text": text}).encode())
        producer.flush()
    finally:
        producer.close()
    with ModelServerClient(server.url) as client:
        before = client.memory()

    result = ingest(kafka, mlflow_server, server, topic_name)

    assert result.returncode == 0, result.stderr[-3000:]
    assert f"documents applied: {len(texts)} ({sum(contexts)} contexts injected)\n" in result.stdout
    with ModelServerClient(server.url) as client:
        after = client.memory()
    assert after.documents_applied - before.documents_applied == len(texts)
    assert after.injections - before.injections == sum(contexts)
    assert after.bank_entries - before.bank_entries == sum(contexts)  # one entry per context, in one append
    assert consumer_lag(kafka.bootstrap, topic_name, topic_name) == 0


@pytest.mark.parametrize("step", CRASH_STEPS)
def test_ingest_killed_at_each_step_then_rerun_applies_every_document_exactly_once(
    kafka, mlflow_server, server, topic_name, step
):
    publish(kafka.bootstrap, topic_name, DOCS, invalid=2)
    before = memory_counts(server)

    crashed = ingest(kafka, mlflow_server, server, topic_name, crash_at=step)
    assert crashed.returncode == -9, crashed.stderr[-3000:]
    assert consumer_lag(kafka.bootstrap, topic_name, topic_name) == DOCS + 2  # died before its first commit

    rerun = ingest(kafka, mlflow_server, server, topic_name, poll_timeout=AFTER_CRASH_POLL_TIMEOUT_S)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_each_document_applied_once(kafka, server, topic_name, before)
    # the first batch dead-lettered before the crash; its redelivery does not do it again
    letters = dead_letters(kafka.bootstrap, topic_name)
    assert sorted(json.loads(letter.value)["doc_id"] for letter in letters) == [
        f"{topic_name}-bad-0", f"{topic_name}-bad-1"
    ]


@pytest.mark.parametrize("step", SERVER_CRASH_STEPS)
def test_server_killed_mid_batch_then_restarted_from_checkpoint_and_bank_applies_every_document_once(
    kafka, mlflow_server, checkpoint, tmp_path, topic_name, step
):
    publish(kafka.bootstrap, topic_name, DOCS)
    server = server_process(checkpoint, tmp_path / "state", **{CRASH_ENV: step}).start()
    try:
        failed = ingest(kafka, mlflow_server, server, topic_name)
        assert failed.returncode not in (0, -9)
        assert "ServerUnreachable" in failed.stderr
        assert server.wait_exit(30) == -9  # the server died inside the batch
        assert consumer_lag(kafka.bootstrap, topic_name, topic_name) == DOCS

        server.env.pop(CRASH_ENV)
        server.start()  # same port; restores its checkpoint (none here) and replays its bank
        rerun = ingest(kafka, mlflow_server, server, topic_name, poll_timeout=AFTER_CRASH_POLL_TIMEOUT_S)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert_each_document_applied_once(kafka, server, topic_name, before=(0, 0))
    finally:
        server.stop()


@pytest.fixture
def service_env(monkeypatch, kafka, mlflow_server, server) -> None:
    """The CKL_* variables that point the DAG tasks at the test's services."""
    for name, value in {BOOTSTRAP_ENV: kafka.bootstrap, MLFLOW_URI_ENV: mlflow_server.uri,
                        SERVER_URL_ENV: server.url, WRITE_TOKEN_ENV: WRITE_TOKEN}.items():
        monkeypatch.setenv(name, value)


def test_ckl_ingest_dag_applies_one_batch_per_run_and_commits_its_offsets(
    airflow_home, service_env, kafka, server, topic_name
):
    publish(kafka.bootstrap, topic_name, DOCS)
    before = memory_counts(server)
    dag = load_dag("ckl_ingest")
    applied_before_run = 0
    for _ in (1, 2):
        run = dag.test(run_conf={"topic": topic_name, "group": topic_name, "batch_size": BATCH_SIZE})
        assert run.state == "success"
        documents, injections = memory_counts(server)
        applied = documents - before[0]
        # one batch: up to BATCH_SIZE documents (a poll idle for 0.5 s ends a batch early on a busy machine)
        assert 1 <= applied - applied_before_run <= BATCH_SIZE
        assert injections - before[1] == applied
        assert consumer_lag(kafka.bootstrap, topic_name, topic_name) == DOCS - applied  # offsets committed
        applied_before_run = applied


def test_ckl_maintenance_dag_prunes_snapshots_on_the_server_down_to_keep_last(
    airflow_home, service_env, kafka, server, topic_name
):
    with ModelServerClient(server.url, token=WRITE_TOKEN) as client:
        for i in range(3):  # one new snapshot per document
            client.inject([{"doc_id": f"{topic_name}-prune-{i}", "text": "A short fact.",
                            "topic": topic_name, "partition": 0, "offset": i}])
            client.snapshot()
        assert len(client.snapshots()) >= 3
        newest = [snapshot.id for snapshot in client.snapshots()[:2]]

        run = load_dag("ckl_maintenance").test(run_conf={"keep_last": 2})

        assert run.state == "success"
        assert [snapshot.id for snapshot in client.snapshots()] == newest
    assert sorted(path.name for path in server.snapshots.iterdir()) == sorted(newest)
