"""Monitoring end to end on real services (Kafka broker, MLflow server, `ckl serve` with the committed
default model): retention probes per batch in MLflow with the right steps, a poisoned batch that degrades
what the memory knew, and `ckl rollback --replay --exclude` bringing it back byte for byte."""

import dataclasses
import json
import os
import random
import subprocess
from collections.abc import Iterator

import mlflow
import pytest
from dead_letters import dead_letters
from kafka import KafkaConsumer, TopicPartition
from repo_dags import load_dag

from model import DEFAULT_CHECKPOINT
from model.prompts import answers_match
from monitoring.tracking import MLFLOW_URI_ENV, experiment_name
from pipelines.ingest import EXCLUDED_REASON
from pipelines.kafka_io import (
    DLQ_TOPIC,
    GroupBusy,
    committed_offsets,
    ensure_topics,
    group_members,
    make_producer,
    move_group_offsets,
)
from pipelines.settings import BOOTSTRAP_ENV, SERVER_URL_ENV
from serving.client import ModelServerClient
from serving.process import ServerProcess, ckl_command
from serving.settings import WRITE_TOKEN_ENV
from synthetic.bios import ATTRIBUTES, CITIES, bio_document, generate_people

WRITE_TOKEN = "test-monitoring-token"
PEOPLE = 12
BATCH_SIZE = 6


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    server = ServerProcess(DEFAULT_CHECKPOINT, tmp_path_factory.mktemp("serve-state"), WRITE_TOKEN,
                           extra_args=["--checkpoint-every", "2"], env={"OMP_NUM_THREADS": "1"}).start()
    try:
        yield server
    finally:
        server.stop()


def publish(bootstrap: str, topic: str, documents: list) -> None:
    producer = make_producer(bootstrap)
    try:
        for document in documents:
            producer.send(topic, document.to_json().encode(), key=document.doc_id.encode())
        producer.flush()
    finally:
        producer.close()


def run_ckl(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ) | {WRITE_TOKEN_ENV: WRITE_TOKEN}
    return subprocess.run([ckl_command(), *args], env=env, capture_output=True, text=True, timeout=600)


def city_accuracy(server: ServerProcess, documents: list) -> float:
    """Share of the documents' birth-city probes the live server answers right (its retrieval setting)."""
    probes = [document.probes[ATTRIBUTES.index("birth_city")] for document in documents]
    with ModelServerClient(server.url) as client:
        right = [answers_match(client.query(probe.question, max_new_tokens=12).answer, probe.answer)
                 for probe in probes]
    return sum(right) / len(right)


def test_poisoned_batch_degrades_retention_and_a_rollback_with_exclusions_restores_it(
    kafka, mlflow_server, server, topic_name
):
    ensure_topics(kafka.bootstrap, {topic_name: 2, DLQ_TOPIC: 1})
    rng = random.Random(7)
    people = generate_people(PEOPLE, "heldout", seed=11)
    facts = [bio_document(person, rng, f"{topic_name}-fact-{i}") for i, person in enumerate(people)]
    poisoned_people = [dataclasses.replace(p, birth_city=rng.choice([c for c in CITIES if c != p.birth_city]))
                       for p in people]
    poison = [bio_document(p, rng, f"{topic_name}-poison-{i}") for i, p in enumerate(poisoned_people)]
    ingest = ["ingest", "--until-drained", "--bootstrap", kafka.bootstrap, "--server", server.url,
              "--mlflow-uri", mlflow_server.uri, "--topic", topic_name, "--group", topic_name,
              "--batch-size", str(BATCH_SIZE), "--poll-timeout", "5",
              "--probe-share", "0.9"]  # a time budget large enough that every batch's probes get asked

    publish(kafka.bootstrap, topic_name, facts)
    assert run_ckl(*ingest).returncode == 0
    with ModelServerClient(server.url) as client:
        good = client.memory()
    before = city_accuracy(server, facts)

    publish(kafka.bootstrap, topic_name, poison)
    assert run_ckl(*ingest).returncode == 0
    poisoned = city_accuracy(server, facts)

    excluded = ",".join(document.doc_id for document in poison)
    rolled = run_ckl("rollback", str(good.memory_version), "--replay", "--exclude", excluded,
                     "--server", server.url, "--bootstrap", kafka.bootstrap,
                     "--mlflow-uri", mlflow_server.uri, "--group", topic_name)
    after = city_accuracy(server, facts)
    print(f"\nbirth-city accuracy: before {before:.0%}, poisoned {poisoned:.0%}, after rollback {after:.0%}")

    assert rolled.returncode == 0, rolled.stdout + rolled.stderr[-3000:]
    assert f"pool sha256 restored: {good.pool_sha256}" in rolled.stdout
    assert "(byte-identical)" in rolled.stdout
    assert f"0 documents applied again, {PEOPLE} excluded and dead-lettered" in rolled.stdout
    assert poisoned < before - 0.25
    assert after == before
    with ModelServerClient(server.url) as client:
        memory = client.memory()
    assert memory.pool_sha256 == good.pool_sha256 and memory.memory_version == good.memory_version
    assert memory.lineage_parent == good.lineage and memory.lineage != good.lineage

    letters = dead_letters(kafka.bootstrap, topic_name)
    assert sorted(json.loads(letter.value)["doc_id"] for letter in letters) == sorted(excluded.split(","))
    assert {letter.reason for letter in letters} == {EXCLUDED_REASON}

    assert_tracked(mlflow_server.uri, good.lineage, memory.lineage, good.memory_version)


