"""The retention dashboard: a deployment's MLflow experiment as one self-contained static HTML page.

`load` reads the lineage runs (with every metric's history, step = memory version) and the rollback runs
of the experiment that monitoring.tracking writes; `check` turns the newest lineage's recent retention into
alerts; `render_html` draws the page: status, retention by age (pool alone vs with the bank), retention,
degradation loss, throughput and dead letters over batches, and the lineages with their rollbacks. Plots
are inline SVG from matplotlib, so the page needs nothing but itself.

mlflow and matplotlib are imported lazily so that `ckl --help` and DAG parsing stay fast.
"""

import html
import io
import re
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from monitoring.probes import BUCKETS, MODES, retention_metric
from monitoring.tracking import (
    ALERT_TAG,
    FROM_VERSION_TAG,
    KIND_TAG,
    LINEAGE_TAG,
    PARENT_LINEAGE_TAG,
    experiment_name,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from mlflow import MlflowClient
    from mlflow.entities import Run

BUCKET_NAMES = tuple(bucket.name for bucket in BUCKETS)
BUCKET_COLORS = ("#1b9e77", "#66a61e", "#e6ab02", "#d95f02", "#7570b3")
MODE_COLORS = {"pool": "#8da0cb", "bank": "#fc8d62"}
# batches averaged per age bucket: with about one probe question per batch, 50 batches give each of the
# five buckets about ten questions
DEFAULT_WINDOW = 50
ROLLBACK_COLUMNS = ("from_version", "to_version", "mode", "excluded", "removed_documents")


class ReportError(Exception):
    """The experiment cannot be reported (missing, or no lineage yet)."""


@dataclass(frozen=True)
class Lineage:
    """A lineage run: its tags and metric histories (metric -> {step: value}; step: memory version)."""

    run_id: str
    name: str
    started_ms: int
    parent: str | None = None
    from_version: int | None = None
    ended_by: str | None = None
    alert: str | None = None
    history: Mapping[str, Mapping[int, float]] = field(default_factory=dict)

    @property
    def steps(self) -> list[int]:
        """The memory versions of its batches (every step any metric was logged at), ascending."""
        return sorted({step for values in self.history.values() for step in values})

    def last_steps(self, window: int) -> list[int]:
        """The memory versions of its last `window` batches."""
        if window < 1:
            raise ValueError(f"window must be at least 1 batch, got {window}")
        return self.steps[-window:]

    def series(self, metric: str) -> dict[int, float]:
        """One metric's values by step (empty if never logged)."""
        return dict(self.history.get(metric, {}))

    def latest(self, metric: str) -> float | None:
        """The metric's value at its newest step."""
        values = self.history.get(metric)
        return values[max(values)] if values else None


@dataclass(frozen=True)
class Rollback:
    """One rollback run: when, by whom, and its `ckl.rollback.<field>` tags by field."""

    run_id: str
    started_ms: int
    operator: str
    fields: Mapping[str, str]


@dataclass(frozen=True)
class ReportData:
    """An experiment's lineages and rollbacks, each oldest first."""

    experiment: str
    lineages: list[Lineage]
    rollbacks: list[Rollback]

    @property
    def current(self) -> Lineage:
        """The newest lineage (the one the server is writing)."""
        return self.lineages[-1]

    def chain(self) -> list[Lineage]:
        """The newest lineage, then the lineage it was rolled back from, and so on."""
        by_name = {lineage.name: lineage for lineage in self.lineages}
        chain = [self.current]
        while (parent := by_name.get(chain[-1].parent or "")) and parent not in chain:
            chain.append(parent)
        return chain


# --- reading MLflow ---------------------------------------------------------------------------------


def load(tracking_uri: str, experiment: str | None = None) -> ReportData:
    """The lineages and rollbacks of `experiment` (default: this deployment's) at `tracking_uri`."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    name = experiment or experiment_name()
    found = client.get_experiment_by_name(name)
    if found is None:
        raise ReportError(f"no MLflow experiment {name!r} at {tracking_uri}")
    lineage_runs = _runs(client, found.experiment_id, "lineage")
    if not lineage_runs:
        raise ReportError(f"experiment {name!r} has no lineage yet: nothing was ingested")
    with ThreadPoolExecutor(max_workers=8) as pool:
        lineages = list(pool.map(lambda run: _lineage(client, run), lineage_runs))
    rollbacks = [_rollback(run) for run in _runs(client, found.experiment_id, "rollback")]
    return ReportData(name, lineages, rollbacks)


def _runs(client: "MlflowClient", experiment_id: str, kind: str) -> list["Run"]:
    """Every active run of one `ckl.kind`, oldest first."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=f"tags.`{KIND_TAG}` = '{kind}'",
                                  order_by=["attributes.start_time ASC"], page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _lineage(client: "MlflowClient", run: "Run") -> Lineage:
    tags = run.data.tags
    from_version = tags.get(FROM_VERSION_TAG, "")
    return Lineage(
        run_id=run.info.run_id,
        name=tags.get(LINEAGE_TAG, run.info.run_id),
        started_ms=run.info.start_time,
        parent=tags.get(PARENT_LINEAGE_TAG) or None,
        from_version=int(from_version) if from_version.isdigit() else None,
        ended_by=tags.get("ckl.ended_by") or None,
        alert=tags.get(ALERT_TAG) or None,
        history={key: _history(client, run.info.run_id, key) for key in run.data.metrics},
    )


def _history(client: "MlflowClient", run_id: str, key: str) -> dict[int, float]:
    """A metric's values by step; a step logged twice (a redelivered batch) keeps its newest value."""
    metrics = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return {metric.step: metric.value for metric in metrics}


def _rollback(run: "Run") -> Rollback:
    prefix = "ckl.rollback."
    tags = run.data.tags
    fields = {key.removeprefix(prefix): value for key, value in tags.items() if key.startswith(prefix)}
    return Rollback(run.info.run_id, run.info.start_time, tags.get("ckl.operator", "?"), fields)


# --- alerts -----------------------------------------------------------------------------------------


def window_means(lineage: Lineage, mode: str, window: int, score: str = "em") -> dict[str, float]:
    """Mean retention per age bucket over the lineage's last `window` batches (buckets with data only)."""
    recent = set(lineage.last_steps(window))
    means = {}
    for bucket in BUCKET_NAMES:
        values = [v for step, v in lineage.series(retention_metric(mode, bucket, score)).items()
                  if step in recent]
        if values:
            means[bucket] = sum(values) / len(values)
    return means


def check(report_data: ReportData, threshold: float, mode: str = "bank",
          window: int = DEFAULT_WINDOW) -> list[str]:
    """One alert per age bucket whose mean EM over the newest lineage's last `window` batches (with the
    bank, or from the pool alone) is below `threshold`; buckets without data raise none."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    current = report_data.current
    batches = len(current.last_steps(window))
    return [
        f"retention age {bucket} ({mode}): {mean:.1%} < {threshold:.1%} over the last {batches} batches"
        for bucket, mean in window_means(current, mode, window).items()
        if mean < threshold
    ]


# --- the page ---------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #222;
       background: #f6f7f9; }
main { max-width: 1180px; margin: 0 auto; padding: 24px; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 0 0 8px; }
.meta { color: #666; font-size: 13px; margin-bottom: 16px; }
.status { padding: 12px 16px; border-radius: 6px; font-weight: 600; margin-bottom: 20px; }
.status.ok { background: #e3f4e8; color: #17622f; border: 1px solid #9fd3ae; }
.status.alert { background: #fde8e6; color: #9b1c10; border: 1px solid #f1a59c; }
.status ul { margin: 6px 0 0; padding-left: 20px; font-weight: 500; }
section { background: #fff; border: 1px solid #e1e4e8; border-radius: 6px; padding: 16px 20px;
          margin-bottom: 20px; }
.note { color: #666; font-size: 13px; margin: 0 0 8px; }
svg { max-width: 100%; height: auto; }
table { border-collapse: collapse; width: 100%; font-size: 13px; margin-bottom: 12px; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid #eceef1; }
th { background: #f0f2f5; } tr.current td { font-weight: 600; }
"""


def render_html(report_data: ReportData, alerts: list[str], threshold: float, mode: str = "bank",
                window: int = DEFAULT_WINDOW, generated: datetime | None = None) -> str:
    """The dashboard as one self-contained HTML page (inline CSS and SVG, no external URLs)."""
    chain = report_data.chain()
    title = f"ckl retention: {report_data.experiment}"
    body = "".join([
        f"<h1>{_esc(title)}</h1>",
        _meta(report_data, generated or datetime.now(UTC)),
        _status(alerts, threshold, mode, window),
        _section("Retention by age",
                 f"Exact match per age bucket (injections since the entry's own), mean over the last "
                 f"{window} batches of lineage {report_data.current.name}: the pool alone vs with retrieval "
                 "from the bank.",
                 _svg(_age_figure(report_data.current, window, threshold, mode))),
        _section("Retention over batches",
                 "Exact match per age bucket at each memory version; degradation loss of held-out text. "
                 + _chain_note(chain),
                 _svg(_retention_figure(chain)) + _svg(_degradation_figure(chain))),
        _section("Throughput and dead letters",
                 "Documents injected per second, and documents sent to the dead-letter queue, per batch. "
                 + _chain_note(chain),
                 _svg(_throughput_figure(chain))),
        _section("Lineages and rollbacks",
                 "A rollback ends a lineage and starts a new one from an earlier memory version.",
                 _lineage_table(report_data) + _rollback_table(report_data)),
    ])
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
            f"<style>{_CSS}</style></head><body><main>{body}</main></body></html>\n")


