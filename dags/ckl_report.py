"""ckl_report: every 30 minutes, write the retention dashboard and check retention (`ckl report --check`).

Wiring only; the work is `pipelines.report.publish`. The run fails (without retries) when an age
bucket's mean exact match over the last `window` batches is below `threshold`; the alert is also set as
the `ckl.alert` tag of the newest lineage run. MLflow and the deployment come from CKL_MLFLOW_URI (else
the local `.ckl/services.json`) and CKL_DEPLOYMENT.
"""

from datetime import datetime, timedelta

from airflow.sdk import Param, dag, task


@dag(
    dag_id="ckl_report",
    schedule=timedelta(minutes=30),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=1)},
    params={
        "out": Param(None, type=["null", "string"], description="HTML file (default .ckl/report.html)"),
        "threshold": Param(0.8, type="number", minimum=0, maximum=1, description="Lowest mean exact match"),
        "mode": Param("bank", enum=["bank", "pool"], description="Bank or pool retention"),
        "window": Param(50, type="integer", minimum=1, description="Batches averaged"),
    },
    tags=["ckl"],
)
def ckl_report():
    @task
    def report(params: dict) -> str:
        from pathlib import Path

        from airflow.sdk.exceptions import AirflowFailException

        from pipelines.report import default_report_path, publish

        out = Path(params["out"]) if params["out"] else default_report_path()
        alerts = publish(out, check=True, threshold=float(params["threshold"]), mode=params["mode"],
                         window=int(params["window"]))
        if alerts:
            raise AirflowFailException("retention check failed: " + "; ".join(alerts))
        return str(out)

    report()


ckl_report()
