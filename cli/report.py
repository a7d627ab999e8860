"""`ckl report`: the retention dashboard, a static HTML page of the deployment's MLflow experiment.

With --check it is also the retention alert: exit 1 when an age bucket's recent retention is below the
threshold, with each alert printed, logged as a warning and set as the `ckl.alert` tag of the newest
lineage run (cleared when every bucket passes). The `ckl_report` DAG runs the same job,
`pipelines.report.publish`.
"""

import argparse
import sys
from pathlib import Path

from cli.argtypes import fraction, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("report.html"),
                        help="HTML file (default report.html)")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 on a retention alert; set (or clear) the newest lineage's ckl.alert tag")
    parser.add_argument("--threshold", type=fraction, default=0.8,
                        help="lowest acceptable mean exact match per age bucket, 0 to 1 (default 0.8; "
                             "0: never alert)")
    parser.add_argument("--mode", choices=("bank", "pool"), default="bank",
                        help="retention checked: with the bank (default) or from the pool alone")
    parser.add_argument("--window", type=positive_int, default=50, help="batches averaged (default 50)")
    parser.add_argument("--mlflow-uri", default=None,
                        help="MLflow tracking URI (default: CKL_MLFLOW_URI, else .ckl/services.json)")
    parser.add_argument("--deployment", default=None,
                        help="read experiment ckl-<deployment> (default: CKL_DEPLOYMENT, else local)")


def run(args: argparse.Namespace) -> int:
    from monitoring.report import ReportError
    from pipelines.report import publish
    from runtime.supervisor import ServiceError

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