def _esc(value: object) -> str:
    return html.escape(str(value))


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _meta(report_data: ReportData, generated: datetime) -> str:
    current = report_data.current
    version = current.steps[-1] if current.steps else "-"
    entries = current.latest("bank_entries")
    documents = sum(current.series("documents").values())
    return (f'<div class="meta">lineage <b>{_esc(current.name)}</b> &middot; memory version {_esc(version)} '
            f"&middot; {len(current.steps)} batches, {documents:.0f} documents in this lineage"
            f"{'' if entries is None else f' &middot; {entries:.0f} bank entries'}"
            f" &middot; generated {generated:%Y-%m-%d %H:%M} UTC</div>")


def _status(alerts: list[str], threshold: float, mode: str, window: int) -> str:
    rule = f"{mode} retention &ge; {threshold:.1%} in every age bucket over the last {window} batches"
    if not alerts:
        return f'<div class="status ok" id="status">Status: OK &mdash; {rule}</div>'
    items = "".join(f"<li>{_esc(alert)}</li>" for alert in alerts)
    return f'<div class="status alert" id="status">Status: ALERT &mdash; {rule} fails<ul>{items}</ul></div>'


def _section(heading: str, note: str, content: str) -> str:
    return f'<section><h2>{_esc(heading)}</h2><p class="note">{_esc(note)}</p>{content}</section>'


