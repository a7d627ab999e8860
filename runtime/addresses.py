"""Where the local services listen: `<state>/services.json`, written by `ckl services up`
(localservices/stack.py) and read by whoever needs Kafka or MLflow when no CKL_* variable names them."""

import json
from pathlib import Path

from runtime.paths import state_dir
from runtime.supervisor import ServiceError

SERVICES_FILE = "services.json"


def services_file(state: Path | None = None) -> Path:
    """The services.json of a state dir (default: `.ckl/`)."""
    return (Path(state) if state is not None else state_dir()) / SERVICES_FILE


def write_services_info(state: Path, info: dict) -> None:
    """Replace services.json atomically."""
    path = services_file(state)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    tmp.replace(path)


def load_services_info(state: Path | None = None) -> dict:
    """The contents of services.json (`kafka_bootstrap`, `mlflow_uri`, pids, ports, logs)."""
    path = services_file(state)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ServiceError(f"{path} not found: start the services with `ckl services up`") from None
