"""The trend_report flow: the trend table and chart of the snapshots, as Prefect artifacts. Wiring only."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.triage import DEFAULT_CONFIG, resolve_config
from tasks.config import DEFAULT_OUT, LoopConfig
from tasks.report import publish_report, report_period, report_task, write_chart


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
    chart = write_chart(report, out)
    publish_report(report, str(chart), config.name)
    print(f"trend report, {report_period(report)}: {report.spiking_windows} windows spiked; chart {chart}")
    return {"windows": report.windows, "spiking_windows": report.spiking_windows, "chart": str(chart)}
