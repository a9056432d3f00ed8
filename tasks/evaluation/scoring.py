"""Scoring a batch of spans with evaluators: what evaluation worker processes import.

No Prefect here, so a worker process starts quickly; `tasks/evaluation/evaluate.py` wraps this
as the evaluate stage (process pool and Prefect task).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import math
import os
import select
import signal
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.cache import work_file_options
from tasks.config import EvaluatorConfig
from tasks.evaluation.batch_state import StateWriter, state_path
from tasks.evaluation.builtins import forget_words
from tasks.evaluation.calls import CallCounters, CallLimiter
from tasks.evaluation.evaluators import (
    BoundEvaluator,
    Result,
    bind_evaluator,
    error_result,
    evaluate_columnar,
    evaluate_items,
    run_object,
    unread_run_object,
)
from tasks.evaluation.judge_cache import CACHE_FILE, JudgeCache
from tasks.evaluation.langsmith_scores import reference_example
from tasks.evaluation.run_tree import link_child_runs
from tasks.memory import release_memory
from tasks.schemas import ROOT_METADATA, SCHEMA_VERSION, SCORES
from tasks.sources.records import RECORDS_KEY, RecordFile, run_metadata

_RUN_FIELDS = ("id", "name", "run_type", "error", "status", "trace_id", "dotted_order", "parent_run_id",
               "session_id", "total_tokens", "app_path", "start_time", "end_time")
_RUN_FIELD_SET = frozenset(_RUN_FIELDS)
_UUIDS = frozenset(("id", "trace_id", "parent_run_id", "session_id"))
_EPOCH = datetime(1970, 1, 1, tzinfo=ZoneInfo("UTC"))  # the tzinfo Arrow gives a UTC timestamp

# Each worker of `python -m flows.cli` runs that module again as "__mp_main__" (multiprocessing's way to give a
# worker the main module's names), and runpy warns on stderr that the forkserver, which preloads it, has it
# imported already. Harmless (the module only defines; its `__main__` guard does not run), so not shown: the
# forkserver imports this module, and its workers inherit the filter.
warnings.filterwarnings("ignore", message=r"'[\w.]+' found in sys\.modules after import of package",
                        category=RuntimeWarning, module="runpy")


class RunRows:
    """What evaluators see of a batch's rows, built only for the rows they score.

    `fields(i)` parses row i's record from its JSONL file (inputs, outputs, metadata);
    `run(i)` adds the `Run` object, for evaluators that take `run`.
    """

    def __init__(self, spans: pa.Table, records: RecordFile | None = None):
        self.spans = spans
        self.source = RowSource(spans, records or RecordFile(records_path(spans.schema)))
        self.records = self.source.records
        self.fields = self.source.fields
        self._runs: dict[int, Any] = {}

    def prepare_runs(self, indices: list[int]) -> None:
        """Convert the run fields of these rows in one go (cheaper than row by row)."""
        wanted = [i for i in indices if i not in self._runs]
        if not wanted:
            return
        runs, fields = self._runs, self.fields
        for i, values in zip(wanted, self.source.run_fields(wanted), strict=True):
            runs[i] = run_object(zip(_RUN_FIELDS, values, strict=True), fields(i))
        link_child_runs(self, wanted)  # a root run comes with its trace's tree

    def tree_runs(self, indices: list[int], names: list[str], run_types: list[str]) -> tuple[list[Any], list[list]]:
        """These rows' runs as children in trees, and each one's `child_runs`, a new list to fill: the run already
        built (a span evaluator's), else one that holds its name and run_type and reads the rest when used."""
        runs, source, lists = self._runs, self.source, []
        source.will_read(indices)
        children = []
        for i, name, run_type in zip(indices, names, run_types, strict=True):
            below: list[Any] = []
            run = runs.get(i)
            if run is None:
                run = runs[i] = unread_run_object({"name": name, "run_type": run_type, "child_runs": below}, source, i)
            else:  # not `.__dict__`: that would read an unread run whole
                object.__getattribute__(run, "__dict__")["child_runs"] = below
            children.append(run)
            lists.append(below)
        return children, lists

    def forget(self, indices: list[int]) -> None:
        """Drop the parsed records (and runs) of rows that no evaluator still to run will read."""
        self.source.forget(indices)
        runs = self._runs
        for i in indices:
            runs.pop(i, None)

    def run(self, i: int) -> Any:
        if i not in self._runs:
            self.prepare_runs([i])
        return self._runs[i]

    def release(self) -> None:
        """Let go of the batch's runs and records now, while the collector is paused: a root and its trees refer
        back to these rows (to grow them), a cycle that reference counting alone cannot free. Left to the
        collector, its first pass after the batch walked every run, dict and list of the batch (0.5 s for a
        6,250-root batch whose trees were read)."""
        self._runs.clear()
        self.source.clear()

    def cache_keys(self, indices: list[int]) -> list[str]:
        """'<run id>:<digest of its record>' for each row: a changed record is a new key."""
        ids = self.spans.column("id").take(pa.array(indices, pa.int64())).to_pylist()
        raw, offsets, lengths = self.records.raw, self.source.offsets, self.source.lengths
        return [f"{run_id}:{hashlib.blake2b(raw(int(offsets[i]), int(lengths[i])), digest_size=12).hexdigest()}"
                for run_id, i in zip(ids, indices, strict=True)]


class RowSource:
    """A batch's rows as a `Run`'s fields come from them: the table's run fields, converted for many rows in one
    go or for one field of one row, and each row's record, parsed once. What an unread child run reads itself
    from (`tasks.evaluation.evaluators.unread_run_object`), even once its batch is over: it holds no runs."""

    def __init__(self, spans: pa.Table, records: RecordFile):
        self.spans, self.records = spans, records
        self.offsets = spans.column("record_offset").to_numpy()
        self.lengths = spans.column("record_length").to_numpy()
        self._fields: dict[int, dict[str, Any]] = {}
        self._uuids: dict[str, uuid.UUID] = {}  # the spans of a trace share its id and point at each other's
        self._pending: list[int] = []  # rows whose run fields are converted together when the first is wanted
        self._converted: dict[int, tuple[Any, ...]] = {}

    def fields(self, i: int) -> dict[str, Any]:
        cached = self._fields.get(i)
        if cached is None:
            cached = self._fields[i] = _record_fields(self.records.record(int(self.offsets[i]), int(self.lengths[i])))
        return cached

    def forget(self, indices: list[int]) -> None:
        fields = self._fields
        for i in indices:
            fields.pop(i, None)

    def clear(self) -> None:
        self._fields.clear()

    def _uuid(self, value: str | None) -> uuid.UUID | None:
        if not value:
            return None
        known = self._uuids.get(value)
        if known is None:
            known = self._uuids[value] = uuid.UUID(value)
        return known

    def run_fields(self, indices: list[int]) -> list[tuple[Any, ...]]:
        """The run fields (`_RUN_FIELDS`, as a `Run` holds them) of these rows, column by column."""
        subset = self.spans.select(list(_RUN_FIELDS)).take(pa.array(indices, pa.int64()))
        columns = [_python_values(subset.column(name)) for name in _RUN_FIELDS]
        for position, name in enumerate(_RUN_FIELDS):
            if name in _UUIDS:
                columns[position] = list(map(self._uuid, columns[position]))
        return list(zip(*columns, strict=True))

    def will_read(self, indices: list[int]) -> None:
        """These rows' run fields are converted together, when the first of them is wanted whole."""
        self._pending.extend(indices)

    def has_field(self, name: str) -> bool:
        return name in _RUN_FIELD_SET

    def value(self, name: str, i: int) -> Any:
        """One run field of row i (a child that is looked at, not read whole)."""
        converted = self._converted.get(i)
        if converted is not None:
            return converted[_RUN_FIELDS.index(name)]
        column = self.spans.column(name)
        if pa.types.is_timestamp(column.type):
            return _python_values(column.slice(i, 1))[0]
        value = column[i].as_py()
        return self._uuid(value) if name in _UUIDS else value

    def values(self, i: int) -> dict[str, Any]:
        """All run fields of row i (a child read whole), with those of the rows pending beside it."""
        if i not in self._converted:
            pending = [row for row in dict.fromkeys(self._pending) if row not in self._converted]
            if i not in pending:
                pending.append(i)
            self._converted.update(zip(pending, self.run_fields(pending), strict=True))
            self._pending = []
        return dict(zip(_RUN_FIELDS, self._converted[i], strict=True))


@dataclass(frozen=True)
class EvaluationSettings:
    """What evaluation shares across a run's batches: the work directory (judge cache, rate-limit state) and the
    memory cap of a worker process."""

    work_dir: str | None = None
    max_worker_memory: int | None = None


class BatchRun:
    """One batch's evaluation context: the judge cache, each evaluator's rate limiter, the call counters,
    the batch's state file, and the evaluators given up on (a worker died running them)."""

    def __init__(self, settings: EvaluationSettings | None = None, state_path: str | None = None,
                 abandoned: dict[str, str] | None = None, memory_cap: int | None = None):
        work_dir = Path(settings.work_dir) if settings and settings.work_dir else None
        self.work_dir = work_dir
        self.cache = JudgeCache(work_dir / CACHE_FILE) if work_dir else None
        self.counters = CallCounters()
        self.state = StateWriter(state_path) if state_path else None
        self.abandoned = abandoned or {}
        self._limiters: dict[str, CallLimiter] = {}
        self._watching = threading.Event()
        if memory_cap and self.state is not None:
            threading.Thread(target=self._watch_memory, args=(memory_cap,), name="memory-cap", daemon=True).start()

    def limiter(self, config: EvaluatorConfig) -> CallLimiter | None:
        if config.rate_limit is None:
            return None
        if config.key not in self._limiters:
            path = self.work_dir / "rate-limits" / f"{config.key}.slot" if self.work_dir else None
            self._limiters[config.key] = CallLimiter(config.rate_limit, path)
        return self._limiters[config.key]

    def publish(self) -> None:
        if self.state is not None:
            c = self.counters
            self.state.update(total=c.total, done=c.done, in_flight=c.in_flight, retried=c.retried)

    def starting(self, position: int) -> None:
        if self.state is not None:
            self.state.update(evaluator=position)

    def _watch_memory(self, cap: int) -> None:
        # The worker replaces itself: the flow reads `memory_over` from the state file and names the evaluator.
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._watching.wait(0.1):
            with open("/proc/self/statm", "rb") as statm:
                resident = int(statm.read().split()[1]) * page
            if resident > cap:
                self.publish()
                self.state.update(memory_over=resident)  # type: ignore[union-attr]  # started only with a state
                os.kill(os.getpid(), signal.SIGKILL)

    def close(self) -> None:
        self._watching.set()
        self.publish()
        if self.cache is not None:
            self.cache.close()
        for limiter in self._limiters.values():
            limiter.close()
        if self.state is not None:
            self.state.close()


def _record_fields(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "inputs": record.get("inputs") or {},
        "outputs": record.get("outputs"),
        "metadata": run_metadata(record),
        "example": reference_example(record),
    }


def _python_values(column: pa.ChunkedArray) -> list[Any]:
    """`column.to_pylist()`; UTC microsecond timestamps computed from their integers, several times faster than
    Arrow's conversion."""
    kind = column.type
    if not (pa.types.is_timestamp(kind) and kind.unit == "us" and kind.tz == "UTC"):
        return column.to_pylist()
    micros = column.cast(pa.int64()).to_pylist()
    return [None if value is None else _EPOCH + timedelta(microseconds=value) for value in micros]


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


def batch_scores(
    spans: pa.Table, evaluators: list[BoundEvaluator], window_start: datetime, batch: BatchRun | None = None
) -> tuple[pa.Table, pa.Table]:
    """SCORES of a batch, and its root runs' metadata (ROOT_METADATA), from one pass over the records."""
    with _collector_paused(), RecordFile(records_path(spans.schema)) as records:
        rows = RunRows(spans, records)
        try:
            scores = _span_scores(spans, rows, evaluators, window_start, batch or BatchRun())
            return scores, _root_metadata(spans, rows)
        finally:
            rows.release()


def _root_metadata(spans: pa.Table, rows: RunRows) -> pa.Table:
    roots = np.flatnonzero(spans.column("is_root").to_numpy(zero_copy_only=False)).tolist()
    texts = []
    for i in roots:
        value = rows.fields(i)["metadata"]
        texts.append(None if value is None else orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode())
    trace_ids = spans.column("trace_id").take(pa.array(roots, pa.int64()))
    return pa.table([trace_ids, pa.array(texts, pa.string())], schema=ROOT_METADATA)


def metadata_path(scores_path: str) -> str:
    """Where a batch's root metadata is written, beside its scores."""
    return scores_path.removesuffix(".parquet") + ".metadata.parquet"


def records_path(schema: pa.Schema) -> str:
    metadata = schema.metadata or {}
    if RECORDS_KEY not in metadata:
        raise ValueError("spans table does not name its records file; load it with tasks.sources.records.load_spans")
    return metadata[RECORDS_KEY].decode()


def _evaluator_results(
    spans: pa.Table, rows: RunRows, evaluator: BoundEvaluator, indices: list[int], batch: BatchRun
) -> list[list[Result]]:
    """The evaluator's results for rows `indices`: from the judge cache where it has them, else by calling it."""
    if evaluator.mode == "columnar":
        if evaluator.key in batch.abandoned:
            return [error_result(evaluator.key, batch.abandoned[evaluator.key])] * len(indices)
        return evaluate_columnar(evaluator, spans.take(pa.array(indices, pa.int64())))
    cache = batch.cache if evaluator.cached else None
    keys = rows.cache_keys(indices) if cache is not None else []
    found = cache.get_many(evaluator.version, keys) if cache is not None else {}
    results: list[list[Result] | None] = [found.get(k) for k in keys] if found else [None] * len(indices)
    missing = [position for position, result in enumerate(results) if result is None]
    if evaluator.key in batch.abandoned:  # a worker died running it: what is not cached is an error row
        for position in missing:
            results[position] = error_result(evaluator.key, batch.abandoned[evaluator.key])
        return results  # type: ignore[return-value]  # every slot filled
    wanted = [indices[position] for position in missing]
    fields = rows.fields
    items = [(fields(i), None) for i in wanted]
    if evaluator.needs_run:
        rows.prepare_runs(wanted)  # after the records are parsed: runs scored by themselves are read at once
        items = [(run_fields, rows.run(i)) for (run_fields, _), i in zip(items, wanted, strict=True)]
    version = evaluator.version

    def keep(position: int, result: list[Result]) -> None:
        cache.put(version, keys[missing[position]], result)  # type: ignore[union-attr]  # only with a cache

    called = evaluate_items(evaluator, items, batch.limiter(evaluator.config), batch.counters,
                            keep if cache is not None else None, batch.publish)
    if not found:
        return called
    for position, result in zip(missing, called, strict=True):
        results[position] = result
    return results  # type: ignore[return-value]  # every slot filled


def _span_scores(
    spans: pa.Table, rows: RunRows, evaluators: list[BoundEvaluator], window_start: datetime, batch: BatchRun
) -> pa.Table:
    row_index: list[int] = []
    evaluator_keys: list[str] = []
    flat: list[Result] = []
    masks = [target_mask(spans, evaluator.config) for evaluator in evaluators]
    is_root = spans.column("is_root").to_numpy(zero_copy_only=False)
    for position, evaluator in enumerate(evaluators):
        batch.starting(position)
        indices = np.flatnonzero(masks[position]).tolist()
        results = _evaluator_results(spans, rows, evaluator, indices, batch)
        # A span evaluator's rows are parsed for it alone: dropped once it is done (roots stay for their metadata).
        still_read = np.logical_or.reduce([is_root, *masks[position + 1:]])
        rows.forget(np.flatnonzero(masks[position] & ~still_read).tolist())
        if all(len(row_results) == 1 for row_results in results):  # the usual case: one result per span
            row_index.extend(indices)
            flat.extend([row_results[0] for row_results in results])
        else:
            for i, row_results in zip(indices, results, strict=True):
                row_index.extend([i] * len(row_results))
                flat.extend(row_results)
        evaluator_keys.extend([evaluator.key] * (len(flat) - len(evaluator_keys)))
    names = Result._fields
    out = dict(zip(names, map(list, zip(*flat, strict=True)), strict=True)) if flat else {n: [] for n in names}
    out["evaluator"] = evaluator_keys
    out["row"] = row_index
    _refuse_unusable_scores(out, {e.key: e.config.score_range for e in evaluators})
    taken = spans.select(["trace_id", "id", "name", "run_type", "dotted_order", "is_root"]).take(
        pa.array(out.pop("row"), pa.int64()))
    thresholds = {e.key: e.config.threshold for e in evaluators}
    n = taken.num_rows
    columns = {
        "window_start": pa.repeat(pa.scalar(window_start, SCORES.field("window_start").type), n),
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


def _refuse_unusable_scores(out: dict[str, list[Any]], ranges: dict[str, tuple[float, float]]) -> None:
    """A score that is NaN, infinite or outside its evaluator's score_range becomes an error naming the value."""
    score = np.array([np.nan if s is None else s for s in out["score"]], dtype=np.float64)
    present = np.array([s is not None for s in out["score"]], dtype=bool)
    keys = np.array(out["evaluator"], dtype=object)
    low = np.array([ranges[k][0] for k in keys], dtype=np.float64) if len(keys) else np.empty(0)
    high = np.array([ranges[k][1] for k in keys], dtype=np.float64) if len(keys) else np.empty(0)
    with np.errstate(invalid="ignore"):
        bad = present & ~((score >= low) & (score <= high))
    for i in np.flatnonzero(bad).tolist():
        value = out["score"][i]
        if not math.isfinite(value):
            out["error"][i] = f"score {value!r} is not a finite number; return a number within score_range"
        else:
            out["error"][i] = (f"score {value!r} is outside score_range [{low[i]}, {high[i]}]; "
                               f"set the evaluator's score_range to the scores it gives")
        out["score"][i] = None


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


PR_SET_PDEATHSIG = 1


def die_with_parent(flow_pid: int) -> None:
    """Worker initializer: this worker ends when the flow's process does, even by `kill -9`.

    The worker's parent is the forkserver, which stays up while any worker holds its "alive" pipe, so waiting
    for the forkserver would wait forever: a daemon thread waits on a pidfd of the flow's process instead, and
    PR_SET_PDEATHSIG covers the forkserver's own death.
    """
    with contextlib.suppress(OSError, AttributeError):  # prctl is Linux's
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    try:
        flow = os.pidfd_open(flow_pid)
    except ProcessLookupError:  # the flow died before this worker started
        os._exit(1)
    except (OSError, AttributeError):  # no pidfd (old kernel, not Linux): poll the pid instead
        flow = None

    def watch() -> None:
        if flow is not None:
            select.select([flow], [], [])
        else:
            while _alive(flow_pid):
                time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="flow-watchdog", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def bind_all(configs: list[EvaluatorConfig]) -> list[BoundEvaluator]:
    return [bind_evaluator(config) for config in configs]


_REPEATED_SCORES = [name for name in SCORES.names if name not in ("run_id", "dotted_order", "score")]


def evaluate_batch_file(
    spans_path: str, batch: int, configs: list[EvaluatorConfig], window_start: datetime, out_path: str,
    settings: EvaluationSettings | None = None, abandoned: dict[str, str] | None = None,
    in_worker: bool = False,
) -> str:
    """Score row group `batch` of a window's spans file; the scores go to `out_path` (Parquet).

    `abandoned` maps evaluators that a dead worker was running to the message of their error rows. In a
    worker process (`in_worker`), `settings.max_worker_memory` is watched: over it, the worker ends itself.
    """
    memory_cap = settings.max_worker_memory if settings and in_worker else None
    run = BatchRun(settings, state_path(out_path), abandoned, memory_cap)
    try:
        scores, metadata = batch_scores(pq.ParquetFile(spans_path).read_row_group(batch), bind_all(configs),
                                        window_start, run)
    finally:
        run.close()
        forget_words()
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    for table, path, repeated in ((metadata, metadata_path(out_path), False),
                                  (scores, out_path, _REPEATED_SCORES)):  # scores last: it marks done
        tmp = f"{path}.{os.getpid()}.tmp"
        pq.write_table(table, tmp, **work_file_options(repeated))
        os.replace(tmp, path)
    del scores, metadata
    release_memory()  # a worker waits for its next batch (or the window's end) with no more than its imports
    return out_path
