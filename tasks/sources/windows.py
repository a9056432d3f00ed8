"""A source as windows: its runs (a LangSmith project fetched, a file, the sample) grouped by trace into
aligned windows, as Parquet work files.

A trace belongs to the window that holds its root's start time, with all its
spans, even those that start after the window ends. Spans whose trace has no
root in the source are skipped with a reason. A window's file has one row group
per evaluation batch, each holding whole traces.
"""

from __future__ import annotations

import math
import os
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import get_run_logger, task
from prefect.tasks import exponential_backoff

from tasks.cache import stable_hash, stage_cache_key, work_epoch, work_file_options, write_manifest
from tasks.config import FileSource, LangSmithSource, LoopConfig, SampleSource
from tasks.contracts import SourceSpans, SourceWindows, WindowSpans
from tasks.memory import release_memory
from tasks.progress import report
from tasks.sinks.connections import langsmith_client
from tasks.sources.langsmith import FetchStats, LangSmithSourceError, fetch_runs, meta_path, source_range
from tasks.sources.records import RECORDS_KEY, Skipped, check_records_file, load_spans
from tasks.sources.sample import generate_traces, write_sample

ORPHAN = "span whose trace root is not in the source"
# The spans' columns with few distinct values: dictionary-encoded in a window's file (see work_file_options).
_REPEATED = ["trace_id", "parent_run_id", "name", "run_type", "status", "error", "session_id"]


def source_path(source: FileSource | SampleSource, out_dir: Path) -> Path:
    """The run-records file of a source; the sample source is generated on first use."""
    if isinstance(source, FileSource):
        return check_records_file(source.path)
    path = out_dir / "sources" / f"sample-{source.traces}-seed{source.seed}-{source.hours}h.jsonl"
    if not path.exists():
        write_sample(path, generate_traces(source.traces, seed=source.seed, hours=source.hours))
    return path


