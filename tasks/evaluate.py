"""Stage 2, evaluate: score a batch of whole traces with every evaluator, one row per result."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task
from prefect.tasks import exponential_backoff

from tasks.cache import stage_cache_key
from tasks.config import EvaluatorConfig
from tasks.evaluators import BoundEvaluator, Result, bind_evaluator, evaluate_items, run_object
from tasks.schemas import SCHEMA_VERSION, SCORES

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_FIELDS = ("id", "name", "run_type", "error", "status", "trace_id", "dotted_order", "parent_run_id",
           "session_id", "total_tokens", "app_path")


class RunRows:
    """Python values of one batch's rows, built only for the rows an evaluator scores."""

    def __init__(self, spans: pa.Table):
        self.columns = {name: spans.column(name).to_pylist() for name in _FIELDS}
        self.records = spans.column("record").to_pylist()
        self.start = spans.column("start_time").cast(pa.int64()).to_numpy(zero_copy_only=False)
        end = spans.column("end_time")
        self.end_missing = end.is_null().to_numpy(zero_copy_only=False)
        self.end = end.cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False)
        self._fields: dict[int, dict[str, Any]] = {}
        self._runs: dict[int, Any] = {}

    def fields(self, i: int) -> dict[str, Any]:
        cached = self._fields.get(i)
        if cached is None:
            record = orjson.loads(self.records[i])
            cached = {name: values[i] for name, values in self.columns.items()}
            cached["inputs"] = record.get("inputs") or {}
            cached["outputs"] = record.get("outputs")
            extra = record.get("extra")
            cached["metadata"] = record.get("metadata") or (extra.get("metadata") if isinstance(extra, dict) else None)
            cached["start_time"] = _EPOCH + timedelta(microseconds=int(self.start[i]))
            cached["end_time"] = None if self.end_missing[i] else _EPOCH + timedelta(microseconds=int(self.end[i]))
            self._fields[i] = cached
        return cached

    def run(self, i: int) -> Any:
        cached = self._runs.get(i)
        if cached is None:
            cached = self._runs[i] = run_object(self.fields(i))
        return cached


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
    """One SCORES row per (scored span, evaluator result); statuses are left to partition."""
    rows = RunRows(spans)
    out: dict[str, list[Any]] = {name: [] for name in
                                 ("row", "evaluator", "feedback_key", "score", "value", "comment", "error")}
    for evaluator in evaluators:
        indices = np.flatnonzero(target_mask(spans, evaluator.config))
        items = [(rows.fields(i), rows.run(i) if evaluator.needs_run else None) for i in indices]
        results: list[list[Result]] = evaluate_items(evaluator, items)
        for i, row_results in zip(indices, results, strict=True):
            for result in row_results:
                out["row"].append(i)
                out["evaluator"].append(evaluator.key)
                out["feedback_key"].append(result.feedback_key)
                out["score"].append(result.score)
                out["value"].append(result.value)
                out["comment"].append(result.comment)
                out["error"].append(result.error)
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
        **{name: pa.array(values, SCORES.field(name).type) for name, values in out.items()},
        "threshold": pa.array([thresholds[k] for k in out["evaluator"]], pa.float64()),
        "status": pa.nulls(n, pa.string()),
        "schema_version": pa.array(np.full(n, SCHEMA_VERSION, np.int32)),
    }
    return pa.table([columns[f.name] for f in SCORES], schema=SCORES)


def bind_all(configs: list[EvaluatorConfig]) -> list[BoundEvaluator]:
    return [bind_evaluator(config) for config in configs]


def evaluate_batch_file(
    spans_path: str, batch: int, configs: list[EvaluatorConfig], window_start: datetime, out_path: str
) -> str:
    """Score row group `batch` of a window's spans file; the scores go to `out_path` (Parquet)."""
    spans = pq.ParquetFile(spans_path).read_row_group(batch)
    scores = span_scores(spans, bind_all(configs), window_start)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path + ".tmp"
    pq.write_table(scores, tmp)
    Path(tmp).replace(out_path)
    return out_path


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
    cache_token: str,
) -> str:
    return evaluate_batch_file(spans_path, batch, configs, window_start, out_path)
