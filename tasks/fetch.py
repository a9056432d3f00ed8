"""Stage 1, fetch: a source's spans, grouped by trace into aligned windows, as Parquet work files.

A trace belongs to the window that holds its root's start time, with all its
spans, even those that start after the window ends. Spans whose trace has no
root in the source are skipped with a reason. A window's file has one row group
per evaluation batch, each holding whole traces.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import task
from prefect.tasks import exponential_backoff

from tasks.cache import stable_hash, stage_cache_key
from tasks.config import FileSource, SampleSource
from tasks.records import RECORDS_KEY, Skipped, load_spans
from tasks.sample import generate_traces, write_sample

ORPHAN = "span whose trace root is not in the source"


@dataclass
class SourceSpans:
    """All spans of a source with their window, and what was skipped on the way."""

    path: str
    windows: list[datetime]
    skipped: dict[str, Any]
    orphans_by_window: dict[str, int]


def source_path(source: FileSource | SampleSource, out_dir: Path) -> Path:
    """The run-records file of a source; the sample source is generated on first use."""
    if isinstance(source, FileSource):
        path = Path(source.path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"source file {path} does not exist; check source.path or --source")
        return path
    path = out_dir / "sources" / f"sample-{source.traces}-seed{source.seed}-{source.hours}h.jsonl"
    if not path.exists():
        write_sample(path, generate_traces(source.traces, seed=source.seed, hours=source.hours))
    return path


def source_fingerprint(path: Path) -> str:
    stat = path.stat()
    return stable_hash(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def floor_to_window(moments: pa.Array, size: timedelta) -> pa.Array:
    step = int(size.total_seconds() * 1_000_000)
    micros = pc.cast(moments, pa.int64())
    floored = pc.multiply(pc.divide(micros, step), step)  # integer division: both operands are int64
    return pc.cast(floored, pa.timestamp("us", tz="UTC"))


def window_spans_table(spans: pa.Table, size: timedelta, skipped: Skipped) -> tuple[pa.Table, dict[str, int]]:
    """Spans with `window_start` (from their trace root), sorted by window, trace and dotted_order."""
    roots = spans.filter(spans.column("is_root"))
    root_window = floor_to_window(roots.column("start_time"), size)
    lookup = pa.table({"trace_id": roots.column("trace_id"), "window_start": root_window})
    joined = spans.join(lookup, keys="trace_id", join_type="left outer")
    orphan_mask = joined.column("window_start").is_null()
    orphans: dict[str, int] = {}
    if pc.any(orphan_mask).as_py():
        lost = joined.filter(orphan_mask)
        for run_id in lost.column("id").to_pylist():
            skipped.add(ORPHAN, f"id {run_id}")
        own_window = floor_to_window(lost.column("start_time"), size).to_pandas()
        orphans = {moment.isoformat(): int(n) for moment, n in own_window.value_counts().items()}
        joined = joined.filter(pc.invert(orphan_mask))
    order = pc.sort_indices(joined, [("window_start", "ascending"), ("trace_id", "ascending"),
                                     ("dotted_order", "ascending")])
    return joined.take(order), orphans


def load_source(source_file: str, size: timedelta, out_path: str) -> SourceSpans:
    """Load and window every span of a source file into `out_path`."""
    spans, skipped, records = load_spans(source_file, Path(out_path).parent)
    windowed, orphans = window_spans_table(spans, size, skipped)
    windowed = windowed.replace_schema_metadata({RECORDS_KEY: str(Path(records).resolve()).encode()})
    _write_atomic(windowed, out_path)
    starts = pc.unique(windowed.column("window_start")).to_pylist()
    return SourceSpans(out_path, sorted(starts), skipped.as_dict(), orphans)


def _write_atomic(table: pa.Table, path: str, row_group_size: int | None = None) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    pq.write_table(table, tmp, row_group_size=row_group_size)
    os.replace(tmp, path)


@dataclass
class WindowSpans:
    path: str
    batches: int
    traces: int
    spans: int


def batch_bounds(table: pa.Table, batch_traces: int) -> list[int]:
    """Row offsets that split a trace-sorted table into batches of whole traces."""
    traces = table.column("trace_id").to_numpy(zero_copy_only=False)
    if len(traces) == 0:
        return [0]
    starts = np.flatnonzero(np.r_[True, traces[1:] != traces[:-1]])
    return [int(x) for x in starts[::batch_traces]] + [len(traces)]


def window_file(source_spans: str, window_start: datetime, batch_size: int, out_path: str) -> WindowSpans:
    """One window's spans, one row group per batch of whole traces (see `batch_traces_for`)."""
    table = pq.read_table(source_spans, filters=[("window_start", "=", window_start)])
    records = pq.read_schema(source_spans).metadata[RECORDS_KEY]
    table = table.drop_columns(["window_start"]).replace_schema_metadata({RECORDS_KEY: records})
    traces = pc.count_distinct(table.column("trace_id")).as_py() if table.num_rows else 0
    bounds = batch_bounds(table, batch_traces_for(traces, batch_size))
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{out_path}.{os.getpid()}.tmp"
    with pq.ParquetWriter(tmp, table.schema) as writer:
        for begin, end in zip(bounds[:-1], bounds[1:], strict=True):
            writer.write_table(table.slice(begin, end - begin), row_group_size=end - begin)
    os.replace(tmp, out_path)
    return WindowSpans(out_path, max(len(bounds) - 1, 0), traces, table.num_rows)


def batch_traces_for(traces: int, batch_size: int, max_batches: int = 32) -> int:
    """Traces per batch: the configured size, grown so a window has at most `max_batches` tasks."""
    return max(batch_size, math.ceil(traces / max_batches)) if traces else batch_size


_RETRY = dict(retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_jitter_factor=0.5)


@task(name="load-source", cache_key_fn=stage_cache_key, persist_result=True, **_RETRY)
def load_source_task(source_file: str, size: timedelta, out_path: str, cache_token: str | None) -> SourceSpans:
    return load_source(source_file, size, out_path)


@task(name="fetch", cache_key_fn=stage_cache_key, persist_result=True, **_RETRY)
def fetch_window_task(
    source_spans: str, window_start: datetime, batch_size: int, out_path: str, cache_token: str | None
) -> WindowSpans:
    return window_file(source_spans, window_start, batch_size, out_path)
