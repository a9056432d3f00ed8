"""The trend_report flow: the trend table and chart of the snapshots, as Prefect artifacts. Wiring only."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.triage import DEFAULT_CONFIG, DEFAULT_OUT, resolve_config
from tasks.config import LoopConfig
from tasks.report import TrendReport, report_period, shown_table, trend_report
from tasks.snapshot import open_store
from tasks.summary import artifact_key, trace_text


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


@flow(name="trend-report", log_prints=True)
def trend_report_flow(config: LoopConfig | None = DEFAULT_CONFIG, since: str = "7d", out: str = DEFAULT_OUT,
                      config_block: str | None = None) -> dict[str, Any]:
    """The trend table and chart of the snapshots of the windows since `since`, as artifacts.

    Args:
        config: The loop config: where its snapshots are and the spike settings.
        since: A duration back from the latest window, like 7d or 36h, or an ISO time.
        out: The state directory on the worker that the triage runs wrote; the chart goes to trend.png in it.
        config_block: Name of a LoopConfigBlock to use instead of config (create one under Blocks).
    """
    config = resolve_config(config, config_block)
    report = report_task(config, since, out)
    chart = Path(out) / "trend.png"
    chart.parent.mkdir(parents=True, exist_ok=True)
    chart.write_bytes(report.chart_png)
    publish_report(report, str(chart), config.name)
    print(f"trend report, {report_period(report)}: {report.spiking_windows} windows spiked; chart {chart}")
    return {"windows": report.windows, "spiking_windows": report.spiking_windows, "chart": str(chart)}
