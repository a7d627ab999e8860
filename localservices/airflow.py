"""A project-local Airflow: its environment (SQLite metadata DB, the repo's dags/ as a bundle) and
`airflow db migrate`. Used by the main job and the tests; a scaled-out deployment configures Airflow itself.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_DAGS = Path(__file__).resolve().parents[1] / "dags"
_LOCAL_BUNDLE = "airflow.dag_processing.bundles.local.LocalDagBundle"


def airflow_environment(home: Path, extra_bundles: dict[str, Path] | None = None) -> dict[str, str]:
    """Environment variables for an Airflow home with the repo's DAGs (plus `extra_bundles` by name).

    Airflow reads them when first imported: set them before importing anything from airflow.
    """
    bundles = [{"name": "dags-folder", "classpath": _LOCAL_BUNDLE, "kwargs": {}}]
    bundles += [{"name": name, "classpath": _LOCAL_BUNDLE, "kwargs": {"path": str(path)}}
                for name, path in (extra_bundles or {}).items()]
    return {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_DAGS),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{Path(home).resolve() / 'airflow.db'}",
        "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST": json.dumps(bundles),
    }


def migrate(environment: dict[str, str]) -> None:
    """`airflow db migrate` for the home of `environment` (idempotent); raises with Airflow's output."""
    home = Path(environment["AIRFLOW_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "airflow", "db", "migrate"]
    env = {**os.environ, **environment}
    result = subprocess.run(command, capture_output=True, text=True, cwd=home, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"airflow db migrate failed:\n{result.stdout}\n{result.stderr}")


def run_dag(dag_id: str, environment: dict[str, str], conf: dict | None = None) -> str:
    """One run of a DAG with `airflow dags test` in a subprocess; returns its output, raises if it fails."""
    command = [sys.executable, "-m", "airflow", "dags", "test", dag_id, "--bundle-name", "dags-folder"]
    if conf:
        command += ["--conf", json.dumps(conf)]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **environment})
    if result.returncode != 0:
        raise RuntimeError(f"DAG {dag_id} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result.stdout
