"""Load the project's DAGs in the test process, to run them with `dag.test()` against real services."""

import importlib.util

from localservices.airflow import REPO_DAGS


def load_dag(name: str):
    """The DAG object defined by dags/<name>.py."""
    spec = importlib.util.spec_from_file_location(name, REPO_DAGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)()
