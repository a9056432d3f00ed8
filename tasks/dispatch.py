"""Stage 8, dispatch: actions chosen by rules, each done exactly once.

Every action has a deterministic id, uuid5 of (loop, window, run or window event,
action name), and a ledger entry written before (`planned`) and after (`sent` /
`failed`, with the response or error) each send. The ledger lies beside the snapshots,
on the same storage. A rerun skips what the ledger says was sent; a failed action is
tried again on the next run. Receivers get the action id (or, for a batch, a key derived
from its ids) as an idempotency key, so a crash between a send and its ledger entry is
absorbed by the receiver: the action log and LangSmith ignore an id they hold, webhook
receivers see the same `Idempotency-Key`.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pyarrow.parquet as pq
from langsmith.schemas import RunBase
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event
from prefect.tasks import exponential_backoff
from pydantic import BaseModel, ValidationError

from tasks.config import RUN_ACTIONS, ActionConfig, LoopConfig, When
from tasks.evaluators import import_ref
from tasks.lease import DispatchLease, run_logger
from tasks.progress import report
from tasks.records import RecordFile
from tasks.run_tree import grown
from tasks.scoring import RunRows, records_path
from tasks.slack import SlackTarget, message, slack_target
from tasks.snapshot import PREFIX, SnapshotStore, not_disk_full, partition_name, partition_start
from tasks.summary import window_resource
from tasks.trends import episode_event, recent_windows
from tasks.webhook import Webhooks, idempotency_key, webhook_secret
from tasks.writeback import BATCH, LangSmithWriter, batch_limit

ACTION_NAMESPACE = uuid.UUID("0b6a3f0e-4f7e-4c1f-9f55-2f0e8d1c7a11")
LEDGER_DIR = "_ledger"
EPISODE_GAP = timedelta(days=1)  # how long a loop may go untriaged and still send an episode's recovery
FOLLOW_UPS = ("log", "feedback", "annotation_queue", "dataset", "webhook", "slack", "prefect_event")

Outcome = tuple[str, Any]


def action_id(loop: str, window_start: datetime, run_id: str, action: str) -> str:
    return str(uuid.uuid5(ACTION_NAMESPACE, f"{loop}/{window_start.isoformat()}/{run_id}/{action}"))


log = logging.getLogger("tracetriage.dispatch")
LEDGER_STATES = ("planned", "sent", "failed")


def _append_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append rows and make them durable before returning; an error names the file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as handle:
            handle.write(b"".join(orjson.dumps(row, default=str) + b"\n" for row in rows))
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        if exc.filename is None:  # a write or fsync: say which file it was
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


def _warn(message: str, *args: Any) -> None:
    run_logger(log).warning(message, *args)


def _jsonl_rows(data: bytes, origin: str, ledger: bool = False) -> tuple[list[dict[str, Any]], int]:
    """The entries of a JSONL object (each a JSON object with a string `action_id`, and for the `ledger` a known
    `state`), and how many lines were not: those are skipped with a warning naming `origin` and the line, never a
    crash."""
    rows, bad = [], 0
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("action_id"), str) and (
                not ledger or row.get("state") in LEDGER_STATES):
            rows.append(row)
            continue
        bad += 1
        _warn("skipped line %d of %s: not an entry (a JSON object with an action_id%s): %.80r", number, origin,
              f" and a state of {', '.join(LEDGER_STATES)}" if ledger else "", line)
    return rows, bad


class Ledger:
    """The action states of one loop's window, beside the snapshots: `_ledger/<loop>/window_start=<ISO>/`.

    Every write is a new segment (one object PUT on S3/GCS; written, fsynced and renamed on a disk), never a
    rewrite, named so segments sort in the order written. Reading replays them: the last entry of an id wins.

    >>> ledger = Ledger(SnapshotStore("/tmp/tracetriage-doc-ledger"), "demo", datetime(2026, 11, 2, tzinfo=UTC))
    >>> ledger.directory
    '_ledger/demo/window_start=2026-11-02T00:00:00Z'
    """

    def __init__(self, store: SnapshotStore, loop: str, window_start: datetime, lease: DispatchLease | None = None):
        self.store, self.lease = store, lease
        self.directory = f"{LEDGER_DIR}/{loop}/{partition_name(window_start)}"
        self.last: dict[str, dict[str, Any]] = {}
        self.segments: list[str] = []  # the segments read or written by this object (what `compact` replaces)
        self.damaged = 0  # unreadable entries: an action among them may have been sent
        for name, data in store.objects(self.directory):
            self.segments.append(name)
            rows, bad = _jsonl_rows(data, f"{store.url}/{self.directory}/{name}", ledger=True)
            if not data.endswith(b"\n"):
                bad += 1  # cut short: entries after the cut are gone, though the last line may parse
                _warn("ledger segment %s/%s/%s is cut short", store.url, self.directory, name)
            self.damaged += bad
            for row in rows:
                if self.state(row["action_id"]) != "sent":  # sent is final, whatever order clocks gave segments
                    self.last[row["action_id"]] = row
        self.written = 0

    def state(self, action_id: str) -> str | None:
        row = self.last.get(action_id)
        return row["state"] if row else None

    def record_many(self, entries: list[dict[str, Any]], state: str) -> None:
        """One durable segment for many entries (each a dict with `action_id` and details)."""
        if not entries:
            return
        at = datetime.now(UTC).isoformat()
        rows = [{**entry, "state": state, "at": at} for entry in entries]
        self._put(rows)
        for row in rows:
            self.last[row["action_id"]] = row

    def _put(self, rows: list[dict[str, Any]]) -> None:
        self.written += 1
        name = f"{time.time_ns():020d}-{os.getpid()}-{self.written:06d}.jsonl"
        self.store.put_bytes(f"{self.directory}/{name}",
                             b"".join(orjson.dumps(row, default=str) + b"\n" for row in rows))
        self.segments.append(name)
        if self.lease:
            self.lease.check()  # written first: what was sent stays on record for the run that took over

    def compact(self) -> None:
        """One segment with the last entry of each id in place of the segments this object read and wrote, so
        the next reader (a rerun, the scheduled run's look for unsent actions) reads one object.

        The new segment is written before the old ones are deleted: a crash in between leaves both, which read
        the same. Segments another writer added meanwhile are not touched."""
        if len(self.segments) <= 1:
            return
        old = list(self.segments)
        self.segments.clear()
        self._put(list(self.last.values()))
        self.store.delete([f"{self.directory}/{name}" for name in old])


def read_ledger(store: SnapshotStore, loop: str) -> list[dict[str, Any]]:
    """Every ledger entry of a loop, window by window, in the order written."""
    rows = []
    for window in store.listing(f"{LEDGER_DIR}/{loop}"):
        for name, data in store.objects(f"{LEDGER_DIR}/{loop}/{window}"):
            rows += _jsonl_rows(data, f"{store.url}/{LEDGER_DIR}/{loop}/{window}/{name}", ledger=True)[0]
    return rows


class ActionLog:
    """The local action log (`do: log`): one JSON line per action, idempotent by action id."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        data = self.path.read_bytes() if self.path.exists() else b""
        if data and not data.endswith(b"\n"):
            data = self._repair(data)
        self.ids = {row["action_id"] for row in _jsonl_rows(data, str(self.path))[0]}

    def _repair(self, data: bytes) -> bytes:
        """A last line cut short by a crash or a full disk: ended, if it is a whole entry, else cut off (its action
        was never confirmed, so it is logged again), before anything is appended after it."""
        keep = data.rfind(b"\n") + 1
        try:
            orjson.loads(data[keep:])
        except orjson.JSONDecodeError:
            _warn("the last line of %s was cut short (%d bytes); removed, its action is logged again", self.path,
                  len(data) - keep)
            with open(self.path, "r+b") as handle:
                handle.truncate(keep)
                os.fsync(handle.fileno())
            return data[:keep]
        with open(self.path, "ab") as handle:
            handle.write(b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        return data + b"\n"

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
    if when.span is not None:
        rows = rows[rows["span_name"] == when.span]
    hit = np.ones(len(rows), dtype=bool)
    if when.below is not None:
        hit &= (rows["score"] < when.below).to_numpy()
    if when.above is not None:
        hit &= (rows["score"] > when.above).to_numpy()
    worst = rows[hit].groupby("trace_id")["score"].agg("min" if when.below is not None else "max")
    matched = traces[traces["trace_id"].isin(worst.index)]
    return matched.assign(evaluator=when.evaluator, score=matched["trace_id"].map(worst).to_numpy())


def _chosen(action_ids: list[str], sample: float) -> list[bool]:
    """A rule's sample: the same actions on every run, as the choice hangs on the action id alone."""
    if sample >= 1:
        return [True] * len(action_ids)
    return [int(hashlib.sha256(a.encode()).hexdigest()[:8], 16) < sample * 2**32 for a in action_ids]


@dataclass
class Plan:
    """A window's planned actions, and how many matching traces each rule's sample or cap left out."""

    actions: list[dict[str, Any]]
    not_sampled: int = 0
    over_cap: int = 0


def window_actions(config: LoopConfig, window_start: datetime, spike: dict[str, Any] | None,
                   patterns: pd.DataFrame, history: list[tuple[datetime, bool]]) -> list[dict[str, Any]]:
    """The rules about the window itself: spike episodes (start and recovery) and failure modes over a bound."""
    window = window_start.isoformat()
    planned = []
    for index, rule in enumerate(config.actions):
        name = config.action_name(index)
        base = {"loop": config.name, "action": name, "do": rule.do, "window_start": window, "trace_id": None,
                "run_id": None}
        if rule.when.spike:
            event = episode_event(spike is not None, history, window_start, config.window.size_delta,
                                  rule.cooldown_delta)
            if event is not None:
                if "episode" in event:
                    event["episode"]["cooldown"] = rule.cooldown
                subject = "spike" if event["event"] == "spike" else "recovery"
                planned.append({"action_id": action_id(config.name, window_start, subject, name), **base, **event,
                                "spike": spike})
        elif rule.when.pattern:
            bound = rule.when.pattern
            for row in patterns.sort_values("condition").to_dict("records"):
                if (row["fail_share"] > bound.share_above
                        and (bound.span is None or row["span_name"] == bound.span)
                        and (bound.condition is None or bound.condition.lower() in row["condition"].lower())
                        and (pd.isna(row["lift"]) or row["lift"] >= bound.min_lift)):  # NaN: no passes have it
                    pattern = {k: row[k] for k in ("condition", "kind", "span_name", "detail", "failing_traces",
                                                   "fail_share", "pass_share", "lift")}
                    pattern["example_trace_ids"] = list(row["example_trace_ids"])
                    pattern = orjson.loads(orjson.dumps(pattern, default=str, option=orjson.OPT_SERIALIZE_NUMPY))
                    planned.append({"action_id": action_id(config.name, window_start, f"pattern:{row['condition']}",
                                                           name), **base, "event": "pattern",
                                    "bound": bound.share_above, "pattern": pattern})
    return planned


def planned_actions(
    config: LoopConfig, window_start: datetime, scores: pd.DataFrame, verdicts: pd.DataFrame,
    attribution: pd.DataFrame, spike: dict[str, Any] | None = None, patterns: pd.DataFrame | None = None,
    history: list[tuple[datetime, bool]] | None = None, known: set[str] | None = None,
) -> Plan:
    """Every action the rules ask for in this window, in a stable order; `history` (the triaged windows before
    this one, and whether each spiked) decides spike episodes; `known` (ids in the window's ledger) come first
    under a cap, so a rerun whose matches changed still stays within it."""
    culprits = attribution.loc[attribution["is_culprit"], ["trace_id", "run_id", "span_name", "reason"]].rename(
        columns={"run_id": "culprit_run_id", "span_name": "culprit_span", "reason": "culprit_reason"})
    window = window_start.isoformat()
    plan = Plan(window_actions(config, window_start, spike, patterns if patterns is not None else
                               pd.DataFrame(columns=["condition"]), history or []))
    for index, rule in enumerate(config.actions):
        if rule.when.is_window_level:
            continue
        name = config.action_name(index)
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
        rows = matched.to_dict("records")
        ids = [action_id(config.name, window_start, row["trace_id"], name) for row in rows]
        chosen = [(i, row) for i, row, keep in zip(ids, rows, _chosen(ids, rule.sample), strict=True) if keep]
        plan.not_sampled += len(rows) - len(chosen)
        if rule.max_per_window is not None and len(chosen) > rule.max_per_window:
            plan.over_cap += len(chosen) - rule.max_per_window
            chosen = sorted(chosen, key=lambda c: c[0] not in (known or ()))[:rule.max_per_window]  # stable sort
        for identity, row in chosen:
            plan.actions.append({
                "action_id": identity,
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
    return plan


@dataclass
class DispatchCounts:
    planned: int = 0
    sent: int = 0
    skipped_duplicate: int = 0
    failed: int = 0
    not_sampled: int = 0
    over_cap: int = 0
    failures: dict[str, dict[str, Any]] = field(default_factory=dict)  # action -> {count, error}: nothing silent
    ledger_damaged: int = 0  # unreadable ledger entries: the sends they may hide were repeated under their first keys

    def as_dict(self) -> dict[str, Any]:
        """The counts; `ledger_damaged` only when there was damage to report."""
        return {k: v for k, v in self.__dict__.items() if k != "ledger_damaged" or v}

    def add_failed(self, action: str, error: Any, count: int = 1) -> None:
        self.failed += count
        entry = self.failures.setdefault(action, {"count": 0, "error": str(error)[:300]})
        entry["count"] += count


@dataclass
class Sinks:
    """The outside systems of a window, built in the window from blocks and env (never flow parameters: they
    hold secrets), and what their messages show."""

    langsmith: LangSmithWriter | None = None
    webhooks: Webhooks | None = None
    slack: dict[str, SlackTarget] = field(default_factory=dict)
    window: dict[str, Any] = field(default_factory=dict)  # the window's summary, for Slack messages
    flow_run_url: str | None = None
    source: str = ""  # the source's identity (config.source_identity), part of Prefect event ids

    def __repr__(self) -> str:
        return f"Sinks(langsmith={self.langsmith is not None}, webhooks={self.webhooks!r}, slack={self.slack!r})"


def _call_action(ref: str, record: dict[str, Any], run: Any) -> Any:
    fn = import_ref(ref, what="action function")
    params = inspect.signature(fn).parameters
    extras = {k: v for k, v in (("action_id", record["action_id"]), ("record", record)) if k in params}
    return fn(run, record.get("score"), **extras)


def root_runs(window_spans_path: str, trace_ids: set[str], with_children: bool = False) -> dict[str, Any]:
    """langsmith `Run` objects for the roots of some traces of a window; `with_children`: each with its trace's
    tree in `child_runs` (for calls, which get the run as evaluators do)."""
    if not trace_ids:
        return {}
    table = pq.read_table(window_spans_path, filters=None if with_children else [("is_root", "=", True)])
    table = table.filter(np.isin(table.column("trace_id").to_numpy(zero_copy_only=False), list(trace_ids)))
    roots = np.flatnonzero(table.column("is_root").to_numpy(zero_copy_only=False)).tolist()
    with RecordFile(records_path(table.schema)) as records:
        rows = RunRows(table, records)
        rows.prepare_runs(roots)  # in one go: the trees of all roots from one pass over the table
        return grown({str(rows.run(i).trace_id): rows.run(i) for i in roots})


# The actions a call may return in the form of langsmith-sdk #2907 (`{"action": name, ...}`), besides `{"do": ...}`.
CALL_ACTIONS = ("add_to_annotation_queue", "add_to_dataset", "trigger_webhook", "create_feedback", "slack")
CONTEXT_KEY = "tracetriage.context"  # the feedback that carries an action's `metadata` to the run in LangSmith


def requested_actions(response: Any) -> list[Any]:
    """The actions a call asked for in what it returned: one action (`{"action": ...}`), a list of actions, or
    `{"then": [...]}`; none for anything else, which is only kept."""
    if isinstance(response, dict):
        if isinstance(response.get("then"), list):
            return response["then"]
        return [response] if "action" in response else []
    if isinstance(response, list) and any(isinstance(i, dict) and ("action" in i or "do" in i) for i in response):
        return response
    return []


def follow_up_fields(spec: Any, parent: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The action config fields and the record fields (`metadata`; a feedback's `score`, `value`, `comment`) of
    one action a call asked for, given as `{"action": ...}` (#2907) or as an action spec `{"do": ...}`."""
    if isinstance(spec, dict) and "action" in spec:
        rest = dict(spec)
        name = rest.pop("action")
        record = {"metadata": rest.pop("metadata")} if rest.get("metadata") is not None else {}
        rest.pop("metadata", None)
        if name == "add_to_annotation_queue":
            return {"do": "annotation_queue", "queue": rest.pop("queue_name", None), **rest}, record
        if name == "add_to_dataset":
            return {"do": "dataset", "dataset": rest.pop("dataset_name", None), **rest}, record
        if name == "trigger_webhook":
            return {"do": "webhook", **rest}, record
        if name == "create_feedback":
            score = rest.pop("score", None)
            if score is not None and (isinstance(score, bool) or not isinstance(score, int | float)):
                raise ValueError(f"create_feedback score {score!r} must be a number")
            record.update(score=score, value=rest.pop("value", None), comment=rest.pop("comment", None))
            return {"do": "feedback", **rest}, record
        if name == "slack":
            return {"do": "slack", **rest}, record
        raise ValueError(f"unknown action {name!r} returned by {parent!r}; accepted actions: "
                         f"{', '.join(CALL_ACTIONS)} (or {{\"do\": ...}}, {{\"then\": [...]}})")
    if not isinstance(spec, dict) or spec.get("do") not in FOLLOW_UPS:
        raise ValueError(f"follow-up {spec!r} of {parent!r}: a follow-up is a dict with `action:` one of "
                         f"{', '.join(CALL_ACTIONS)}, or `do:` one of {', '.join(FOLLOW_UPS)}")
    return dict(spec), {}


def context_comment(record: dict[str, Any], when: When) -> str:
    """What a reviewer reads first, e.g. 'faithfulness 0.42 < 0.7; culprit span search_docs (3f2c…)'."""
    parts = []
    if record.get("evaluator") and record.get("score") is not None:
        bound = f" < {when.below:g}" if when.below is not None else f" > {when.above:g}" if when.above is not None \
            else ""
        parts.append(f"{record['evaluator']} {record['score']:.2f}{bound}")
    else:
        parts.append("failing trace")
    if record.get("culprit_span"):
        parts.append(f"culprit span {record['culprit_span']} ({str(record.get('culprit_run_id'))[:4]}…)")
    return "; ".join(parts)


def follow_ups(parent: dict[str, Any], rule: ActionConfig, then: list[Any],
               specs: dict[str, ActionConfig]) -> tuple[list[dict], dict[str, ActionConfig | None]]:
    """The actions a call asked for (see `requested_actions`): planned actions, and the rule of each by action
    id (None where the spec is invalid).

    Each is an action without `when`, in the #2907 form (`{"action": "add_to_annotation_queue", "queue_name":
    ..., "metadata": {...}}`) or as a spec (`{"do": "annotation_queue", "queue": "escalations"}`); its id derives
    from the call's, so a rerun plans the same ones. An action's `metadata` goes to LangSmith as a feedback on
    the run (key `tracetriage.context`, the metadata in `extra`), an action of its own with an id derived from
    the call's too. Equal specs share one rule (in `specs`), so their actions are sent together. An invalid spec
    becomes an action that fails with the reason (in the ledger and the summary), never a crash of the window.
    """
    planned, rules = [], {}

    def add(record: dict[str, Any], fields: dict[str, Any]) -> None:
        key = f"{record['action']}/{orjson.dumps(fields, option=orjson.OPT_SORT_KEYS).decode()}"
        if key not in specs:
            specs[key] = ActionConfig(when=rule.when, **{**fields, "name": record["action"]})
        rules[record["action_id"]] = specs[key]
        record["do"] = fields["do"]
        planned.append(record)

    for i, spec in enumerate(then):
        name = f"{parent['action']}.then-{i}"
        identity = uuid.UUID(parent["action_id"])
        record = {**parent, "action_id": str(uuid.uuid5(identity, f"then/{i}")), "action": name,
                  "follow_up_of": parent["action_id"]}
        try:
            fields, extra = follow_up_fields(spec, parent["action"])
            add({**record, **extra}, fields)
            if "metadata" in extra and fields["do"] != "feedback":
                add({**record, "action_id": str(uuid.uuid5(identity, f"then/{i}/context")),
                     "action": f"{name}.context", "metadata": extra["metadata"],
                     "comment": context_comment(parent, rule.when)}, {"do": "feedback", "key": CONTEXT_KEY})
        except (ValueError, TypeError, ValidationError) as exc:
            rules[record["action_id"]] = None
            record["do"], record["invalid"] = "invalid", f"{type(exc).__name__}: {exc}"[:500]
            planned.append(record)
    return planned, rules


def _prefect_event(rule: ActionConfig, record: dict[str, Any], source: str) -> Outcome:
    """The event's id derives from the action id and the source's identity: a rerun emits the same id (Prefect
    keeps it once), and two sources under one loop name, whose window actions share an id, do not collide."""
    related = [{"prefect.resource.id": window_resource(record["loop"], record["window_start"])["prefect.resource.id"],
                "prefect.resource.role": "window"}]
    if record.get("evaluator"):
        related.append({"prefect.resource.id": f"tracetriage.evaluator.{record['evaluator']}",
                        "prefect.resource.role": "evaluator"})
    if record.get("culprit_span"):
        related.append({"prefect.resource.id": f"tracetriage.span.{record['culprit_span']}",
                        "prefect.resource.role": "span"})
    resource = window_resource(record["loop"], record["window_start"]) if record["trace_id"] is None else {
        "prefect.resource.id": f"tracetriage.run.{record['trace_id']}", "tracetriage.loop": record["loop"],
        "tracetriage.window_start": record["window_start"]}
    event_id = uuid.uuid5(uuid.UUID(record["action_id"]), f"source/{source}")
    emitted = emit_event(event=rule.event or f"tracetriage.action.{record['action']}", resource=resource,
                         related=related, payload=_json_safe(record), id=event_id)
    return ("sent", {"event_id": str(event_id)}) if emitted else ("failed", "no Prefect API to emit events to")


def _chunk_size(rule: ActionConfig | None, record: dict[str, Any], total: int) -> int:
    """How many actions one send covers: the ledger is written after each send."""
    do = rule.do if rule else "invalid"
    if do in ("log", "invalid") or (do == "slack" and record["trace_id"] is not None):
        return total  # one local write; one Slack message for all the traces a rule matched
    if do in RUN_ACTIONS:
        return batch_limit(do)
    return rule.batch if do == "webhook" else BATCH if do == "prefect_event" else 1


def _whole_sends(actions: list[dict[str, Any]], todo: set[str],
                 rules: dict[str, ActionConfig]) -> list[dict[str, Any]]:
    """With a damaged ledger, the actions to send again: every send (a webhook batch, a Slack message) that holds an
    action not known to be sent goes again whole, as the first run made it from the full plan, so the receiver gets
    the idempotency key it saw then, never a new one for a new mix of actions."""
    chosen: list[dict[str, Any]] = []
    by_action: dict[str, list[dict[str, Any]]] = {}
    for p in actions:
        by_action.setdefault(p["action"], []).append(p)
    for name, group in by_action.items():
        size = _chunk_size(rules.get(name), group[0], len(group))
        for begin in range(0, len(group), size):
            send = group[begin:begin + size]
            if any(p["action_id"] in todo for p in send):
                chosen += send
    return chosen


def dispatch_actions(
    config: LoopConfig, plan: Plan, ledger: Ledger, action_log: ActionLog,
    window_spans_path: str, sinks: Sinks | None = None,
) -> DispatchCounts:
    """Carry out planned actions not yet sent; returns the counts.

    The ledger gets every `planned` entry in one durable write before any effect, and each send's outcome right
    after that send: a crash between two sends leaves the later ones `planned`, which the next run carries out
    (receivers see the same idempotency keys). What a `call` asks for is kept in its `sent` entry, so a rerun
    finds the follow-ups of calls it does not make again.
    """
    sinks = sinks or Sinks()
    counts = DispatchCounts(planned=len(plan.actions), not_sampled=plan.not_sampled, over_cap=plan.over_cap)
    rules = {config.action_name(i): rule for i, rule in enumerate(config.actions)}
    todo = [p for p in plan.actions if ledger.state(p["action_id"]) != "sent"]
    counts.skipped_duplicate = len(plan.actions) - len(todo)
    # Planned or failed in an earlier run: the effect may have happened (what has no idempotency key checks).
    tried_before = {p["action_id"] for p in todo if ledger.state(p["action_id"]) is not None}
    if ledger.damaged:
        counts.ledger_damaged = ledger.damaged
        todo = _whole_sends(plan.actions, {p["action_id"] for p in todo}, rules)
        tried_before |= {p["action_id"] for p in todo}  # any of them may have been done
    ledger.record_many([{"action_id": p["action_id"], "action": p["action"], "trace_id": p["trace_id"]}
                        for p in todo], "planned")
    loaded: list[dict[str, Any]] = []

    def runs() -> dict[str, Any]:
        """The root runs of the window's actions and examples, read once, when a send first needs them."""
        if not loaded:
            trace_ids = {p["trace_id"] for p in plan.actions if p["trace_id"]}
            trace_ids |= {t for r in sinks.window.get("root_causes", []) for t in r["example_trace_ids"]}
            loaded.append(root_runs(window_spans_path, trace_ids,
                                    with_children=any(rule.do == "call" for rule in config.actions)))
        return loaded[0]

    def send(rule: ActionConfig | None, records: list[dict[str, Any]]) -> list[Outcome]:
        do = rule.do if rule else "invalid"
        if do == "invalid":
            return [("failed", r["invalid"]) for r in records]
        if do == "log":
            return [("sent", "written" if new else "already logged") for new in action_log.write_many(records)]
        if do == "call":
            try:
                returned = _call_action(rule.ref, records[0], runs().get(records[0]["trace_id"]))
            except Exception as exc:  # noqa: BLE001 - the user's function: recorded, tried again next run
                return [("failed", f"{type(exc).__name__}: {exc}"[:500])]
            return [("sent", _json_safe(returned))]
        if do == "webhook":
            name = records[0]["action"]
            if name not in rules:  # a call asked for it: its secret is resolved now (a missing one fails it)
                return Webhooks({name: webhook_secret(rule)}).send(rule, name, records, config.name)
            return sinks.webhooks.send(rule, name, records, config.name) if sinks.webhooks else \
                [("failed", "no webhook secrets were resolved")] * len(records)
        if do == "slack":
            target = sinks.slack.get(records[0]["action"]) or slack_target(rule)
            shown = runs() if rule.include_io else {}
            text, blocks = message(records, rule, sinks.window, config.name, sinks.flow_run_url, shown)
            return [target.post(text, blocks, idempotency_key(records))] * len(records)
        if do == "prefect_event":
            return [_prefect_event(rule, r, sinks.source) for r in records]
        if sinks.langsmith is None:
            return [("failed", "no LangSmith client: set LANGSMITH_API_KEY or source.credentials")] * len(records)
        if do in ("annotation_queue", "feedback"):
            return getattr(sinks.langsmith, do)(rule, records, runs(), tried_before)
        return getattr(sinks.langsmith, do)(rule, records, runs())

    stage = f"dispatch {plan.actions[0]['window_start'][:16]}" if plan.actions else "dispatch"
    done, total = [0], [len(todo)]

    def carry_out(records: list[dict[str, Any]], rule_of: Callable[[dict[str, Any]], ActionConfig | None]) -> None:
        groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for r in records:  # one group per action and rule: follow-ups of one name can have different specs
            groups.setdefault((r["action"], id(rule_of(r))), []).append(r)
        for (name, _), group in groups.items():
            rule = rule_of(group[0])
            size = _chunk_size(rule, group[0], len(group))
            for begin in range(0, len(group), size):
                chunk = group[begin:begin + size]
                try:
                    outcomes = send(rule, chunk)
                except Exception as exc:  # noqa: BLE001 - a sink that broke: recorded, tried again next run
                    outcomes = [("failed", f"{type(exc).__name__}: {exc}"[:500])] * len(chunk)
                sent = [(r, detail) for r, (got, detail) in zip(chunk, outcomes, strict=True) if got == "sent"]
                failed = [(r, detail) for r, (got, detail) in zip(chunk, outcomes, strict=True) if got != "sent"]
                ledger.record_many([{"action_id": r["action_id"], "action": name, "response": detail,
                                     **(_then(detail) if rule and rule.do == "call" else {})} for r, detail in sent],
                                   "sent")
                ledger.record_many([{"action_id": r["action_id"], "action": name, "error": detail}
                                    for r, detail in failed], "failed")
                counts.sent += len(sent)
                if failed:
                    counts.add_failed(name, failed[0][1], len(failed))
                done[0] += len(chunk)
                report(stage, done[0], total[0])

    carry_out(todo, lambda r: rules.get(r["action"]))

    extra_rules: dict[str, ActionConfig | None] = {}
    extra: list[dict[str, Any]] = []
    specs: dict[str, ActionConfig] = {}
    for parent in plan.actions:
        row = ledger.last.get(parent["action_id"], {})
        if parent["do"] == "call" and row.get("state") == "sent" and row.get("then"):
            planned, more = follow_ups(parent, rules[parent["action"]], row["then"], specs)
            extra += planned
            extra_rules.update(more)
    counts.planned += len(extra)
    extra_todo = [p for p in extra if ledger.state(p["action_id"]) != "sent"]
    tried_before |= {p["action_id"] for p in extra_todo if ledger.state(p["action_id"]) is not None}
    total[0] += len(extra_todo)
    counts.skipped_duplicate += len(extra) - len(extra_todo)
    ledger.record_many([{"action_id": p["action_id"], "action": p["action"], "trace_id": p["trace_id"],
                         "follow_up_of": p["follow_up_of"]} for p in extra_todo], "planned")
    carry_out(extra_todo, lambda r: extra_rules[r["action_id"]])
    ledger.compact()
    return counts


def _then(response: Any) -> dict[str, Any]:
    """A call's request for further actions, kept in its ledger entry."""
    requested = requested_actions(response)
    return {"then": [_json_safe(spec) for spec in requested]} if requested else {}


def _plain(value: Any) -> Any:
    """What orjson cannot write itself, as JSON data: a `Run` as its reference (a call's metadata may hold runs,
    e.g. `run.child_runs`), another model as its fields, anything else as its text."""
    if isinstance(value, RunBase):
        return {"run_id": str(value.id), "name": value.name, "run_type": value.run_type}
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)


def _json_safe(value: Any) -> Any:
    """`value` as JSON data for the ledger (UUIDs, datetimes, runs included); what orjson cannot write (int keys,
    huge ints) as its text, so a call that did its work is never recorded as failed because of what it
    returned."""
    try:
        return orjson.loads(orjson.dumps(value, default=_plain,
                                         option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY))
    except (TypeError, orjson.JSONEncodeError):
        return {"repr": repr(value)[:1000]}


# The planned actions are made inside the task: Prefect walks list and dict parameters
# looking for futures, which takes seconds for tens of thousands of action dicts.
@task(name="dispatch", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=2),
      retry_condition_fn=not_disk_full)
def dispatch_task(
    config: LoopConfig, window_start: datetime, scores: pd.DataFrame, verdicts: pd.DataFrame,
    attribution: pd.DataFrame, patterns: pd.DataFrame, spike: dict[str, Any] | None, store: SnapshotStore,
    action_log_path: str, window_spans_path: str, sinks: Sinks | None = None,
) -> DispatchCounts:
    with DispatchLease(store, config.name) as lease:  # the ledger and the episode history are read under it
        cooldown = max([r.cooldown_delta for r in config.actions if r.when.spike], default=None)
        history = [] if cooldown is None else recent_windows(store, window_start,
                                                             cooldown + config.window.size_delta + EPISODE_GAP)
        ledger = Ledger(store, config.name, window_start, lease)
        plan = planned_actions(config, window_start, scores, verdicts, attribution, spike, patterns, history,
                               set(ledger.last))
        return dispatch_actions(config, plan, ledger, ActionLog(action_log_path), window_spans_path, sinks)


def unfinished_windows(store: SnapshotStore, loop: str, since: datetime, before: datetime) -> list[datetime]:
    """Windows in `[since, before)` whose ledger holds actions not sent (failed, or planned when a run died)."""
    found = []
    for name in store.listing(f"{LEDGER_DIR}/{loop}"):
        if name.startswith(PREFIX) and since <= (start := partition_start(name)) < before:
            if any(row["state"] != "sent" for row in Ledger(store, loop, start).last.values()):
                found.append(start)
    return sorted(found)
