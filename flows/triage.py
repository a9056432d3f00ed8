"""The triage flows: wiring only. Each stage's logic lives in `tasks/`."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from flows.local_api import record_task_runs_in_batches
from tasks.analysis.attribution import attribute_task
from tasks.analysis.failure_modes import aggregate_task
from tasks.analysis.trends import spike_task
from tasks.analysis.verdicts import partition_task
from tasks.config import DEFAULT_OUT, ConfigError, LoopConfig, RunnerConfig, source_identity
from tasks.contracts import WindowSpans, WindowTriage
from tasks.dispatch.ledger import unfinished_windows
from tasks.dispatch.send import dispatch_task
from tasks.evaluation.evaluate import evaluate_window, prepare_evaluation
from tasks.sinks.connections import open_store, validate
from tasks.sources.langsmith import window_range
from tasks.sources.windows import read_source
from tasks.store import snapshot_task, snapshot_window
from tasks.summary import (
    publish_artifacts,
    range_result,
    report_rollup,
    skipped_text,
    summary_text,
    window_summary,
    windows_table,
)

DEFAULT_CONFIG = LoopConfig()  # the flows' default, shown whole in Prefect's run form (the sample traces)
RETRY_WITHIN = timedelta(days=1)  # how far back the scheduled run looks for actions to try again

record_task_runs_in_batches()  # e.g. the temporary server Prefect starts for a Python loop


@flow(name="triage-window", flow_run_name="window {window.window_start:%Y-%m-%d %H:%M}",
      task_runner=ThreadPoolTaskRunner(max_workers=RunnerConfig().threads), log_prints=True)
def triage_window(config: LoopConfig, window: WindowSpans, source_token: str, out: str,
                  trace_url: str | None = None) -> dict[str, Any]:
    """Triage one window: evaluate in batches, partition, attribute, aggregate, check for a spike, snapshot,
    dispatch, publish.

    Args:
        config: The loop config.
        window: The window's spans, as the fetch stage wrote them.
        source_token: The source's cache token (its fingerprint, window size and work epoch).
        out: The state directory: snapshots, ledger, action log and work files.
        trace_url: For a LangSmith source, the project's trace URL prefix (example traces link to it).
    """
    scored = evaluate_window(config=config, window=window, source_token=source_token, out=out)
    verdicts = partition_task(scored=scored, configs=config.evaluators, rule_evaluators=config.rule_evaluators)
    attribution = attribute_task(scored=scored, verdicts=verdicts)
    modes = aggregate_task(scored=scored, verdicts=verdicts, attribution=attribution, configs=config.evaluators)
    triage = WindowTriage(scored=scored, verdicts=verdicts, attribution=attribution, modes=modes)
    store = open_store(config.snapshots, Path(out) / "snapshots")
    spike = spike_task(store=store, triage=triage, spikes=config.spikes)
    snapshot = snapshot_window(store=store, triage=triage, spans=config.snapshots.spans,
                               in_flow=bool(config.runner.dask_address))
    summary = window_summary(triage=triage, skipped=window.orphans, configs=config.evaluators, spike=spike,
                             trace_url=trace_url)
    # Spike episodes are read from the windows table: a crash in dispatch must not forget this window spiked.
    snapshot_task(store, window.window_start, {"windows": windows_table(summary, verdicts)})
    counts = dispatch_task(config=config, triage=triage, spike=spike, store=store, summary=summary,
                           action_log_path=str(Path(out) / "actions.jsonl"))
    summary = summary.with_actions(counts).with_snapshot(snapshot.result())
    snapshot_task(store, window.window_start, {"windows": windows_table(summary, verdicts)})
    publish_artifacts(summary.as_dict(), config.name, source_identity(config.source))
    print(summary_text(summary.as_dict()))
    return summary.as_dict()


def task_runner(runner: RunnerConfig) -> TaskRunner:
    """A bounded thread pool, or the Dask cluster at the runner's address (evaluation batches then run on its
    workers, each evaluating in its own process)."""
    if runner.dask_address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=runner.dask_address)
    return ThreadPoolTaskRunner(max_workers=runner.threads)


def resolve_config(config: LoopConfig | None, config_block: str | None) -> LoopConfig:
    """The config of the named LoopConfigBlock, else `config`, else the defaults (the sample traces)."""
    if config_block:
        from blocks.config import LoopConfigBlock

        return LoopConfigBlock.load(config_block).get_config()
    return config or LoopConfig()


def triage_windows(config: LoopConfig, start: datetime | None, end: datetime | None, out: str) -> dict[str, Any]:
    """Every window of the source between `start` and `end`, each its own `triage-window` subflow of the flow
    that calls this (so the run a person started holds the windows' runs and the roll-up)."""
    prepare_evaluation(config)
    source = read_source(config=config, start=start, end=end, out=out)
    windows = source.chosen()
    get_run_logger().info("%d windows of %s to triage; %s", len(windows), source.path,
                          skipped_text(source.spans.skipped) or "no records skipped")
    window_flow = triage_window.with_options(task_runner=task_runner(config.runner))
    states = [window_flow(config, window, source.token, out, source.trace_url, return_state=True)
              for window in windows]
    return range_result(config, source, states)


@flow(name="triage", log_prints=True)
def triage(
    config: LoopConfig | None = DEFAULT_CONFIG,
    start: datetime | None = None,
    end: datetime | None = None,
    out: str = DEFAULT_OUT,
    config_block: str | None = None,
) -> dict[str, Any]:
    """Triage every window of the source between `start` and `end`.

    Args:
        config: The loop config: source, window, evaluators, actions, snapshots, spike settings. Its defaults
            triage the built-in sample traces.
        start: The first window to triage (UTC). Empty: from the first window of the source; for a LangSmith
            source, the last closed window.
        end: Triage the windows that start before this time (UTC). Empty: up to the last window.
        out: The state directory on the worker: snapshots, ledger, action log and work files.
        config_block: Name of a LoopConfigBlock to use instead of config (create one under Blocks).
    """
    config = validate(resolve_config(config, config_block))
    result = triage_windows(config, start, end, out)
    report_rollup(config.name, [result])
    return result


@flow(name="triage-latest", log_prints=True)
def triage_latest(config: LoopConfig | None = DEFAULT_CONFIG, config_block: str | None = None,
                  out: str = DEFAULT_OUT) -> dict[str, Any]:
    """The last closed window: the one whose end plus the window lag has passed (the hourly schedule's run).

    First, the windows of the last day whose ledger holds failed or unfinished actions are triaged again (their
    evaluation comes from the cache; only the actions not sent go out), so a failure is tried again by the next
    scheduled run, not only by a manual rerun of its window.

    Args:
        config: The loop config: source, window, evaluators, actions, snapshots, spike settings. Its defaults
            triage the built-in sample traces.
        config_block: Name of a LoopConfigBlock to use instead of config (create one under Blocks).
        out: The state directory on the worker: snapshots, ledger, action log and work files.
    """
    loop = validate(resolve_config(config, config_block))
    start, end = window_range(None, None, loop.window.size_delta, loop.window.lag_delta)
    store = open_store(loop.snapshots, Path(out) / "snapshots")
    retried = []
    for window in unfinished_windows(store, loop.name, start - RETRY_WITHIN, start):
        get_run_logger().info("window %s has actions not sent: triaging it again", window.isoformat())
        retried.append(triage_windows(loop, window, window + loop.window.size_delta, out))
    latest = triage_windows(loop, start, end, out)
    report_rollup(loop.name, [*retried, latest])
    return {**latest, "retried": [w for r in retried for w in r["windows"]]}


@flow(name="triage-backfill", log_prints=True)
def triage_backfill(start: datetime, end: datetime, config: LoopConfig | None = DEFAULT_CONFIG,
                    config_block: str | None = None, out: str = DEFAULT_OUT) -> dict[str, Any]:
    """Every window starting in the range from start to end, each its own subflow: cached, idempotent and
    retryable alone.

    Args:
        start: The first window to triage (UTC).
        end: Triage the windows that start before this time (UTC).
        config: The loop config: source, window, evaluators, actions, snapshots, spike settings. Its defaults
            triage the built-in sample traces.
        config_block: Name of a LoopConfigBlock to use instead of config (create one under Blocks).
        out: The state directory on the worker: snapshots, ledger, action log and work files.
    """
    if start >= end:
        raise ConfigError(f"start {start.isoformat()} must be before end {end.isoformat()}")
    config = validate(resolve_config(config, config_block))
    result = triage_windows(config, start, end, out)
    report_rollup(config.name, [result])
    return result