def source_fingerprint(path: Path) -> str:
    stat = path.stat()
    return stable_hash(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def window_order(spans: pa.Table, size: timedelta, skipped: Skipped) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                           dict[str, int]]:
    """The row order that makes each window's traces contiguous and in order; for each ordered row its window
    start (µs) and trace number; and the spans skipped per window as orphans.

    Traces are numbered (dictionary codes) so that the lookup of each span's root and
    the sort are integer work, not string joins and sorts.
    """
    encoded = pc.dictionary_encode(spans.column("trace_id")).combine_chunks()
    codes = encoded.indices.to_numpy()
    step = int(size.total_seconds() * 1_000_000)
    starts = spans.column("start_time").cast(pa.int64()).to_numpy()
    is_root = spans.column("is_root").to_numpy(zero_copy_only=False)
    root_window = np.full(len(encoded.dictionary), np.iinfo(np.int64).min, dtype=np.int64)
    root_window[codes[is_root]] = starts[is_root] // step * step
    window = root_window[codes]
    orphan = window == np.iinfo(np.int64).min
    orphans: dict[str, int] = {}
    if orphan.any():
        for run_id in spans.column("id").filter(pa.array(orphan)).to_pylist():
            skipped.add(ORPHAN, f"id {run_id}")
        own, counts = np.unique(starts[orphan] // step * step, return_counts=True)
        orphans = {pd.Timestamp(int(w), unit="us", tz="UTC").isoformat(): int(n) for w, n in zip(own, counts,
                                                                                                 strict=True)}
    keep = np.flatnonzero(~orphan)
    order = keep[np.lexsort((codes[keep], window[keep]))]
    return order, window[order], codes[order], orphans


def batch_bounds(traces: np.ndarray, batch_traces: int) -> list[int]:
    """Row offsets that split trace-contiguous rows into batches of `batch_traces` whole traces."""
    if len(traces) == 0:
        return [0]
    starts = np.flatnonzero(np.r_[True, traces[1:] != traces[:-1]])
    return [int(x) for x in starts[::batch_traces]] + [len(traces)]


def batch_traces_for(traces: int, batch_size: int, max_batches: int = 16) -> int:
    """Traces per batch: the configured size, grown so a window has at most `max_batches` tasks."""
    return max(batch_size, math.ceil(traces / max_batches)) if traces else batch_size


def write_window(spans: pa.Table, rows: np.ndarray, codes: np.ndarray, window_start: datetime, batch_size: int,
                 path: Path) -> WindowSpans:
    """A window's spans, rows `rows` of `spans` (trace-contiguous; `codes` their trace numbers), as a Parquet
    file with one row group per batch, taken from `spans` a batch at a time: the window is never a second copy
    of the source in memory."""
    traces = len(np.unique(codes)) if len(codes) else 0
    bounds = batch_bounds(codes, batch_traces_for(traces, batch_size))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with pq.ParquetWriter(tmp, spans.schema, **work_file_options(_REPEATED)) as writer:
        for begin, end in zip(bounds[:-1], bounds[1:], strict=True):
            writer.write_table(spans.take(pa.array(rows[begin:end])), row_group_size=end - begin)
    os.replace(tmp, path)
    return WindowSpans(window_start, str(path), len(bounds) - 1, traces, len(rows))


def fetch_windows(source_file: str, size: timedelta, batch_size: int, out_dir: str) -> SourceSpans:
    """Every span of a source file, windowed by its trace root, one batched file per window in `out_dir`.

    One pass over the file for all its windows, as one paginated query would be for a
    LangSmith window.
    """
    spans, skipped, records = load_spans(source_file, out_dir)
    order, starts, codes, orphans = window_order(spans, size, skipped)
    spans = spans.replace_schema_metadata({RECORDS_KEY: str(Path(records).resolve()).encode()})
    edges = np.flatnonzero(np.r_[True, starts[1:] != starts[:-1]]).tolist() + [len(starts)]
    windows = []
    for begin, end in zip(edges[:-1], edges[1:], strict=True):
        if begin == end:
            continue
        start = (pd.Timestamp(int(starts[begin]), unit="us", tz="UTC")).to_pydatetime()
        window = write_window(spans, order[begin:end], codes[begin:end], start, batch_size,
                              Path(out_dir) / f"window-{start:%Y%m%dT%H%M%SZ}.parquet")
        window.orphans = orphans.get(start.isoformat(), 0)
        windows.append(window)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write_manifest(Path(out_dir), [Path(w.path) for w in windows] + [Path(records)])
    del spans, order, starts, codes
    release_memory()  # the source's table and its parse: ~400 MB at 100,000 traces, held for the flow's rest
    return SourceSpans(windows, skipped.as_dict())


_RETRY = dict(retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_jitter_factor=0.5)


@task(name="fetch", cache_key_fn=stage_cache_key, persist_result=True, **_RETRY)
def fetch_task(
    source_file: str, size: timedelta, batch_size: int, out_dir: str, cache_token: str | None
) -> SourceSpans:
    return fetch_windows(source_file, size, batch_size, out_dir)


def _not_a_config_error(task: Any, task_run: Any, state: Any) -> bool:
    """Retry transient fetch failures, not a missing project or a rejected key."""
    try:
        state.result()
    except LangSmithSourceError:
        return False
    except Exception:  # noqa: BLE001
        return True
    return False


@task(name="fetch-langsmith", cache_key_fn=stage_cache_key, persist_result=True, retry_condition_fn=_not_a_config_error,
      **_RETRY)
def langsmith_fetch_task(
    source: LangSmithSource, start: datetime, end: datetime, window: timedelta, out_path: str,
    cache_token: str | None,
) -> str:
    """A LangSmith project's runs of the windows in `[start, end)`, as a run-records file."""
    logger = get_run_logger()

    def on_page(stats: FetchStats) -> None:
        report(f"fetch {source.project}", stats.runs, stats.runs)
        logger.info("fetched %d runs from LangSmith (%s API, %d requests)", stats.runs, stats.api, stats.requests)

    stats = fetch_runs(langsmith_client(source.credentials), source, start, end, Path(out_path), on_page=on_page,
                       window=window)
    logger.info("LangSmith %s: %d runs of %s .. %s in %d requests (%d retried, %d rate-limited)", stats.api,
                stats.runs, start.isoformat(), end.isoformat(), stats.requests, stats.retries, stats.rate_limited)
    return out_path


def read_source(*, config: LoopConfig, start: datetime | None, end: datetime | None, out: str) -> SourceWindows:
    """The run's source as windows of spans: a LangSmith project fetched to a run-records file (cached once the
    range is final), an exported file, or the sample traces; then windowed (cached by the file's fingerprint)."""
    out_dir = Path(out)
    epoch = work_epoch(out_dir / "work")
    size, trace_url = config.window.size_delta, None
    if isinstance(config.source, LangSmithSource):
        start, end = source_range(langsmith_client(config.source.credentials), config.source, start, end, size,
                                  config.window.lag_delta)
        fetched_at = stable_hash(config.source.model_dump(), start, end)
        path = Path(langsmith_fetch_task(config.source, start, end, size,
                                         str(out_dir / "work" / "langsmith" / f"{fetched_at}.jsonl"),
                                         stable_hash(fetched_at, epoch) if config.window.is_final(end) else None))
        trace_url = orjson.loads(meta_path(path).read_bytes())["trace_url"]
    else:
        path = source_path(config.source, out_dir)
    token = stable_hash(source_fingerprint(path), config.window.size, config.batch_size, epoch)
    spans = fetch_task(str(path), size, config.batch_size, str(out_dir / "work" / "sources" / token), token)
    return SourceWindows(path=path, token=token, spans=spans, start=start, end=end, trace_url=trace_url)
