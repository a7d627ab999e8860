"""An MLflow tracking server on 127.0.0.1 (SQLite backend, local artifacts), supervised."""

import os
import sys
import urllib.error
import urllib.request

from runtime.supervisor import HOST, ManagedProcess


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
