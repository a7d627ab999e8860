"""`ckl report`: the retention dashboard, a static HTML page of the deployment's MLflow experiment.

With --check it is also the retention alert: exit 1 when an age bucket's recent retention is below the
threshold, with each alert printed, logged as a warning and set as the `ckl.alert` tag of the newest
lineage run (cleared when every bucket passes). The `ckl_report` DAG runs the same `publish`.
"""

import argparse
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("report.html"),
                        help="HTML file (default report.html)")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 on a retention alert; set (or clear) the newest lineage's ckl.alert tag")
    parser.add_argument("--threshold", type=float, default=0.8,
                        help="lowest acceptable mean exact match per age bucket (default 0.8)")
    parser.add_argument("--mode", choices=("bank", "pool"), default="bank",
                        help="retention checked: with the bank (default) or from the pool alone")
    parser.add_argument("--window", type=_batches, default=50, help="batches averaged (default 50)")
    parser.add_argument("--mlflow-uri", default=None,
                        help="MLflow tracking URI (default: CKL_MLFLOW_URI, else .ckl/services.json)")
    parser.add_argument("--deployment", default=None,
                        help="read experiment ckl-<deployment> (default: CKL_DEPLOYMENT, else local)")


def _batches(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a number of batches >= 1, got {value!r}")
    return int(value)


def run(args: argparse.Namespace) -> int:
    from monitoring.report import ReportError
    from pipelines.services import ServiceError

    try:
        alerts = publish(args.out, check=args.check, threshold=args.threshold, mode=args.mode,
                         window=args.window, mlflow_uri=args.mlflow_uri, deployment=args.deployment)
    except (ReportError, ServiceError) as error:
        print(f"ckl report: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out.resolve()}")
    print("status: " + ("ALERT" if alerts else "OK"))
    for alert in alerts:
        print(f"  {alert}")
    return 1 if args.check and alerts else 0


def resolve_mlflow_uri(given: str | None = None) -> str:
    """The MLflow tracking URI: given, else CKL_MLFLOW_URI, else the one `ckl services up` wrote."""
    from monitoring.tracking import MLFLOW_URI_ENV
    from pipelines.services import ServiceError, load_services_info

    uri = given or os.environ.get(MLFLOW_URI_ENV) or load_services_info().get("mlflow_uri")
    if not uri:
        raise ServiceError("no MLflow tracking URI: pass --mlflow-uri or set " + MLFLOW_URI_ENV)
    return uri


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
