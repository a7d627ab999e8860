"""Loss curves of a training run in the MLflow experiment `ckl-train` (`ckl train --mlflow-uri`)."""

import dataclasses
import time

EXPERIMENT = "ckl-train"


class TrainingCurves:
    """Loss curves of one run in the MLflow experiment `ckl-train`, logged in batches of steps."""

    def __init__(self, uri: str, preset: str, config):
        import mlflow

        self.client = mlflow.MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(EXPERIMENT)
        experiment_id = found.experiment_id if found else self.client.create_experiment(EXPERIMENT)
        run = self.client.create_run(experiment_id, run_name=f"train-{preset}-seed{config.seed}")
        self.run_id = run.info.run_id
        params = [mlflow.entities.Param(k, str(v)) for k, v in dataclasses.asdict(config).items()]
        self.client.log_batch(self.run_id, params=params)
        self.pending = []

    def log(self, step: int, metrics: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if len(self.pending) >= 200:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.client.log_batch(self.run_id, metrics=self.pending)
            self.pending = []

    def close(self) -> None:
        self.flush()
        self.client.set_terminated(self.run_id)
