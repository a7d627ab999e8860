"""The retention dashboard on the real MLflow server: `monitoring.report` reads what `Tracker` wrote (two
lineages, the second started by a rollback), `ckl report --check` alerts on a bucket below the threshold
and sets/clears the `ckl.alert` tag, the page renders in a real headless Chromium, and the `ckl_report`
DAG runs in Airflow and fails on an alert."""

import html
import logging
import random
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import mlflow
import pytest
from repo_dags import load_dag

from cli.main import main
from monitoring.probes import BUCKETS, retention_metric
from monitoring.report import check, load
from monitoring.tracking import ALERT_TAG, MLFLOW_URI_ENV, Tracker, experiment_name

DOCS_PER_BATCH = 32
# mean exact match per age bucket (the oldest bucket stays empty: 18 batches of 32 never reach age 1001)
POOL_EM = {"0": 0.93, "1-10": 0.7, "11-100": 0.31, "101-1000": 0.06, "over-1000": 0.02}
BANK_EM = {"0": 0.95, "1-10": 0.91, "11-100": 0.88, "101-1000": 0.84, "over-1000": 0.8}
LOW_BUCKET, LOW_EM = "11-100", 0.42
SECTIONS = (
    "Retention by age", "Retention over batches", "Throughput and dead letters", "Lineages and rollbacks"
)
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def batch_metrics(version: int, rng: random.Random, bank_em: dict[str, float]) -> dict[str, float]:
    """One batch's metrics as the ingestion logs them, with retention of the buckets the bank has reached."""
    entries = DOCS_PER_BATCH * version
    seconds = rng.uniform(1.5, 2.5)
    metrics = {
        "documents": DOCS_PER_BATCH, "duplicates": rng.choice((0, 0, 1)), "dlq": rng.choice((0, 0, 0, 1, 2)),
        "injections": DOCS_PER_BATCH, "injection_ms": 1000 * seconds,
        "documents_per_s": DOCS_PER_BATCH / seconds, "memory_version": version, "bank_entries": entries,
        "probe_questions": 10, "probe_ms": 300 + 50 * rng.random(), "probe_share": 0.12,
        "degradation_loss": 2.1 + 0.004 * version + rng.uniform(-0.03, 0.03),
    }
    for bucket in (b for b in BUCKETS if entries > b.low):
        for mode, means in (("pool", POOL_EM), ("bank", bank_em)):
            em = min(1.0, max(0.0, means[bucket.name] + rng.uniform(-0.04, 0.04)))
            metrics[retention_metric(mode, bucket.name)] = em
            metrics[retention_metric(mode, bucket.name, "f1")] = min(1.0, em + 0.05)
    return metrics


def batch_tags(lineage: str, version: int) -> dict[str, str]:
    return {"lineage": lineage, "memory_version": str(version), "pool_sha256": f"{lineage}{version:063x}"}


def populate(uri: str, experiment: str, steps: int = 12, rollback_to: int = 6,
             low_em: float = LOW_EM, seed: int = 0) -> dict:
    """Lineage "a" over `steps` batches, a rollback to version `rollback_to`, then lineage "b" (from it) over
    `steps` more batches whose bank retention of LOW_BUCKET is about `low_em`. Returns the run ids and the
    metrics logged per lineage and step."""
    tracker, rng = Tracker(uri, experiment), random.Random(seed)
    params = {"model": "tiny", "pool_size": 2048, "tokens_per_injection": 128, "batch_size": DOCS_PER_BATCH}
    first = tracker.lineage_run("a", lambda: params)
    logged: dict[str, dict[int, dict[str, float]]] = {"a": {}, "b": {}}
    for version in range(1, steps + 1):
        logged["a"][version] = batch_metrics(version, rng, BANK_EM)
        tracker.log_batch(first, version, logged["a"][version], batch_tags("a", version))
    rollback = tracker.log_rollback({
        "from_version": steps, "to_version": rollback_to, "mode": "replay", "excluded": "doc-17,doc-18",
        "removed_documents": DOCS_PER_BATCH * (steps - rollback_to), "pool_sha256": "9f2c" * 16,
        "from_lineage": "a", "to_lineage": "b",
    })
    tracker.end_lineage(first, "rollback")
    second = tracker.lineage_run("b", lambda: params, parent_lineage="a", from_version=rollback_to)
    for version in range(rollback_to + 1, rollback_to + steps + 1):
        logged["b"][version] = batch_metrics(version, rng, BANK_EM | {LOW_BUCKET: low_em})
        tracker.log_batch(second, version, logged["b"][version], batch_tags("b", version))
    return {"a": first, "b": second, "rollback": rollback, "logged": logged}


