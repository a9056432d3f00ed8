"""Stage 2, evaluate: score a batch of whole traces with every evaluator, one row per result."""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import re
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task
from prefect.tasks import exponential_backoff

from tasks.cache import stage_cache_key
from tasks.config import EvaluatorConfig
from tasks.evaluators import (
    BoundEvaluator,
    Result,
    bind_evaluator,
    evaluate_columnar,
    evaluate_items,
    run_object,
)
from tasks.records import RECORDS_KEY, RecordFile, run_metadata
from tasks.schemas import SCHEMA_VERSION, SCORES

_RUN_FIELDS = ("id", "name", "run_type", "error", "status", "trace_id", "dotted_order", "parent_run_id",
               "session_id", "total_tokens", "app_path", "start_time", "end_time")


class RunRows:
    """What evaluators see of a batch's rows, built only for the rows they score.

    `fields(i)` parses row i's record from its JSONL file (inputs, outputs, metadata);
    `run(i)` adds the `Run` object, for evaluators that take `run`.
    """

    def __init__(self, spans: pa.Table, records: RecordFile | None = None):
        self.spans = spans
        self.records = records or RecordFile(records_path(spans.schema))
        self.offsets = spans.column("record_offset").to_numpy()
        self.lengths = spans.column("record_length").to_numpy()
        self._fields: dict[int, dict[str, Any]] = {}
        self._runs: dict[int, Any] = {}

    def fields(self, i: int) -> dict[str, Any]:
        cached = self._fields.get(i)
        if cached is None:
            record = self.records.record(int(self.offsets[i]), int(self.lengths[i]))
            cached = self._fields[i] = {
                "inputs": record.get("inputs") or {},
                "outputs": record.get("outputs"),
                "metadata": run_metadata(record),
            }
        return cached

    def prepare_runs(self, indices: list[int]) -> None:
        """Convert the run fields of these rows in one go (cheaper than row by row)."""
        wanted = [i for i in indices if i not in self._runs]
        if not wanted:
            return
        subset = self.spans.select(list(_RUN_FIELDS)).take(pa.array(wanted, pa.int64()))
        columns = [subset.column(name).to_pylist() for name in _RUN_FIELDS]
        for position, i in enumerate(wanted):
            values = {name: column[position] for name, column in zip(_RUN_FIELDS, columns, strict=True)}
            self._runs[i] = run_object({**values, **self.fields(i)})

    def run(self, i: int) -> Any:
        if i not in self._runs:
            self.prepare_runs([i])
        return self._runs[i]


def target_mask(spans: pa.Table, config: EvaluatorConfig) -> np.ndarray:
    """Which rows an evaluator scores: roots for root evaluators, matching non-root spans otherwise."""
    is_root = spans.column("is_root").to_numpy(zero_copy_only=False)
    if config.is_root:
        return is_root
    mask = ~is_root
    target = config.target
    if target.run_type is not None:
        mask &= spans.column("run_type").to_numpy(zero_copy_only=False) == target.run_type
    if target.name is not None:
        mask &= spans.column("name").to_numpy(zero_copy_only=False) == target.name
    return mask


def span_scores(spans: pa.Table, evaluators: list[BoundEvaluator], window_start: datetime) -> pa.Table:
    """One SCORES row per (scored span, evaluator result); statuses are left to partition.

    The records are read from the JSONL file named in the spans' schema metadata.
    """
    with _collector_paused(), RecordFile(records_path(spans.schema)) as records:
        return _span_scores(spans, RunRows(spans, records), evaluators, window_start)


def records_path(schema: pa.Schema) -> str:
    metadata = schema.metadata or {}
    if RECORDS_KEY not in metadata:
        raise ValueError("spans table does not name its records file; load it with tasks.records.load_spans")
    return metadata[RECORDS_KEY].decode()