def assert_tracked(uri: str, old_lineage: str, new_lineage: str, version: int) -> None:
    """MLflow: the old lineage ended with its batches' retention probes at their memory versions, the new
    one names it as parent, and the rollback is recorded."""
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(experiment_name())

    def lineage_run(lineage: str):
        where = f"tags.`ckl.kind` = 'lineage' AND tags.`ckl.lineage` = '{lineage}'"
        return client.search_runs([experiment.experiment_id], filter_string=where)[0]

    old, new = lineage_run(old_lineage), lineage_run(new_lineage)
    assert old.info.status == "FINISHED" and old.data.tags["ckl.ended_by"] == f"rollback to version {version}"
    assert new.data.tags["ckl.parent_lineage"] == old_lineage
    assert new.data.tags["ckl.from_version"] == str(version)
    fresh = client.get_metric_history(old.info.run_id, "retention/pool/em/age_0")
    batches = client.get_metric_history(old.info.run_id, "documents")
    assert {m.step for m in fresh} == {m.step for m in batches if m.value > 0}  # every applying batch probed
    losses = client.get_metric_history(old.info.run_id, "degradation_loss")
    assert {m.step for m in losses} == {m.step for m in fresh}
    assert all(0 <= m.value <= 1 for m in client.get_metric_history(old.info.run_id, "probe_share"))
    # the server checkpoints every 2 batches: each checkpoint left the retention curve by age as an artifact
    where = f"tags.lineage = '{old_lineage}' AND tags.checkpoint != ''"
    versions = [run.data.tags["memory_version"]
                for run in client.search_runs([experiment.experiment_id], filter_string=where)]
    curves = {artifact.path for artifact in client.list_artifacts(old.info.run_id, "retention")}
    assert versions and curves == {f"retention/curve-v{version}.png" for version in versions}
    where = f"tags.`ckl.kind` = 'rollback' AND tags.`ckl.rollback.to_lineage` = '{new_lineage}'"
    rollbacks = client.search_runs([experiment.experiment_id], filter_string=where)
    assert len(rollbacks) == 1
    tags = rollbacks[0].data.tags
    assert tags["ckl.rollback.to_version"] == str(version) and tags["ckl.rollback.identical"] == "True"
    assert tags["ckl.operator"]


def test_ckl_rollback_dag_runs_the_same_rollback(airflow_home, monkeypatch, kafka, mlflow_server, server):
    """The DAG wires `pipelines.rollback`: rolled back to the live version, it changes nothing and succeeds;
    to a version from the future, the task fails."""
    for name, value in {BOOTSTRAP_ENV: kafka.bootstrap, MLFLOW_URI_ENV: mlflow_server.uri,
                        SERVER_URL_ENV: server.url, WRITE_TOKEN_ENV: WRITE_TOKEN}.items():
        monkeypatch.setenv(name, value)
    with ModelServerClient(server.url) as client:
        before = client.memory()
    dag = load_dag("ckl_rollback")
    assert dag.test(run_conf={"target": str(before.memory_version), "mode": "skip"}).state == "success"
    assert dag.test(run_conf={"target": str(before.memory_version + 5), "mode": "skip"}).state == "failed"
    with ModelServerClient(server.url) as client:
        assert client.memory() == before


def test_group_offsets_move_only_while_no_consumer_runs(kafka, topic_name):
    ensure_topics(kafka.bootstrap, {topic_name: 1})
    consumer = KafkaConsumer(topic_name, bootstrap_servers=kafka.bootstrap, group_id=topic_name,
                             enable_auto_commit=False)
    start = TopicPartition(topic_name, 0)
    try:
        while not consumer.assignment():
            consumer.poll(timeout_ms=200)  # joined the group
        assert group_members(kafka.bootstrap, topic_name) == 1
        with pytest.raises(GroupBusy, match="still has running members"):
            move_group_offsets(kafka.bootstrap, topic_name, {start: 0}, wait_s=2)
    finally:
        consumer.close()
    move_group_offsets(kafka.bootstrap, topic_name, {start: 0}, wait_s=30)
    assert committed_offsets(kafka.bootstrap, topic_name) == {start: 0}