@pytest.fixture
def deployment(mlflow_server, monkeypatch) -> str:
    """A deployment name (and so an experiment) no other test uses; rollbacks are by "alice"."""
    monkeypatch.setenv("CKL_OPERATOR", "alice")
    return f"test-report-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def populated(mlflow_server, deployment) -> dict:
    return populate(mlflow_server.uri, experiment_name(deployment))


WINDOW = ("--window", "10")  # the batches expected_alert averages


def expected_alert(logged: dict[int, dict[str, float]], window: int = 10, threshold: float = 0.8) -> str:
    values = [logged[step][retention_metric("bank", LOW_BUCKET)] for step in sorted(logged)[-window:]]
    return (f"retention age {LOW_BUCKET} (bank): {sum(values) / len(values):.1%} < {threshold:.1%} "
            f"over the last {window} batches")


def report(uri: str, deployment: str, out: Path, *extra: str) -> int:
    return main(["report", "--out", str(out), "--mlflow-uri", uri, "--deployment", deployment, *extra])


def test_report_data_holds_each_lineage_history_by_memory_version_and_the_rollback(mlflow_server, deployment,
                                                                                   populated):
    data = load(mlflow_server.uri, experiment_name(deployment))

    assert [lineage.name for lineage in data.lineages] == ["a", "b"]
    first, current = data.lineages
    assert current is data.current and current.run_id == populated["b"]
    assert (current.parent, current.from_version, current.ended_by) == ("a", 6, None)
    assert first.ended_by == "rollback" and data.chain() == [current, first]
    assert first.steps == list(range(1, 13)) and current.steps == list(range(7, 19))
    for lineage in data.lineages:
        logged = populated["logged"][lineage.name]
        for metric in ("documents_per_s", "dlq", "degradation_loss", retention_metric("pool", "0"),
                       retention_metric("bank", LOW_BUCKET, "f1")):
            expected = {step: values[metric] for step, values in logged.items() if metric in values}
            assert lineage.series(metric) == pytest.approx(expected)
    assert not current.series(retention_metric("bank", "over-1000"))  # the bank never got that old

    (rollback,) = data.rollbacks
    assert rollback.operator == "alice"
    assert rollback.fields == {
        "from_version": "12", "to_version": "6", "mode": "replay", "excluded": "doc-17,doc-18",
        "removed_documents": "192", "pool_sha256": "9f2c" * 16, "from_lineage": "a", "to_lineage": "b",
    }

    assert check(data, 0.8, window=10) == [expected_alert(populated["logged"]["b"])]
    assert check(data, 0.8, window=3) == [expected_alert(populated["logged"]["b"], window=3)]
    assert {re.search(r"age (\S+)", alert)[1] for alert in check(data, 0.8, mode="pool")} == {
        "1-10", "11-100", "101-1000"}
    assert check(data, 0.3) == []