def _span_scores(
    spans: pa.Table, rows: RunRows, evaluators: list[BoundEvaluator], window_start: datetime
) -> pa.Table:
    row_index: list[int] = []
    evaluator_keys: list[str] = []
    flat: list[Result] = []
    for evaluator in evaluators:
        indices = np.flatnonzero(target_mask(spans, evaluator.config)).tolist()
        results: list[list[Result]]
        if evaluator.mode == "columnar":
            results = evaluate_columnar(evaluator, spans.take(pa.array(indices, pa.int64())))
        else:
            if evaluator.needs_run:
                rows.prepare_runs(indices)
            items = [(rows.fields(i), rows.run(i) if evaluator.needs_run else None) for i in indices]
            results = evaluate_items(evaluator, items)
        for i, row_results in zip(indices, results, strict=True):
            if len(row_results) == 1:
                row_index.append(i)
                flat.append(row_results[0])
            else:
                row_index.extend([i] * len(row_results))
                flat.extend(row_results)
        evaluator_keys.extend([evaluator.key] * (len(flat) - len(evaluator_keys)))
    names = Result._fields
    out = dict(zip(names, map(list, zip(*flat, strict=True)), strict=True)) if flat else {n: [] for n in names}
    out["evaluator"] = evaluator_keys
    out["row"] = row_index
    taken = spans.take(pa.array(out.pop("row"), pa.int64()))
    thresholds = {e.key: e.config.threshold for e in evaluators}
    n = taken.num_rows
    columns = {
        "window_start": pa.array([window_start] * n, SCORES.field("window_start").type),
        "trace_id": taken.column("trace_id"),
        "run_id": taken.column("id"),
        "span_name": taken.column("name"),
        "run_type": taken.column("run_type"),
        "dotted_order": taken.column("dotted_order"),
        "is_root": taken.column("is_root"),
        **{name: pa.array(out[name], SCORES.field(name).type)
           for name in ("evaluator", "feedback_key", "score", "value", "comment", "error")},
        "threshold": pa.array([thresholds[k] for k in out["evaluator"]], pa.float64()),
        "status": pa.nulls(n, pa.string()),
        "schema_version": pa.array(np.full(n, SCHEMA_VERSION, np.int32)),
    }
    return pa.table([columns[f.name] for f in SCORES], schema=SCORES)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """No cyclic garbage collection while scoring a batch.

    A batch makes hundreds of thousands of small dicts that all live until it ends;
    each generation-2 pass would walk all of them again. Reference counting frees
    them when the batch's rows go out of scope, before the collector is back on.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def bind_all(configs: list[EvaluatorConfig]) -> list[BoundEvaluator]:
    return [bind_evaluator(config) for config in configs]


def evaluate_batch_file(
    spans_path: str, batch: int, configs: list[EvaluatorConfig], window_start: datetime, out_path: str
) -> str:
    """Score row group `batch` of a window's spans file; the scores go to `out_path` (Parquet)."""
    scores = span_scores(pq.ParquetFile(spans_path).read_row_group(batch), bind_all(configs), window_start)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path + ".tmp"
    pq.write_table(scores, tmp)
    Path(tmp).replace(out_path)
    return out_path


_POOL: ProcessPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def evaluation_workers(configured: int) -> int:
    """Processes that evaluate batches: the config's number, or one per core when it says 0.

    Worker processes import the main module, as `multiprocessing` does; a main script
    without an `if __name__ == "__main__":` guard would run again in each of them, so
    then "one per core" falls back to evaluating in this process.
    """
    if configured:
        return configured
    return (os.cpu_count() or 1) if main_module_is_guarded() else 1


def main_module_is_guarded() -> bool:
    """True when worker processes can import `__main__` without running its work again."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if path is None or getattr(main, "__spec__", None) is not None:
        return True  # an interactive session, or `python -m module`: nothing is re-run
    try:
        source = Path(path).read_text(errors="replace")
    except OSError:
        return False
    return re.search(r"""__name__\s*==\s*['"]__main__['"]""", source) is not None


def evaluation_pool(workers: int) -> ProcessPoolExecutor | None:
    """One process pool per Python process, started on first use; None when one worker is asked for.

    Processes, because evaluators are mostly Python code and threads would share one
    core. Workers fork from a server that has already imported this module, so they
    start in milliseconds after the first.
    """
    global _POOL
    if workers <= 1:
        return None
    with _POOL_LOCK:
        if _POOL is None:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["tasks.evaluate"])
            _POOL = ProcessPoolExecutor(max_workers=workers, mp_context=context)
        return _POOL


def start_evaluation_workers(workers: int) -> None:
    """Start the pool's worker processes now, without waiting for them."""
    pool = evaluation_pool(workers)
    if pool is not None:
        for _ in range(workers):
            pool.submit(os.getpid)


def _in_this_process_only(configs: list[EvaluatorConfig]) -> bool:
    """Evaluators registered in this process (`python:` refs) cannot be imported by a worker."""
    return any(config.ref.startswith("python:") for config in configs)


def evaluate_batch(
    spans_path: str, batch: int, configs: list[EvaluatorConfig], window_start: datetime, out_path: str,
    workers: int = 1,
) -> str:
    """`evaluate_batch_file` in the process pool when there is one and the evaluators allow it."""
    pool = None if _in_this_process_only(configs) else evaluation_pool(workers)
    if pool is None:
        return evaluate_batch_file(spans_path, batch, configs, window_start, out_path)
    return pool.submit(evaluate_batch_file, spans_path, batch, configs, window_start, out_path).result()


@task(
    name="evaluate",
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
    cache_key_fn=stage_cache_key,
    persist_result=True,
)
def evaluate_task(
    spans_path: str, batch: int, configs: list[EvaluatorConfig], window_start: datetime, out_path: str,
    cache_token: str | None, workers: int = 1,
) -> str:
    return evaluate_batch(spans_path, batch, configs, window_start, out_path, workers)
