"""MLflow tracking for ingestion: one run per batch in the experiment `ckl-ingest`.

mlflow is imported lazily so that DAG parsing and `ckl --help` stay fast.
"""

from collections.abc import Mapping

INGEST_EXPERIMENT = "ckl-ingest"


def log_batch(
    tracking_uri: str,
    metrics: Mapping[str, float],
    tags: Mapping[str, str],
    experiment: str = INGEST_EXPERIMENT,
    run_name: str | None = None,
) -> str:
    """Log one ingestion batch as an MLflow run; returns the run id."""
    import time

    import mlflow
    from mlflow.entities import Metric

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags))
    now_ms = int(time.time() * 1000)
    client.log_batch(run.info.run_id, metrics=[Metric(k, float(v), now_ms, 0) for k, v in metrics.items()])
    client.set_terminated(run.info.run_id)
    return run.info.run_id