def test_ckl_report_check_exits_1_naming_the_bucket_and_tags_the_newest_lineage_until_it_passes(
    mlflow_server, deployment, populated, tmp_path, capsys, caplog
):
    client, out = mlflow.MlflowClient(mlflow_server.uri), tmp_path / "report.html"
    alert = expected_alert(populated["logged"]["b"])

    with caplog.at_level(logging.WARNING, logger="pipelines.report"):
        assert report(mlflow_server.uri, deployment, out, "--check", "--threshold", "0.8", *WINDOW) == 1
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "status: ALERT" in printed and alert in printed
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert warnings == [f"retention alert: {alert}"]
    assert client.get_run(populated["b"]).data.tags[ALERT_TAG] == alert
    assert ALERT_TAG not in client.get_run(populated["a"]).data.tags
    assert html.escape(alert) in out.read_text()

    assert report(mlflow_server.uri, deployment, out, "--check", "--threshold", "0.3", *WINDOW) == 0
    assert "status: OK" in capsys.readouterr().out
    assert client.get_run(populated["b"]).data.tags[ALERT_TAG] == ""

    assert report(mlflow_server.uri, deployment, out, "--threshold", "0.8", *WINDOW) == 0  # no --check
    assert "status: ALERT" in capsys.readouterr().out
    assert client.get_run(populated["b"]).data.tags[ALERT_TAG] == ""


def test_ckl_report_says_clearly_when_there_is_nothing_to_report(mlflow_server, deployment, tmp_path, capsys):
    assert report(mlflow_server.uri, deployment, tmp_path / "r.html") == 2
    assert f"no MLflow experiment 'ckl-{deployment}'" in capsys.readouterr().err

    Tracker(mlflow_server.uri, experiment_name(deployment))  # the experiment exists, with no lineage yet
    assert report(mlflow_server.uri, deployment, tmp_path / "r.html", "--check") == 2
    assert "has no lineage yet" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", "--window-size=1280,2000", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)


def test_the_report_is_one_self_contained_page_that_renders_in_headless_chromium(
    mlflow_server, deployment, populated, tmp_path
):
    assert Path(CHROMIUM).exists(), "Chromium is missing: scripts/setup.sh installs the Debian package"
    out, png = tmp_path / "report.html", tmp_path / "report.png"
    assert report(mlflow_server.uri, deployment, out) == 0
    page = out.read_text()
    namespaces = {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}
    assert set(re.findall(r"https?://[^\"'\s<>)]+", page)) <= namespaces  # nothing to fetch
    assert "<img" not in page and "<script" not in page and "<link" not in page

    dom = chromium("--dump-dom", out.as_uri(), profile=tmp_path / "profile").stdout
    for heading in SECTIONS:
        assert f"<h2>{heading}</h2>" in dom
    for bucket in BUCKETS:
        assert f"age {bucket.name}" in dom
    assert 'id="status"' in dom and "Status: ALERT" in dom and LOW_BUCKET in dom
    assert dom.count("<svg") == 4

    chromium(f"--screenshot={png}", out.as_uri(), profile=tmp_path / "profile")
    header = png.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    assert (int.from_bytes(header[16:20]), int.from_bytes(header[20:24])) == (1280, 2000)
    assert png.stat().st_size > 50_000  # drawn, not blank


def test_ckl_report_dag_writes_the_page_and_fails_on_a_retention_alert(
    airflow_home, mlflow_server, deployment, populated, tmp_path, monkeypatch
):
    monkeypatch.setenv(MLFLOW_URI_ENV, mlflow_server.uri)
    monkeypatch.setenv("CKL_DEPLOYMENT", deployment)
    dag, out = load_dag("ckl_report"), tmp_path / "dag-report.html"
    client = mlflow.MlflowClient(mlflow_server.uri)

    run = dag.test(run_conf={"out": str(out), "threshold": 0.3})
    assert run.state == "success" and "Status: OK" in out.read_text()
    assert client.get_run(populated["b"]).data.tags[ALERT_TAG] == ""

    run = dag.test(run_conf={"out": str(out), "threshold": 0.8, "window": 10})
    assert run.state == "failed" and "Status: ALERT" in out.read_text()
    assert client.get_run(populated["b"]).data.tags[ALERT_TAG] == expected_alert(populated["logged"]["b"])
