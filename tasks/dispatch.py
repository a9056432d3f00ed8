"""Stage 8, dispatch: actions chosen by rules, each done exactly once.

Every action has a deterministic id, uuid5 of (loop, window, run, action name), and
a ledger entry written before (`planned`) and after (`sent` / `failed`) the effect.
A rerun skips what the ledger says was sent; a failed action is tried again on the
next run. Receivers get the action id as an idempotency key, so a crash between an
effect and its ledger entry is absorbed by the receiver (the action log ignores an
id it already holds).
"""

from __future__ import annotations

import contextlib
import fcntl
import inspect
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from tasks.config import LoopConfig, When
from tasks.evaluators import import_ref
from tasks.records import RecordFile
from tasks.scoring import RunRows, records_path
from tasks.webhook import Webhooks
from tasks.writeback import LangSmithWriter

WRITE_BACK = ("feedback", "annotation_queue", "dataset", "webhook")
ACTION_NAMESPACE = uuid.UUID("0b6a3f0e-4f7e-4c1f-9f55-2f0e8d1c7a11")


def action_id(loop: str, window_start: datetime, run_id: str, action: str) -> str:
    return str(uuid.uuid5(ACTION_NAMESPACE, f"{loop}/{window_start.isoformat()}/{run_id}/{action}"))


def _append_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append rows and make them durable before returning."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as handle:
        for row in rows:
            handle.write(orjson.dumps(row, default=str) + b"\n")
        handle.flush()
        os.fsync(handle.fileno())


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    with open(path, "rb") as handle:
        for line in handle:
            try:
                rows.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                continue  # a torn last line from a crash mid-write; its action was never confirmed
    return rows


class Ledger:
    """Append-only JSONL of action states; the last state of an id wins."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.states: dict[str, str] = {row["action_id"]: row["state"] for row in _read_jsonl(self.path)}

    def record(self, action_id: str, state: str, **detail: Any) -> None:
        self.record_many([{"action_id": action_id, **detail}], state)

    def record_many(self, entries: list[dict[str, Any]], state: str) -> None:
        """One durable append for many entries (each a dict with `action_id` and details)."""
        if not entries:
            return
        at = datetime.now(UTC).isoformat()
        _append_jsonl(self.path, [{**entry, "state": state, "at": at} for entry in entries])
        for entry in entries:
            self.states[entry["action_id"]] = state


class ActionLog:
    """The local action log (`do: log`): one JSON line per action, idempotent by action id."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.ids = {row.get("action_id") for row in _read_jsonl(self.path)}

    def write_many(self, records: list[dict[str, Any]]) -> list[bool]:
        """Append the records not logged yet, in one durable write; True where a record was new."""
        new = [r["action_id"] not in self.ids for r in records]
        _append_jsonl(self.path, [r for r, is_new in zip(records, new, strict=True) if is_new])
        self.ids.update(r["action_id"] for r in records)
        return new


def matching_traces(when: When, scores: pd.DataFrame, verdicts: pd.DataFrame) -> pd.DataFrame:
    """Traces a rule applies to, with the score that matched it (NaN for `failing: true`)."""
    traces = verdicts[["trace_id", "verdict"]]
    if when.failing:
        traces = traces[traces["verdict"] == "fail"]
    if when.evaluator is None:
        return traces.assign(evaluator=None, score=np.nan)
    rows = scores[(scores["evaluator"] == when.evaluator) & scores["score"].notna()]
    hit = np.ones(len(rows), dtype=bool)
    if when.below is not None:
        hit &= (rows["score"] < when.below).to_numpy()
    if when.above is not None:
        hit &= (rows["score"] > when.above).to_numpy()
    worst = rows[hit].groupby("trace_id")["score"].agg("min" if when.below is not None else "max")
    matched = traces[traces["trace_id"].isin(worst.index)]
    return matched.assign(evaluator=when.evaluator, score=matched["trace_id"].map(worst).to_numpy())


