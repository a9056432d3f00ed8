"""The triage flows: wiring only. Each stage's logic lives in `tasks/`."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import flow, get_run_logger, unmapped
from prefect.runtime import flow_run
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from prefect.utilities.urls import url_for

from tasks.aggregate import aggregate_task
from tasks.attribute import attribute_task, read_spans
from tasks.cache import stable_hash, work_epoch
from tasks.config import FileSource, LangSmithSource, LoopConfig, RunnerConfig, source_identity
from tasks.dispatch import Sinks, dispatch_task, unfinished_windows
from tasks.evaluate import evaluate_task, evaluation_workers, start_evaluation_workers, stopped_by_sigterm
from tasks.evaluators import import_ref
from tasks.fetch import SourceSpans, WindowSpans, fetch_task, langsmith_fetch_task, source_fingerprint, source_path
from tasks.langsmith import langsmith_client, meta_path, project_id, source_range, window_range
from tasks.partition import evaluators_table, partition_task, scores_for_analysis, status_counts
from tasks.progress import track_batches
from tasks.records import check_records_file
from tasks.schemas import ATTRIBUTION, PATTERNS, ROOT_CAUSES, SCHEMA_VERSION, WINDOWS, frame_table
from tasks.scoring import EvaluationSettings, bind_all, metadata_path
from tasks.slack import slack_target
from tasks.snapshot import open_store, snapshot_task, spans_snapshot
from tasks.summary import (
    publish_artifacts,
    publish_rollup,
    rollup_row,
    rollup_text,
    skipped_text,
    summary_text,
    window_summary,
)
from tasks.trends import spike_task, window_series
from tasks.webhook import Webhooks, webhook_secret
from tasks.writeback import LangSmithWriter

DEFAULT_OUT = ".tracetriage"
DEFAULT_CONFIG = LoopConfig()  # the flows' default, shown whole in Prefect's run form (the sample traces)
RETRY_WITHIN = timedelta(days=1)  # how far back the scheduled run looks for actions to try again
WORKERS = int(os.environ.get("TRACETRIAGE_WORKERS", "4"))


def validate(config: LoopConfig) -> LoopConfig:
    """Everything that can be checked before a side effect: the source, evaluators, action functions,
    LangSmith credentials and project."""
    if isinstance(config.source, FileSource):
        check_records_file(config.source.path)
    bind_all(config.evaluators)
    for action in config.actions:
        if action.ref:
            import_ref(action.ref, what="action function")
    if isinstance(config.source, LangSmithSource):
        project_id(langsmith_client(config.source.credentials), config.source.project)
    sinks(config)  # every secret (webhooks, Slack, LangSmith) is there before anything is sent
    return config


def sinks(config: LoopConfig, window: dict[str, Any] | None = None) -> Sinks:
    """The outside systems the rules write to, with their secrets resolved from blocks and env: built in the
    window (and once at validation, so a missing secret stops the run before anything is sent), never passed
    as a parameter."""
    rules = {config.action_name(i): a for i, a in enumerate(config.actions)}
    hooks = {name: webhook_secret(rule) for name, rule in rules.items() if rule.do == "webhook"}
    writer = None
    if any(a.writes_to_langsmith or a.do == "call" for a in config.actions):  # what a call returns may write too
        credentials = config.source.credentials if isinstance(config.source, LangSmithSource) else None
        try:
            writer = LangSmithWriter(langsmith_client(credentials))
        except ValueError:  # no API key: only the actions a call asks for may fail, with the reason
            if any(a.writes_to_langsmith for a in config.actions):
                raise
    return Sinks(langsmith=writer, webhooks=Webhooks(hooks) if hooks else None,
                 slack={name: slack_target(rule) for name, rule in rules.items() if rule.do == "slack"},
                 window=window or {}, flow_run_url=flow_run_link() if window else None,
                 source=source_identity(config.source))


def flow_run_link() -> str | None:
    """The Prefect UI page of this flow run, for Slack messages (None without a Prefect UI)."""
    url = flow_run.ui_url
    return url if url and url.startswith("http") else None


@flow(name="triage-window", flow_run_name="window {window.window_start:%Y-%m-%d %H:%M}",
      task_runner=ThreadPoolTaskRunner(max_workers=WORKERS), log_prints=True)
def triage_window(config: LoopConfig, window: WindowSpans, source_token: str, out: str,
                  trace_url: str | None = None) -> dict[str, Any]:
    """Triage one window: evaluate in batches, partition, attribute, aggregate, check for a spike, snapshot,
    dispatch.

    Args:
        config: The loop config.
        window: The window's spans, as the fetch stage wrote them.
        source_token: The source's cache token (its fingerprint, window size and work epoch).
        out: The state directory: snapshots, ledger, action log and work files.
        trace_url: For a LangSmith source, the project's trace URL prefix (example traces link to it).
    """
    out_dir = Path(out)
    window_start = window.window_start
    window_end = window_start + config.window.size_delta
    is_final = datetime.now(UTC) >= window_end + config.window.lag_delta
    eval_token = stable_hash(source_token, window_start, [e.model_dump() for e in config.evaluators],
                             [e.source_hash for e in bind_all(config.evaluators)]) if is_final else None
    scores_dir = Path(window.path).parent

    batches = list(range(window.batches))
    score_paths = [str(scores_dir / f"scores-{window_start:%Y%m%dT%H%M%SZ}-{eval_token or 'open'}-{b}.parquet")
                   for b in batches]
    with stopped_by_sigterm():  # from the first submitted batch: a SIGTERM must never wait for a hung evaluator
        futures = evaluate_task.map(
            unmapped(window.path), batches, unmapped(config.evaluators), unmapped(window_start), score_paths,
            unmapped(eval_token),
            unmapped(1 if config.runner.dask_address else evaluation_workers(config.eval_workers)),
            unmapped(EvaluationSettings(str(out_dir / "work"), config.max_worker_memory_bytes)),
        )
        spans = read_spans(window.path)  # while workers score
        score_files = [f.result() for f in track_batches(futures, window_start, score_paths)]
    raw_scores = pa.concat_tables([pq.read_table(path) for path in score_files])
    root_metadata = pa.concat_tables([pq.read_table(metadata_path(path)) for path in score_files]).to_pandas()
    judged, verdicts = partition_task(raw_scores, pa.array(spans.loc[spans["is_root"], "trace_id"]), config.evaluators)
    scores = scores_for_analysis(judged, [a.when.evaluator for a in config.actions if a.when.evaluator])
    attribution = attribute_task(spans, scores, verdicts, window_start)
    patterns, root_causes = aggregate_task(spans, scores, verdicts, attribution, config.evaluators, window_start,
                                           root_metadata)

    store = open_store(config.snapshots, out_dir / "snapshots")
    counts = status_counts(judged)
    evaluators = evaluators_table(counts, config.evaluators, window_start)
    failing = int((verdicts["verdict"] == "fail").sum())
    current = window_series(pd.DataFrame({"window_start": [pd.Timestamp(window_start)], "traces": [window.traces],
                                          "failing_traces": [failing]}),
                            evaluators.to_pandas(), root_causes, patterns)
    spike = spike_task(store, current, window_start, config.spikes)
    tables = {"scores": judged, "attribution": frame_table(attribution, ATTRIBUTION),
              "patterns": frame_table(patterns, PATTERNS), "root_causes": frame_table(root_causes, ROOT_CAUSES),
              "evaluators": evaluators}
    if config.snapshots.spans:
        tables["spans"] = spans_snapshot(window.path, window_start)
    if config.runner.dask_address:  # submitting would ship the tables to a Dask worker: write them from here
        snapshot = snapshot_task(store, window_start, tables, return_state=True)
    else:
        snapshot = snapshot_task.submit(store, window_start, tables)  # written while dispatch runs
    summary = window_summary(window_start, window_end, window.traces, window.spans, window.orphans, counts,
                             verdicts, config.evaluators, root_causes, patterns, {}, spike, "", trace_url)
    # Spike episodes are read from the windows table: a crash in dispatch must not forget this window spiked.
    snapshot_task(store, window_start, {"windows": windows_row(summary, verdicts, window_start, window_end)})
    summary["actions"] = dispatch_task(config, window_start, scores, verdicts, attribution, patterns, spike, store,
                                       str(out_dir / "actions.jsonl"), window.path, sinks(config, summary)).as_dict()
    summary["snapshot_uri"] = snapshot.result()
    snapshot_task(store, window_start, {"windows": windows_row(summary, verdicts, window_start, window_end)})
    publish_artifacts(summary, config.name, source_identity(config.source))
    print(summary_text(summary))
    return summary


def windows_row(summary: dict[str, Any], verdicts: pd.DataFrame, start: datetime, end: datetime) -> pa.Table:
    counts = verdicts["verdict"].value_counts()
    spike = summary["spike"]
    return pa.Table.from_pylist([{
        "window_start": start, "window_end": end, "traces": summary["traces"], "spans": summary["spans"],
        "skipped_records": summary["skipped_records"], "failing_traces": int(counts.get("fail", 0)),
        "passing_traces": int(counts.get("pass", 0)), "error_traces": int(counts.get("error", 0)),
        "summary_json": orjson.dumps({k: v for k, v in summary.items() if k != "snapshot_uri"}).decode(),
        "schema_version": SCHEMA_VERSION, "spike": spike is not None,
        "spike_json": None if spike is None else orjson.dumps(spike).decode(),
    }], schema=WINDOWS)


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


def source_label(config: LoopConfig, source_file: Path) -> str:
    """The source as a person names it in a message."""
    if isinstance(config.source, LangSmithSource):
        return f"LangSmith project {config.source.project!r}"
    if isinstance(config.source, FileSource):
        return f"source file {source_file}"
    return f"the sample traces (seed {config.source.seed}, {config.source.traces} traces)"


def triage_windows(config: LoopConfig, start: datetime | None, end: datetime | None, out: str) -> dict[str, Any]:
    """Every window of the source between `start` and `end`, each its own `triage-window` subflow of the flow
    that calls this (so the run a person started holds the windows' runs and the roll-up)."""
    if not config.runner.dask_address:
        start_evaluation_workers(evaluation_workers(config.eval_workers))  # they import while the source loads
    logger = get_run_logger()
    out_dir = Path(out)
    epoch = work_epoch(out_dir / "work")
    if isinstance(config.source, LangSmithSource):
        start, end = source_range(config.source, start, end, config.window.size_delta, config.window.lag_delta)
        fetched_at = stable_hash(config.source.model_dump(), start, end)
        final = datetime.now(UTC) >= end + config.window.lag_delta
        source_file = Path(langsmith_fetch_task(config.source, start, end, config.window.size_delta,
                                                str(out_dir / "work" / "langsmith" / f"{fetched_at}.jsonl"),
                                                stable_hash(fetched_at, epoch) if final else None))
        trace_url = orjson.loads(meta_path(source_file).read_bytes())["trace_url"]
    else:
        source_file, trace_url = source_path(config.source, out_dir), None
    source_token = stable_hash(source_fingerprint(source_file), config.window.size, config.batch_size, epoch)
    fetched: SourceSpans = fetch_task(
        str(source_file), config.window.size_delta, config.batch_size,
        str(out_dir / "work" / "sources" / source_token), source_token,
    )
    windows = [w for w in fetched.windows if (start is None or w.window_start >= start)
               and (end is None or w.window_start < end)]
    logger.info("%d windows of %s to triage; %s", len(windows), source_file,
                skipped_text(fetched.skipped) or "no records skipped")
    window_flow = triage_window.with_options(task_runner=task_runner(config.runner))
    states = [window_flow(config, window, source_token, out, trace_url, return_state=True) for window in windows]
    result = {"source": str(source_file), "skipped": fetched.skipped, "windows": [s.result() for s in states],
              "window_runs": [str(s.state_details.flow_run_id) for s in states],
              "range": period(start, end)}
    if not windows:
        held = [w.window_start for w in fetched.windows]
        holds = (f"it holds {len(held)} windows, {held[0]:%Y-%m-%d %H:%M} .. {held[-1]:%Y-%m-%d %H:%M} UTC"
                 if held else "it holds no traces at all")
        result["warning"] = f"no traces of {source_label(config, source_file)} in {result['range']}; {holds}"
    return result


def period(start: datetime | None, end: datetime | None) -> str:
    if start is None and end is None:
        return "every window"
    return f"{'the first window' if start is None else f'{start:%Y-%m-%d %H:%M}'} .. " \
           f"{'the last window' if end is None else f'{end:%Y-%m-%d %H:%M} UTC'}"


def report_rollup(config: LoopConfig, results: list[dict[str, Any]]) -> None:
    """The answer on the run a person started: the roll-up table artifact, the same table as the last log lines,
    and a WARNING when the range held no traces."""
    rows = [rollup_row(window, url_for("flow-run", obj_id=run))
            for result in results for window, run in zip(result["windows"], result["window_runs"], strict=True)]
    ranges = ", ".join(r["range"] for r in results)
    publish_rollup(rows, config.name, ranges)
    logger = get_run_logger()
    logger.info("%s: %d windows triaged, %s\n%s", config.name, len(rows), ranges, rollup_text(rows))
    for result in results:
        if result.get("warning"):
            logger.warning(result["warning"])


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
    report_rollup(config, [result])
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
    report_rollup(loop, [*retried, latest])
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
        raise ValueError(f"start {start.isoformat()} must be before end {end.isoformat()}")
    config = validate(resolve_config(config, config_block))
    result = triage_windows(config, start, end, out)
    report_rollup(config, [result])
    return result
