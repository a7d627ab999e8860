"""The retention dashboard and alert as a job: `ckl report` and the `ckl_report` DAG run `publish`."""

import logging
from dataclasses import replace
from pathlib import Path

from pipelines.settings import resolve_mlflow_uri
from runtime.paths import state_dir

log = logging.getLogger(__name__)


def default_report_path() -> Path:
    """Where the `ckl_report` DAG writes the dashboard unless told: `.ckl/report.html`."""
    return state_dir() / "report.html"


def publish(out: Path, *, check: bool = False, threshold: float = 0.8, mode: str = "bank", window: int = 50,
            mlflow_uri: str | None = None, deployment: str | None = None) -> list[str]:
    """Write the dashboard of the deployment's experiment to `out`; returns its retention alerts. With
    `check`, each alert is logged as a warning and set as the newest lineage's `ckl.alert` (or cleared)."""
    from monitoring.report import check as check_retention
    from monitoring.report import load, render_html
    from monitoring.tracking import experiment_name

    uri = resolve_mlflow_uri(mlflow_uri)
    data = load(uri, experiment_name(deployment))
    alerts = check_retention(data, threshold, mode=mode, window=window)
    if check:
        _record_alerts(uri, data.experiment, data.current.run_id, alerts)
        current = replace(data.current, alert="; ".join(alerts) or None)
        data = replace(data, lineages=[*data.lineages[:-1], current])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(data, alerts, threshold, mode=mode, window=window))
    return alerts


def _record_alerts(uri: str, experiment: str, run_id: str, alerts: list[str]) -> None:
    from monitoring.tracking import Tracker

    for alert in alerts:
        log.warning("retention alert: %s", alert)
    Tracker(uri, experiment).set_alert(run_id, "; ".join(alerts))
