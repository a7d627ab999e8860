"""ckl_ingest: one ingestion batch per run (consume -> DLQ -> inject -> probes -> commit -> MLflow).

Wiring only; the work is `pipelines.ingest`. Addresses come from CKL_* environment variables or the
local `.ckl/` files (see `pipelines.settings`); batch size, topic and group are run parameters, their
defaults ingestion's own.
"""

from datetime import datetime, timedelta

from airflow.sdk import Param, dag, task

from pipelines.settings import DEFAULT_BATCH_SIZE, DEFAULT_GROUP, DOCS_TOPIC


@dag(
    dag_id="ckl_ingest",
    schedule=timedelta(minutes=1),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={
        "retries": 3,
        "retry_delay": timedelta(seconds=10),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=5),
    },
    params={
        "batch_size": Param(DEFAULT_BATCH_SIZE, type="integer", minimum=1, description="Messages per batch"),
        "topic": Param(DOCS_TOPIC, type="string", description="Topic to consume"),
        "group": Param(DEFAULT_GROUP, type="string", description="Consumer group"),
    },
    tags=["ckl"],
)
def ckl_ingest():
    @task(queue="gpu")  # injection runs on the model server; keep the caller next to the GPU workers
    def ingest_batch(params: dict) -> dict:
        from pipelines.ingest import report_dict, run_one_batch
        from pipelines.settings import IngestSettings

        settings = IngestSettings.resolve(
            batch_size=int(params["batch_size"]), topic=params["topic"], group=params["group"]
        )
        return report_dict(run_one_batch(settings))

    ingest_batch()


ckl_ingest()
