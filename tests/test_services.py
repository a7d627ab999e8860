"""Local services: `ckl services up|down|status` with real processes, and the session fixtures themselves."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import ConfigResource, NewTopic
from kafka.errors import KafkaTimeoutError

from localservices.kafka import ZooKeeper
from localservices.stack import LocalServices
from pipelines.kafka_io import DLQ_MAX_MESSAGE_BYTES, DLQ_TOPIC, DOCS_TOPIC, DOCUMENT_TOPICS
from runtime.addresses import load_services_info
from runtime.supervisor import ServiceError

CKL = Path(sys.executable).with_name("ckl")


def ckl_services(state: Path, *args: str) -> subprocess.CompletedProcess:
    """Run the installed `ckl services ...` command line with CKL_HOME=state; fails the test on error."""
    result = subprocess.run(
        [str(CKL), "services", *args], capture_output=True, text=True, timeout=300,
        env={**os.environ, "CKL_HOME": str(state)},
    )
    assert result.returncode == 0, f"ckl services {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result


def create_topic(bootstrap: str, topic: str, partitions: int = 1) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    finally:
        admin.close()


def produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        for value in values:
            producer.send(topic, value)
        producer.flush(timeout=30)
    finally:
        producer.close()


def consume_all(bootstrap: str, topic: str, expected: int, timeout_s: float = 30.0) -> list[bytes]:
    """Read `topic` from the beginning until `expected` messages arrived (or the timeout passed)."""
    consumer = KafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False,
    )
    values: list[bytes] = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(values) < expected and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                values.extend(record.value for record in records)
    finally:
        consumer.close()
    return values


def mlflow_experiment_names(uri: str) -> list[str]:
    url = f"{uri}/api/2.0/mlflow/experiments/search?max_results=100"
    with urllib.request.urlopen(url, timeout=10) as reply:
        return [experiment["name"] for experiment in json.load(reply)["experiments"]]


def create_mlflow_experiment(uri: str, name: str) -> str:
    request = urllib.request.Request(
        f"{uri}/api/2.0/mlflow/experiments/create", data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"}, method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        return json.load(reply)["experiment_id"]


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat fields after the command name ([] when the process does not exist)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def alive(pid: int) -> bool:
    """Whether `pid` is a live process (zombies count as gone)."""
    fields = _stat(pid)
    return bool(fields) and fields[0] != "Z"


def group_members(group_ids: list[int]) -> list[int]:
    """Live processes whose process group is one of `group_ids`."""
    members = []
    for entry in Path("/proc").iterdir():
        fields = _stat(int(entry.name)) if entry.name.isdigit() else []
        if fields and fields[0] != "Z" and int(fields[2]) in group_ids:
            members.append(int(entry.name))
    return members


# ---------------------------------------------------------------------------------------------------------
# Session fixtures


def test_kafka_fixture_round_trips_a_message_on_a_fresh_topic(kafka, topic_name):
    create_topic(kafka.bootstrap, topic_name)
    produce(kafka.bootstrap, topic_name, [b"hello"])
    assert consume_all(kafka.bootstrap, topic_name, expected=1) == [b"hello"]


def test_broker_does_not_create_topics_on_first_use(kafka, topic_name):
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap, max_block_ms=2000)
    try:
        with pytest.raises(KafkaTimeoutError):
            producer.send(topic_name, b"to a topic nobody created")
    finally:
        producer.close()
    admin = KafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    try:
        assert topic_name not in admin.list_topics()
    finally:
        admin.close()


def test_mlflow_fixture_stores_experiments(mlflow_server):
    create_mlflow_experiment(mlflow_server.uri, "ckl-fixture-check")
    assert "ckl-fixture-check" in mlflow_experiment_names(mlflow_server.uri)


def test_dag_runs_to_success_in_the_migrated_airflow_home(airflow_home):
    from airflow_dags.smoke import smoke_dag

    assert os.environ["AIRFLOW_HOME"] == str(airflow_home)
    run = smoke_dag.test()
    assert run.state == "success"
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert states == {"double": "success", "check": "success"}


def test_service_dying_at_startup_raises_an_error_that_points_to_its_log(tmp_path):
    (tmp_path / "kafka").mkdir()
    (tmp_path / "kafka" / "zookeeper").write_text("a file where ZooKeeper wants its data directory")
    zookeeper = ZooKeeper(tmp_path)
    with pytest.raises(ServiceError, match="exited during startup") as error:
        zookeeper.start(timeout=60)
    assert str(zookeeper.log_path) in str(error.value)
    assert "Unable to create data directory" in str(error.value)
    assert zookeeper.pid is None


# ---------------------------------------------------------------------------------------------------------
# `ckl services` as a user runs it: one stack for this module, brought up once and always taken down


@pytest.fixture(scope="module")
def cli_state(tmp_path_factory) -> Path:
    state = tmp_path_factory.mktemp("cli-state")
    try:
        ckl_services(state, "up")
        yield state
    finally:
        LocalServices(state).stop()


def test_up_writes_services_json_and_both_services_answer(cli_state, topic_name):
    """Also: `up` creates the project's topics, so a plain kafka-python producer publishes to ckl.docs with
    no other step; the dead-letter topic takes a message the size of the broker's largest plus headers."""
    info = load_services_info(cli_state)
    producer = KafkaProducer(bootstrap_servers=info["kafka_bootstrap"], max_block_ms=10_000)
    try:
        sent = producer.send(DOCS_TOPIC, b'{"doc_id": "plain-client", "text": "Sent by any Kafka client."}')
        assert sent.get(timeout=10).topic == DOCS_TOPIC
        assert len(producer.partitions_for(DOCS_TOPIC)) == DOCUMENT_TOPICS[DOCS_TOPIC]
    finally:
        producer.close()
    admin = KafkaAdminClient(bootstrap_servers=info["kafka_bootstrap"])
    try:
        resource = ConfigResource("TOPIC", DLQ_TOPIC, configs={"max.message.bytes": None})
        described = admin.describe_configs([resource])
    finally:
        admin.close()
    assert described["topic"][DLQ_TOPIC]["max.message.bytes"]["value"] == str(DLQ_MAX_MESSAGE_BYTES)

    assert info["kafka_bootstrap"].startswith("127.0.0.1:")
    assert info["mlflow_uri"].startswith("http://127.0.0.1:")
    assert all(alive(service["pid"]) for service in info["services"].values())

    create_topic(info["kafka_bootstrap"], topic_name, partitions=2)
    produce(info["kafka_bootstrap"], topic_name, [b"one message"])
    assert consume_all(info["kafka_bootstrap"], topic_name, expected=1) == [b"one message"]
    experiment_id = create_mlflow_experiment(info["mlflow_uri"], "ckl-services-check")
    assert experiment_id
    assert "ckl-services-check" in mlflow_experiment_names(info["mlflow_uri"])


