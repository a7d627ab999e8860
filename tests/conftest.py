"""Session fixtures with real services: a Kafka broker, an MLflow server and a migrated Airflow home.

Each starts at most once per test session, on free ports in a temporary state dir, and is always stopped.
Airflow reads its configuration when first imported, so its environment (AIRFLOW_HOME and friends) is set
for the whole session in `pytest_configure`, before any test module is collected.

`dag.test()` only runs DAGs that Airflow finds in a DAG bundle: the project's `dags/` (bundle
"dags-folder") and DAGs written only for tests in `tests/airflow_dags/` (bundle "ckl-test-dags").
"""

import os
import re
import shutil
import signal
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from localservices.airflow import airflow_environment, migrate
from localservices.kafka import KafkaBroker
from localservices.mlflow import MlflowServer
from localservices.stack import LocalServices

TEST_DAGS = Path(__file__).resolve().parent / "airflow_dags"
_AIRFLOW_HOME = pytest.StashKey[Path]()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    # A run stopped with SIGTERM (e.g. a CI timeout) unwinds like Ctrl-C, so the finalizers below still stop
    # every service they started.
    signal.signal(signal.SIGTERM, _interrupt)
    home = Path(tempfile.mkdtemp(prefix="ckl-airflow-"))
    config.stash[_AIRFLOW_HOME] = home
    os.environ.update(airflow_environment(home, extra_bundles={"ckl-test-dags": TEST_DAGS}))


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(config.stash[_AIRFLOW_HOME], ignore_errors=True)


@pytest.fixture(scope="session")
def local_services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServices]:
    """The services of a fresh state dir; each fixture below starts only what it needs and stops it."""
    services = LocalServices(tmp_path_factory.mktemp("ckl-state"))
    try:
        yield services
    finally:
        services.stop()


@pytest.fixture(scope="session")
def _kafka_session(local_services: LocalServices) -> KafkaBroker:
    local_services.zookeeper.start()
    local_services.kafka.start()
    return local_services.kafka


@pytest.fixture
def kafka(_kafka_session: KafkaBroker) -> Iterator[KafkaBroker]:
    """The session's broker: `.bootstrap` ("127.0.0.1:port"), `.kill()` (SIGKILL) and `.start()`.

    If a test leaves the broker down (a crash test that failed half-way), it is started again afterwards.
    """
    yield _kafka_session
    if _kafka_session.pid is None:
        _kafka_session.start()


@pytest.fixture(scope="session")
def mlflow_server(local_services: LocalServices) -> MlflowServer:
    """The session's MLflow tracking server: `.uri` ("http://127.0.0.1:port"), SQLite backend."""
    local_services.mlflow.start()
    return local_services.mlflow


@pytest.fixture(scope="session")
def airflow_home(pytestconfig: pytest.Config) -> Path:
    """The session's AIRFLOW_HOME (SQLite, no examples, DAGs from the repo's dags/), migrated once."""
    home = pytestconfig.stash[_AIRFLOW_HOME]
    migrate(dict(os.environ))
    return home


@pytest.fixture
def topic_name(request: pytest.FixtureRequest) -> str:
    """A topic name no other test uses (the topic itself is not created)."""
    test = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:80]
    return f"test-{test}-{uuid.uuid4().hex[:8]}"
