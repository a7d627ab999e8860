"""The embedded default: ZooKeeper, the Kafka broker and the MLflow server of one state dir (`ckl services`).

Under the state dir (default `.ckl/`): `run/<name>.json` records pid and port, `kafka/` and `mlflow/` hold
data, `logs/` the logs, and `services.json` tells clients where everything runs (runtime/addresses.py).
"""

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from localservices.kafka import KafkaBroker, ZooKeeper
from localservices.mlflow import MlflowServer
from runtime.addresses import services_file, write_services_info
from runtime.paths import state_dir
from runtime.supervisor import DEFAULT_READY_TIMEOUT_S, ServiceStatus


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
        return services_file(self.state)

    def start(self, timeout: float = DEFAULT_READY_TIMEOUT_S) -> dict:
        """Start what is not running (running ones are reused), wait until all answer, write services.json."""
        with self._lock():
            self.zookeeper.launch()
            self.mlflow.launch()  # starts its migrations while the JVMs come up
            self.zookeeper.wait_ready(timeout)
            self.kafka.start(timeout)
            self.mlflow.wait_ready(timeout)
            info = self._info()
            write_services_info(self.state, info)
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
