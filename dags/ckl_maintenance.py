"""ckl_maintenance: daily upkeep of the model server's state: prune snapshots to the last N, then compact
the memory bank.

Wiring only; the work is `pipelines.maintenance`. The server address and write token come from
CKL_SERVER_URL / CKL_WRITE_TOKEN or the local `.ckl/server.json` (see `pipelines.settings.resolve_server`).
"""

from datetime import datetime, timedelta

from airflow.sdk import Param, dag, task

from pipelines.settings import DEFAULT_KEEP_LAST


@dag(
    dag_id="ckl_maintenance",
    schedule="@daily",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=1)},
    params={"keep_last": Param(DEFAULT_KEEP_LAST, type="integer", minimum=1,
                               description="Newest valid snapshots to keep")},
    tags=["ckl"],
)
def ckl_maintenance():
    @task
    def prune_snapshots(params: dict) -> dict:
        from pipelines.maintenance import prune_snapshots

        return prune_snapshots(keep_last=int(params["keep_last"]))

    @task
    def compact_bank() -> dict:
        from pipelines.maintenance import compact_bank

        return compact_bank()

    prune_snapshots() >> compact_bank()


ckl_maintenance()
