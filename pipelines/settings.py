"""Ingestion's settings in one place: the CKL_* environment variables that point a worker at its services,
the defaults that `ckl ingest`, the DAG params and `IngestSettings` all read, and how addresses resolve
(given, else environment, else the local `.ckl/` files that `ckl services up` and `ckl serve` write).

Light on purpose (no torch, no Kafka client): DAG files and `ckl ... --help` import it.
"""

import os
from dataclasses import dataclass, field

from monitoring.tracking import MLFLOW_URI_ENV
from runtime.addresses import load_services_info
from runtime.paths import state_dir
from runtime.supervisor import ServiceError

BOOTSTRAP_ENV, SERVER_URL_ENV = "CKL_KAFKA_BOOTSTRAP", "CKL_SERVER_URL"
DOCS_TOPIC, DLQ_TOPIC = "ckl.docs", "ckl.docs.dlq"
DEFAULT_GROUP = "ckl-ingest"
DEFAULT_BATCH_SIZE = 32  # messages per batch
DEFAULT_POLL_TIMEOUT_S = 10.0  # how long a poll waits for the first message
DEFAULT_PROBE_QUESTIONS = 10
DEFAULT_PROBE_SHARE = 0.25
DEFAULT_KEEP_LAST = 10  # snapshots the daily maintenance keeps


@dataclass(frozen=True)
class IngestSettings:
    """Where ingestion reads, writes and reports; `resolve` fills the gaps from env and `.ckl/`."""

    bootstrap: str
    server_url: str
    write_token: str | None = field(default=None, repr=False)
    mlflow_uri: str | None = None
    topic: str = DOCS_TOPIC
    group: str = DEFAULT_GROUP
    batch_size: int = DEFAULT_BATCH_SIZE
    poll_timeout_s: float = DEFAULT_POLL_TIMEOUT_S
    probe_questions: int = DEFAULT_PROBE_QUESTIONS  # retention probes per batch (0: none)
    # probing's time budget, a share of batch time (unspent budget carries over)
    probe_share: float = DEFAULT_PROBE_SHARE

    def __post_init__(self):
        if not 0 < self.probe_share < 1:
            raise ValueError(f"probe_share must be between 0 and 1 (exclusive), got {self.probe_share}")

    @classmethod
    def resolve(cls, **given: object) -> "IngestSettings":
        """Settings from explicit values, else CKL_* environment variables, else `.ckl/*.json`.

        CKL_KAFKA_BOOTSTRAP, CKL_SERVER_URL, CKL_MLFLOW_URI and CKL_WRITE_TOKEN let a scaled-out
        deployment point workers at its own services; locally `ckl services up` and `ckl serve` write
        their addresses into `.ckl/`.
        """
        values = {k: v for k, v in given.items() if v is not None}
        if "bootstrap" not in values:
            values["bootstrap"] = os.environ.get(BOOTSTRAP_ENV) or load_services_info()["kafka_bootstrap"]
        if "mlflow_uri" not in values:
            values["mlflow_uri"] = resolve_mlflow_uri(required=False)  # ingestion may run without MLflow
        server_url, write_token = resolve_server(values.get("server_url"), values.get("write_token"))
        return cls(**(values | {"server_url": server_url, "write_token": write_token}))


def resolve_server(url: str | None = None, write_token: str | None = None) -> tuple[str, str | None]:
    """The model server's URL and write token: given, else CKL_SERVER_URL / CKL_WRITE_TOKEN, else the URL
    `ckl serve` wrote into `.ckl/server.json`."""
    from serving.client import read_server_file
    from serving.settings import WRITE_TOKEN_ENV  # the server's settings load torch: only when resolving

    url = url or os.environ.get(SERVER_URL_ENV) or read_server_file(state_dir())["url"]
    return url, write_token or os.environ.get(WRITE_TOKEN_ENV)


def resolve_mlflow_uri(given: str | None = None, *, required: bool = True) -> str | None:
    """The MLflow tracking URI: given, else CKL_MLFLOW_URI, else the one `ckl services up` wrote. Without
    one, ServiceError when `required`, else None (a missing services file raises either way)."""
    uri = given or os.environ.get(MLFLOW_URI_ENV) or load_services_info().get("mlflow_uri")
    if not uri and required:
        raise ServiceError("no MLflow tracking URI: pass --mlflow-uri or set " + MLFLOW_URI_ENV)
    return uri
