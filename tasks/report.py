"""The trend report: a table of the series per window and a chart, from snapshots only."""

from __future__ import annotations

import base64
import contextlib
import io
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from tasks.analysis.attribution import REASONS
from tasks.analysis.trends import new_failure_modes, read_series, spike_checks
from tasks.config import ConfigError, LoopConfig, SpikeConfig, parse_duration
from tasks.sinks.connections import open_store
from tasks.store import SnapshotStore
from tasks.summary import artifact_key, trace_text

TOP_MODES = 4


@dataclass
class TrendReport:
    table: pd.DataFrame  # one row per window
    spikes: pd.DataFrame  # the spiking (window, series) checks and new failure modes
    chart_png: bytes
    windows: int

    @property
    def spiking_windows(self) -> int:
        return int(self.spikes["window_start"].nunique())


def since_start(since: str, latest: datetime) -> datetime:
    """`--since`: an ISO time, or a duration back from the latest window (`7d`, `36h`)."""
    with contextlib.suppress(ValueError):
        return latest - parse_duration(since)
    try:
        moment = datetime.fromisoformat(since)
    except ValueError:
        raise ConfigError(f"--since {since!r} is neither a duration like 7d nor an ISO time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def trend_report(store: SnapshotStore, since: str, spikes: SpikeConfig) -> TrendReport:
    """Series of the windows since `since`; spikes checked against baselines that may start before it."""
    every = store.windows("windows")
    if not every:
        raise ConfigError(f"no snapshots in {store.url}; run `tracetriage run` first or check snapshots.url")
    start = since_start(since, every[-1])
    shown = [w for w in every if w >= start]
    first = every.index(shown[0])
    series = read_series(store, every[max(0, first - spikes.baseline_windows):])
    checks = spike_checks(series, spikes)
    modes = new_failure_modes(series, spikes)
    at = pd.Timestamp(shown[0])
    checks, modes = checks[checks["window_start"] >= at], modes[modes["window_start"] >= at]
    series = series[series["window_start"] >= at]
    flagged = pd.concat([checks.loc[checks["spike"], ["window_start", "series", "rate", "baseline_rate"]],
                         modes[["window_start", "series", "rate"]].assign(baseline_rate=0.0)], ignore_index=True)
    table = trend_table(series, flagged)
    return TrendReport(table=table, spikes=flagged, chart_png=trend_chart(series, flagged), windows=len(shown))


def top_modes(series: pd.DataFrame, top: int = TOP_MODES) -> list[str]:
    """The root causes with the most failing traces over the period."""
    causes = series[series["kind"] == "root_cause"]
    return causes.groupby("series")["count"].sum().sort_values(ascending=False).index[:top].tolist()


def mode_label(series: str) -> str:
    """`root_cause:rerank (below_threshold)` as `rerank low score`."""
    span, _, reason = series.removeprefix("root_cause:").rstrip(")").partition(" (")
    return f"{span} {REASONS.get(reason, reason)}"


def trend_table(series: pd.DataFrame, flagged: pd.DataFrame) -> pd.DataFrame:
    """Per window: traces, failure rate, each root cause's share of failures, evaluator error rate, spike."""
    overall = series[series["kind"] == "failure_rate"].set_index("window_start")
    table = pd.DataFrame({"traces": overall["total"], "failing": overall["count"], "failure_rate": overall["rate"]})
    errors = series[series["kind"] == "evaluator_error_rate"]
    if len(errors):
        judged = errors.groupby("window_start")[["count", "total"]].sum()
        table["evaluator_error_rate"] = judged["count"] / judged["total"]
    modes = series[series["series"].isin(top_modes(series))]
    shares = modes.pivot(index="window_start", columns="series", values="rate").fillna(0.0)
    table = table.join(shares.rename(columns=mode_label))
    spiking = flagged.groupby("window_start")["series"].agg(
        lambda s: sorted(s)[0] + (f" (+{len(s) - 1})" if len(s) > 1 else ""))
    table["spike"] = spiking.reindex(table.index).fillna("")
    table.index = table.index.strftime("%Y-%m-%d %H:%M")
    table.index.name = "window"
    return table.reset_index()


def shown_table(table: pd.DataFrame) -> pd.DataFrame:
    """The trend table as a person reads it: rates as percentages with one decimal."""
    shown = table.copy()
    for column in shown.columns:
        if column not in ("window", "traces", "failing", "spike"):
            shown[column] = shown[column].map(lambda v: "" if pd.isna(v) else f"{v:.1%}")
    return shown


def format_table(table: pd.DataFrame) -> str:
    return shown_table(table).to_string(index=False)


def trend_chart(series: pd.DataFrame, flagged: pd.DataFrame) -> bytes:
    """PNG: failure rate over time with spikes marked, and the top failure modes' shares."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    overall = series[series["kind"] == "failure_rate"].set_index("window_start")["rate"]
    fig, (rate_ax, modes_ax) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True, constrained_layout=True)
    rate_ax.plot(overall.index, overall.to_numpy() * 100, color="#1f5fa8", linewidth=1.4, marker="o", markersize=3,
                 label="failure rate")
    spiked = overall[overall.index.isin(flagged["window_start"])]
    if len(spiked):  # a "spike" legend entry when nothing spiked reads as a spike
        rate_ax.scatter(spiked.index, spiked.to_numpy() * 100, color="#d62728", zorder=3, s=36, label="spike")
    rate_ax.set_ylabel("failing traces (%)")
    # Headroom above the highest window, so its point and spike dot are not cut by the frame or hidden by the legend.
    rate_ax.set_ylim(0, max(float(overall.max()) * 100 * 1.25, 1.0))
    rate_ax.legend(loc="upper left", framealpha=0.8)
    rate_ax.set_title("Failure rate per window")
    for mode in top_modes(series):
        share = series[series["series"] == mode].set_index("window_start")["rate"].reindex(overall.index).fillna(0)
        modes_ax.plot(share.index, share.to_numpy() * 100, linewidth=1.2, marker="o", markersize=2.5,
                      label=mode_label(mode))
    for moment in spiked.index:
        for ax in (rate_ax, modes_ax):
            ax.axvline(moment, color="#d62728", alpha=0.25, linewidth=3)
    modes_ax.set_ylabel("share of failures (%)")
    modes_ax.set_ylim(0, 115)  # room above 100% for the legend and the top points
    modes_ax.set_yticks(range(0, 101, 20))
    modes_ax.set_title("Top failure modes (root causes)")
    modes_ax.legend(loc="upper left", fontsize=8, ncol=2)
    modes_ax.xaxis.set_major_formatter(mdates.DateFormatter("%b %d %H:%M"))  # every tick with its month and day
    fig.autofmt_xdate()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def report_period(report: TrendReport) -> str:
    first, last = report.table["window"].iloc[0], report.table["window"].iloc[-1]
    return f"{report.windows} windows, {first} .. {last} UTC"


@task(name="trend-report", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def report_task(config: LoopConfig, since: str, out: str) -> TrendReport:
    return trend_report(open_store(config.snapshots, Path(out) / "snapshots"), since, config.spikes)


@task(name="publish-trend-report", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def publish_report(report: TrendReport, chart_path: str, loop: str) -> None:
    rows = shown_table(report.table).to_dict("records")
    create_table_artifact(table=rows, key=artifact_key(loop, "trend-table"),
                          description=f"{loop}: trend series, {report_period(report)}")
    image = base64.b64encode(report.chart_png).decode()
    spikes = [f"- {row.window_start:%Y-%m-%d %H:%M}: **{trace_text(row.series)}** at {row.rate:.1%}"
              for row in report.spikes.itertuples()] or ["- none"]
    create_markdown_artifact(
        key=artifact_key(loop, "trend-report"),
        description=f"{loop}: failure rate and top failure modes, {report_period(report)}",
        markdown="\n".join([f"# Trends: {report_period(report)}", "", f"![trend chart](data:image/png;base64,{image})",
                            "", "## Spikes", "", *spikes, "",
                            f"The chart is also written on the machine that ran this flow, as `{chart_path}`."]),
    )


def write_chart(report: TrendReport, out: str) -> Path:
    """The chart as `trend.png` in the state directory, on the machine that ran the report."""
    chart = Path(out) / "trend.png"
    chart.parent.mkdir(parents=True, exist_ok=True)
    chart.write_bytes(report.chart_png)
    return chart
