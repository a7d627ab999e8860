"""ckl monitoring, and all of its MLflow code: the retention probes of a batch (probes.py), the offline
retention curve (retention.py), the deployment's MLflow runs of lineages, batches and rollbacks
(tracking.py), the dashboard and alert read back from them (report.py) and training loss curves
(training_curves.py). Snapshots themselves live with the server (serving/snapshots.py); MLflow records
which checkpoint each batch wrote."""