def planned_actions(
    config: LoopConfig, window_start: datetime, scores: pd.DataFrame, verdicts: pd.DataFrame,
    attribution: pd.DataFrame, spike: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Every action the rules ask for in this window, in a stable order; `when: spike` rules once per window."""
    culprits = attribution.loc[attribution["is_culprit"], ["trace_id", "run_id", "span_name", "reason"]].rename(
        columns={"run_id": "culprit_run_id", "span_name": "culprit_span", "reason": "culprit_reason"})
    window = window_start.isoformat()
    planned: list[dict[str, Any]] = []
    for index, rule in enumerate(config.actions):
        name = config.action_name(index)
        if rule.when.spike:
            if spike is not None:
                planned.append({"action_id": action_id(config.name, window_start, "spike", name), "loop": config.name,
                                "action": name, "do": rule.do, "window_start": window, "trace_id": None,
                                "run_id": None, "spike": spike})
            continue
        matched = matching_traces(rule.when, scores, verdicts).merge(culprits, on="trace_id", how="left")
        if rule.when.root_cause is not None:
            cause = rule.when.root_cause
            keep = matched["verdict"] == "fail"
            if cause.span is not None:
                keep &= matched["culprit_span"] == cause.span
            if cause.reason is not None:
                keep &= matched["culprit_reason"] == cause.reason
            matched = matched[keep]
        matched = matched.sort_values("trace_id").astype(object).where(matched.notna(), None)
        for row in matched.to_dict("records"):
            planned.append({
                "action_id": action_id(config.name, window_start, row["trace_id"], name),
                "loop": config.name,
                "action": name,
                "do": rule.do,
                "window_start": window,
                "trace_id": row["trace_id"],
                "run_id": row["trace_id"],  # a root run's id is its trace id
                "evaluator": row["evaluator"],
                "score": None if row["score"] is None else float(row["score"]),
                "verdict": row["verdict"],
                "culprit_run_id": row["culprit_run_id"],
                "culprit_span": row["culprit_span"],
                "culprit_reason": row["culprit_reason"],
            })
    return planned


@dataclass
class DispatchCounts:
    planned: int = 0
    sent: int = 0
    skipped_duplicate: int = 0
    failed: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def _call_action(ref: str, record: dict[str, Any], run: Any) -> Any:
    fn = import_ref(ref, what="action function")
    params = inspect.signature(fn).parameters
    extras = {k: v for k, v in (("action_id", record["action_id"]), ("record", record)) if k in params}
    return fn(run, record.get("score"), **extras)


def root_runs(window_spans_path: str, trace_ids: set[str]) -> dict[str, Any]:
    """langsmith `Run` objects for the roots of some traces of a window."""
    if not trace_ids:
        return {}
    table = pq.read_table(window_spans_path, filters=[("is_root", "=", True)])
    table = table.filter(np.isin(table.column("trace_id").to_numpy(zero_copy_only=False), list(trace_ids)))
    with RecordFile(records_path(table.schema)) as records:
        rows = RunRows(table, records)
        return {str(rows.run(i).trace_id): rows.run(i) for i in range(table.num_rows)}


def dispatch_actions(
    config: LoopConfig, planned: list[dict[str, Any]], ledger: Ledger, action_log: ActionLog,
    window_spans_path: str, writer: LangSmithWriter | None = None, webhooks: Webhooks | None = None,
) -> DispatchCounts:
    """Carry out planned actions not yet sent; returns the counts.

    The ledger gets every `planned` entry in one durable write before any effect, and
    the outcomes after: a crash in between leaves `planned` entries, which the next run
    carries out again (the action log ignores ids it holds; `call` functions receive
    the action id to do the same).
    """
    counts = DispatchCounts(planned=len(planned))
    todo = [p for p in planned if ledger.states.get(p["action_id"]) != "sent"]
    counts.skipped_duplicate = len(planned) - len(todo)
    ledger.record_many([{"action_id": p["action_id"], "action": p["action"], "trace_id": p["trace_id"]}
                        for p in todo], "planned")

    logged = [p for p in todo if p["do"] == "log"]
    if logged:
        new = action_log.write_many(logged)
        ledger.record_many([{"action_id": p["action_id"], "response": "written" if is_new else "already logged"}
                            for p, is_new in zip(logged, new, strict=True)], "sent")
        counts.sent += len(logged)

    calls = [p for p in todo if p["do"] == "call"]
    remote = [p for p in todo if p["do"] in WRITE_BACK]
    rules = {config.action_name(i): rule for i, rule in enumerate(config.actions)}
    runs = root_runs(window_spans_path, {p["trace_id"] for p in calls + remote if p["trace_id"]})
    for name in dict.fromkeys(p["action"] for p in remote):
        records = [p for p in remote if p["action"] == name]
        rule = rules[name]
        if rule.do == "webhook":
            outcomes = webhooks.send(rule, name, records, config.name) if webhooks else \
                [("failed", "no webhook secrets were resolved")] * len(records)
        elif writer is None:
            outcomes = [("failed", "no LangSmith client: set LANGSMITH_API_KEY or source.credentials")] * len(records)
        else:
            outcomes = getattr(writer, rule.do)(rule, records, runs)
        for state in ("sent", "failed"):
            ledger.record_many([{"action_id": r["action_id"], ("response" if state == "sent" else "error"): detail}
                                for r, (got, detail) in zip(records, outcomes, strict=True) if got == state], state)
        sent = sum(got == "sent" for got, _ in outcomes)
        counts.sent += sent
        counts.failed += len(records) - sent
    for record in calls:
        try:
            response = _call_action(rules[record["action"]].ref, record, runs.get(record["trace_id"]))
        except Exception as exc:
            ledger.record(record["action_id"], "failed", error=f"{type(exc).__name__}: {exc}"[:500])
            counts.failed += 1
            continue
        ledger.record(record["action_id"], "sent", response=_json_safe(response))
        counts.sent += 1
    return counts


def _json_safe(value: Any) -> Any:
    return orjson.loads(orjson.dumps(value, default=str))


@contextlib.contextmanager
def dispatch_lock(ledger_path: str | Path) -> Iterator[None]:
    """One dispatch per ledger at a time: a scheduled run and a manual rerun of the same window cannot both
    send; the second reads the ledger after the first has written it.

    An exclusive `flock` on `<ledger>.lock`, held by processes on the machine whose disk holds the ledger
    (a Prefect global concurrency limit did the same at about 2 s per window). The kernel drops it when its
    holder dies, so a crashed run never leaves the loop locked.
    """
    path = Path(f"{ledger_path}.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# The planned actions are made inside the task: Prefect walks list and dict parameters
# looking for futures, which takes seconds for tens of thousands of action dicts.
@task(name="dispatch", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=2))
def dispatch_task(
    config: LoopConfig, window_start: datetime, scores: pd.DataFrame, verdicts: pd.DataFrame,
    attribution: pd.DataFrame, spike: dict[str, Any] | None, ledger_path: str, action_log_path: str,
    window_spans_path: str, writer: LangSmithWriter | None = None, webhooks: Webhooks | None = None,
) -> DispatchCounts:
    planned = planned_actions(config, window_start, scores, verdicts, attribution, spike)
    return dispatch_actions(config, planned, Ledger(ledger_path), ActionLog(action_log_path), window_spans_path,
                            writer, webhooks)
