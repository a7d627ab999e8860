"""MLflow tracking of a deployment: its memory lineages, their batches, probes and rollbacks.

The structure (docs/monitoring.md says why):

    experiment  ckl-<deployment>                   one per deployment (CKL_DEPLOYMENT, default "local")
      run       lineage <id>                       one per memory lineage; a rollback starts a new one
                  tags    ckl.kind=lineage, ckl.lineage, ckl.parent_lineage, ckl.from_version, ckl.alert
                  params  model, pool size N, tokens per injection K, batch size, retrieval settings
                  metrics every batch metric with step = memory version (the charts over batches)
                  artifacts retention/curve-v<version>.png at each checkpoint
        run     batch <version>                    nested (mlflow.parentRunId): one per batch
                  tags    ckl.kind=batch, memory version, bank version, checkpoint, pool sha256, offsets
                  metrics the batch's metrics at step = memory version
      run       rollback <from> -> <to>            one per rollback: who, from, to, mode, excluded, result

mlflow is imported lazily so that DAG parsing and `ckl --help` stay fast.
"""

import functools
import getpass
import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

DEPLOYMENT_ENV, MLFLOW_URI_ENV = "CKL_DEPLOYMENT", "CKL_MLFLOW_URI"
KIND_TAG, LINEAGE_TAG, PARENT_LINEAGE_TAG, FROM_VERSION_TAG = (
    "ckl.kind", "ckl.lineage", "ckl.parent_lineage", "ckl.from_version"
)
ALERT_TAG, PARENT_RUN_TAG = "ckl.alert", "mlflow.parentRunId"
MAX_TAG_CHARS = 1000


def experiment_name(deployment: str | None = None) -> str:
    """The deployment's experiment: `ckl-<deployment>` (CKL_DEPLOYMENT, default "local")."""
    return f"ckl-{deployment or os.environ.get(DEPLOYMENT_ENV) or 'local'}"


def tracker_for(tracking_uri: str) -> "Tracker":
    """This process's Tracker of a tracking server or store in the current deployment's experiment, made once
    (it remembers the lineage runs it has looked up)."""
    return _tracker(tracking_uri, experiment_name())


@functools.cache
def _tracker(tracking_uri: str, experiment: str) -> "Tracker":
    return Tracker(tracking_uri, experiment)


class Tracker:
    """Writes a deployment's lineages, batches and rollbacks to an MLflow tracking server or store."""

    def __init__(self, tracking_uri: str, experiment: str | None = None):
        # MLflow prints two links to stdout each time a run ends (and reads the run back to do it): one run
        # per batch would bury a command's own output
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        import mlflow

        self.client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        self.experiment = experiment or experiment_name()
        found = self.client.get_experiment_by_name(self.experiment)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(self.experiment)
        self._lineage_runs: dict[str, str] = {}

    def lineage_run(self, lineage: str, params: Callable[[], Mapping[str, object]] | None = None,
                    parent_lineage: str | None = None, from_version: int | None = None) -> str:
        """The run id of a memory lineage, created the first time it is asked for (with the params that
        `params()` returns, asked only then)."""
        if lineage in self._lineage_runs:
            return self._lineage_runs[lineage]
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{KIND_TAG}` = 'lineage' AND tags.`{LINEAGE_TAG}` = '{lineage}'",
            max_results=1,
        )
        if found:
            self._lineage_runs[lineage] = found[0].info.run_id
            return found[0].info.run_id
        tags = {KIND_TAG: "lineage", LINEAGE_TAG: lineage}
        if parent_lineage:
            tags |= {PARENT_LINEAGE_TAG: parent_lineage, FROM_VERSION_TAG: str(from_version)}
        run = self.client.create_run(self.experiment_id, run_name=f"lineage {lineage}", tags=tags)
        if params:
            from mlflow.entities import Param

            self.client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params().items()])
        self._lineage_runs[lineage] = run.info.run_id
        return run.info.run_id

    def log_batch(self, lineage_run: str, step: int, metrics: Mapping[str, float],
                  tags: Mapping[str, str]) -> str:
        """One batch: its metrics at `step` on the lineage run and on a nested batch run carrying `tags`."""
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        values = [Metric(k, float(v), now_ms, step) for k, v in metrics.items()]
        self.client.log_batch(lineage_run, metrics=values)
        run = self.client.create_run(
            self.experiment_id, run_name=f"batch {step}",
            tags={KIND_TAG: "batch", PARENT_RUN_TAG: lineage_run} | dict(tags),
        )
        self.client.log_batch(run.info.run_id, metrics=values)
        self.client.set_terminated(run.info.run_id)
        return run.info.run_id

    def log_file(self, run_id: str, artifact_path: str, draw: Callable[[Path], None]) -> None:
        """Save a file written by `draw(path)` (a plot, a JSON record) as an artifact of the run at
        `artifact_path` (dir/name)."""
        import tempfile

        folder, name = os.path.split(artifact_path)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            draw(path)
            self.client.log_artifact(run_id, str(path), folder or None)

    def end_lineage(self, lineage_run: str, reason: str) -> None:
        """Close a lineage run (a rollback replaced it)."""
        self.client.set_tag(lineage_run, "ckl.ended_by", reason)
        self.client.set_terminated(lineage_run)

    def log_rollback(self, record: Mapping[str, object]) -> str:
        """One rollback as its own run: who ran it, every field of `record` as a tag (long lists as their
        length) and the whole record as the artifact rollback.json."""
        tags = {KIND_TAG: "rollback", "ckl.operator": operator()}
        for key, value in record.items():
            text = str(value)
            if len(text) > MAX_TAG_CHARS and isinstance(value, list | dict):
                text = f"{len(value)} (see rollback.json)"
            tags[f"ckl.rollback.{key}"] = text[:MAX_TAG_CHARS]
        name = f"rollback {record.get('from_version')} -> {record.get('to_version')}"
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        self.log_file(run.info.run_id, "rollback.json",
                        lambda path: path.write_text(json.dumps(dict(record), indent=1, default=str)))
        self.client.set_terminated(run.info.run_id)
        return run.info.run_id

    def params(self, run_id: str) -> dict[str, str]:
        """A run's params."""
        return dict(self.client.get_run(run_id).data.params)

    def recorded_pool_sha256(self, lineage: str, version: int) -> str | None:
        """The pool checksum a batch recorded for memory `version` in `lineage` or, for versions before the
        lineage forked, in its ancestors; None when no batch recorded that version."""
        for _ in range(100):  # a lineage chain longer than this is not followed
            found = self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`{KIND_TAG}` = 'batch' AND tags.lineage = '{lineage}' "
                              f"AND tags.memory_version = '{int(version)}'",
                max_results=1,
            )
            if found:
                return found[0].data.tags.get("pool_sha256") or None
            runs = self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`{KIND_TAG}` = 'lineage' AND tags.`{LINEAGE_TAG}` = '{lineage}'",
                max_results=1,
            )
            tags = runs[0].data.tags if runs else {}
            if PARENT_LINEAGE_TAG not in tags or int(tags[FROM_VERSION_TAG]) < version:
                return None
            lineage = tags[PARENT_LINEAGE_TAG]
        return None

    def set_alert(self, run_id: str, message: str) -> None:
        """Mark a run with a retention alert (an empty message clears it)."""
        self.client.set_tag(run_id, ALERT_TAG, message)


def operator() -> str:
    """Who is acting: CKL_OPERATOR, else the login name."""
    try:
        return os.environ.get("CKL_OPERATOR") or getpass.getuser()
    except OSError:  # no login name in some containers
        return "unknown"