def _chain_note(chain: list[Lineage]) -> str:
    if len(chain) == 1:
        return ""
    return "Faded dashed lines: earlier lineages " + ", ".join(old.name for old in chain[1:]) + "."


def _table(headers: Iterable[str], rows: Iterable[tuple[list[object], bool]]) -> str:
    head = "".join(f"<th>{_esc(name)}</th>" for name in headers)
    body = "".join(
        f'<tr{" class=current" if current else ""}>' + "".join(f"<td>{_esc(cell)}</td>" for cell in cells)
        + "</tr>" for cells, current in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _lineage_table(report_data: ReportData) -> str:
    def row(lineage: Lineage) -> list[object]:
        steps = lineage.steps
        versions = f"{steps[0]}–{steps[-1]}" if steps else "-"
        parent = f"{lineage.parent} @ v{lineage.from_version}" if lineage.parent else "-"
        ended = lineage.ended_by or ("current" if lineage is report_data.current else "-")
        alert = lineage.alert or "-"
        return [lineage.name, _when(lineage.started_ms), versions, len(steps), parent, ended, alert]

    headers = ("lineage", "started", "memory versions", "batches", "rolled back from", "ended by", "alert")
    lineages = report_data.lineages[::-1]
    return _table(headers, ((row(lineage), lineage is report_data.current) for lineage in lineages))


def _rollback_table(report_data: ReportData) -> str:
    if not report_data.rollbacks:
        return '<p class="note">No rollbacks.</p>'

    def row(rollback: Rollback) -> list[object]:
        fields = rollback.fields
        lineages = f"{fields.get('from_lineage', '?')} → {fields.get('to_lineage', '?')}"
        return [_when(rollback.started_ms), rollback.operator,
                *(fields.get(name, "-") for name in ROLLBACK_COLUMNS), lineages]

    headers = ("rollback at", "by", "from version", "to version", "mode", "excluded", "removed documents",
               "lineage")
    return _table(headers, ((row(rollback), False) for rollback in report_data.rollbacks[::-1]))


# --- plots ------------------------------------------------------------------------------------------


def _figure(width: float, height: float, columns: int = 1) -> tuple["Figure", list["Axes"]]:
    """A matplotlib figure (no pyplot: safe in threads and servers) and its axes, in the page's style."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    axes = list(figure.subplots(1, columns, squeeze=False)[0])
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    return figure, axes


def _svg(figure: "Figure") -> str:
    """The figure as inline SVG markup (no XML prolog, no metadata), with text kept as text."""
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        figure.savefig(buffer, format="svg")
    markup = re.sub(r"^.*?(?=<svg)", "", buffer.getvalue(), flags=re.S)
    return re.sub(r"<metadata>.*?</metadata>", "", markup, flags=re.S)


def _percent_axis(ax: "Axes") -> None:
    from matplotlib.ticker import PercentFormatter

    ax.set_ylim(0, 1.05)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))


def _no_data(ax: "Axes") -> None:
    ax.text(0.5, 0.5, "no data yet", transform=ax.transAxes, ha="center", va="center", color="#999")


def _age_figure(lineage: Lineage, window: int, threshold: float, mode: str) -> "Figure":
    figure, (ax,) = _figure(11, 3.6)
    width, positions = 0.38, range(len(BUCKET_NAMES))
    for offset, bar_mode in ((-width / 2, "pool"), (width / 2, "bank")):
        means = window_means(lineage, bar_mode, window)
        heights = [means.get(bucket, 0.0) for bucket in BUCKET_NAMES]
        label = "pool alone" if bar_mode == "pool" else "with bank"
        bars = ax.bar([p + offset for p in positions], heights, width, label=label,
                      color=MODE_COLORS[bar_mode])
        ax.bar_label(bars, labels=[f"{means[b]:.0%}" if b in means else "n/a" for b in BUCKET_NAMES],
                     fontsize=8, padding=2)
    ax.axhline(threshold, color="#c0392b", linestyle="--", linewidth=1, label=f"alert threshold ({mode})")
    ax.set_xticks(list(positions), [f"age {bucket}" for bucket in BUCKET_NAMES])
    ax.set_ylabel("exact match")
    _percent_axis(ax)
    ax.legend(loc="upper right", fontsize=8, ncols=3)
    return figure


def _plot_chain(ax: "Axes", chain: list[Lineage], metric: str, color: str, label: str | None = None) -> bool:
    """One metric of every lineage in the chain (the newest solid and labelled); whether any had data."""
    drawn = False
    for index, lineage in enumerate(chain):
        series = lineage.series(metric)
        if not series:
            continue
        steps = sorted(series)
        style = {"linewidth": 1.8, "label": label} if index == 0 else {"linewidth": 1, "alpha": 0.35,
                                                                       "linestyle": "--"}
        ax.plot(steps, [series[s] for s in steps], color=color, marker="." if len(steps) < 40 else None,
                **style)
        drawn = True
    return drawn


def _mark_rollback(ax: "Axes", lineage: Lineage) -> None:
    if lineage.parent and lineage.from_version is not None:
        ax.axvline(lineage.from_version, color="#555", linewidth=0.8, linestyle=":")
        ax.annotate(f"rollback to v{lineage.from_version}", (lineage.from_version, 1.0),
                    xycoords=("data", "axes fraction"), fontsize=8, color="#555", xytext=(3, -10),
                    textcoords="offset points")


def _finish(ax: "Axes", drawn: bool, xlabel: str = "memory version") -> None:
    ax.set_xlabel(xlabel)
    if not drawn:
        _no_data(ax)
    elif ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="lower left")


def _retention_figure(chain: list[Lineage]) -> "Figure":
    figure, axes = _figure(11, 3.6, columns=2)
    for ax, mode in zip(axes, ("pool", "bank"), strict=True):
        drawn = False
        for bucket, color in zip(BUCKET_NAMES, BUCKET_COLORS, strict=True):
            drawn |= _plot_chain(ax, chain, retention_metric(mode, bucket), color, f"age {bucket}")
        ax.set_title("pool alone" if mode == "pool" else "with bank", fontsize=11)
        ax.set_ylabel("exact match")
        _percent_axis(ax)
        _mark_rollback(ax, chain[0])
        _finish(ax, drawn)
    return figure


def _degradation_figure(chain: list[Lineage]) -> "Figure":
    figure, (ax,) = _figure(11, 2.4)
    drawn = _plot_chain(ax, chain, "degradation_loss", "#444")
    ax.set_title("degradation loss (held-out text)", fontsize=11)
    ax.set_ylabel("loss")
    _mark_rollback(ax, chain[0])
    _finish(ax, drawn)
    return figure


def _throughput_figure(chain: list[Lineage]) -> "Figure":
    from matplotlib.ticker import MaxNLocator

    figure, (speed, dlq) = _figure(11, 3.0, columns=2)
    _finish(speed, _plot_chain(speed, chain, "documents_per_s", "#2c7fb8"))
    speed.set_title("throughput", fontsize=11)
    speed.set_ylabel("documents / s")
    series = chain[0].series("dlq")
    dlq.bar(list(series), list(series.values()), color="#d95f02", width=0.8)
    dlq.set_title(f"dead-lettered documents (lineage {chain[0].name})", fontsize=11)
    dlq.set_ylabel("documents")
    dlq.yaxis.set_major_locator(MaxNLocator(integer=True))
    _finish(dlq, bool(series))
    for ax in (speed, dlq):
        _mark_rollback(ax, chain[0])
    return figure


def save_retention_by_age(tracking_uri: str, lineage_run_id: str, path: Path, window: int = DEFAULT_WINDOW,
                          threshold: float = 0.8, mode: str = "bank") -> None:
    """The page's retention-by-age plot of one lineage run as a PNG at `path` (logged as an MLflow artifact
    at each checkpoint)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    lineage = _lineage(client, client.get_run(lineage_run_id))
    _age_figure(lineage, window, threshold, mode).savefig(path, format="png", dpi=100)
