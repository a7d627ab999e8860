"""ckl_rollback: take the live memory back to a version (manual trigger with params).

Wiring only; the work is `pipelines.rollback.rollback`, the same code as `ckl rollback`. Pause `ckl_ingest`
first: moving the consumer group's offsets for a replay waits for running ingestion to finish, then
fails the task with a clear error.
"""

from datetime import datetime

from airflow.sdk import Param, dag, task


@dag(
    dag_id="ckl_rollback",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    params={
        "target": Param("", type="string", minLength=1,
                        description="Memory version or snapshot id to go back to (`ckl snapshots list`)"),
        "mode": Param("replay", enum=["replay", "skip"],
                      description="replay: re-ingest what the rollback removed; skip: leave it out"),
        "exclude": Param([], type="array", items={"type": "string"},
                         description="doc_ids never to apply again (replay only; they go to the DLQ)"),
    },
    tags=["ckl"],
)
def ckl_rollback():
    @task(queue="gpu")
    def roll_back(params: dict) -> dict:
        from pipelines.rollback import rollback_task

        return rollback_task(str(params["target"]), params["mode"], list(params["exclude"]))

    roll_back()


ckl_rollback()