def test_second_up_reuses_the_running_services(cli_state):
    before = load_services_info(cli_state)
    ckl_services(cli_state, "up")
    after = load_services_info(cli_state)
    assert after == before


def test_status_says_what_runs_where(cli_state):
    info = load_services_info(cli_state)
    output = ckl_services(cli_state, "status").stdout
    rows = {line.split()[0]: line.split() for line in output.splitlines()[1:]}
    assert set(rows) == {"zookeeper", "kafka", "mlflow"}
    assert rows["kafka"][1:4] == ["up", str(info["services"]["kafka"]["pid"]), info["kafka_bootstrap"]]
    assert rows["mlflow"][1:4] == ["up", str(info["services"]["mlflow"]["pid"]), info["mlflow_uri"]]


def test_up_after_broker_sigkill_brings_it_back_with_earlier_data(cli_state, topic_name):
    info = load_services_info(cli_state)
    create_topic(info["kafka_bootstrap"], topic_name, partitions=3)
    messages = [f"message {i}".encode() for i in range(50)]
    produce(info["kafka_bootstrap"], topic_name, messages)

    broker_pid = info["services"]["kafka"]["pid"]
    os.kill(broker_pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while alive(broker_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(broker_pid)

    ckl_services(cli_state, "up")  # meets the dead broker's pid record and its ZooKeeper registration
    restarted = load_services_info(cli_state)
    assert restarted["services"]["kafka"]["pid"] != broker_pid
    assert restarted["kafka_bootstrap"] == info["kafka_bootstrap"]  # same address for existing clients
    assert sorted(consume_all(restarted["kafka_bootstrap"], topic_name, expected=50)) == sorted(messages)


def test_up_after_sigkill_of_every_service_replaces_stale_records_and_orphans(cli_state):
    before = load_services_info(cli_state)
    leaders = [service["pid"] for service in before["services"].values()]
    orphans = [pid for pid in group_members(leaders) if pid not in leaders]
    assert orphans, "expected the MLflow server's worker in the MLflow process group"
    for pid in leaders:
        os.kill(pid, signal.SIGKILL)  # leaders only: the MLflow worker lives on, holding the port

    ckl_services(cli_state, "up")
    after = load_services_info(cli_state)
    assert not set(leaders) & {service["pid"] for service in after["services"].values()}
    assert not any(alive(pid) for pid in orphans)
    assert after["mlflow_uri"] == before["mlflow_uri"]
    assert "ckl-services-check" in mlflow_experiment_names(after["mlflow_uri"])  # same SQLite store


def test_down_stops_everything_and_leaves_no_process(cli_state):
    info = load_services_info(cli_state)
    pids = [service["pid"] for service in info["services"].values()]
    ckl_services(cli_state, "down")
    assert not any(alive(pid) for pid in pids)
    assert not group_members(pids), "a child of a service outlived `down`"
    assert not (cli_state / "services.json").exists()
    status = subprocess.run(
        [str(CKL), "services", "status"], capture_output=True, text=True,
        env={**os.environ, "CKL_HOME": str(cli_state)},
    )
    assert status.returncode == 1
    assert [line.split()[1] for line in status.stdout.splitlines()[1:]] == ["down", "down", "down"]
