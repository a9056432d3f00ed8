"""Results back into LangSmith: feedback, annotation queue items and dataset examples, through the SDK.

Each function takes planned actions (see `tasks.dispatch`) and returns one outcome per
action: `("sent", response)` or `("failed", error)`. Ids are deterministic (the action
id is the feedback id; the example id is derived from it), so a retry after a lost
response meets a 409, which counts as done. Writes are batched where the API takes
batches (queue items, examples) and paced under LangSmith's limits (feedback: 2,000
requests / 10 s; other routes: 1,000 / 10 s).
"""

from __future__ import annotations

import time
import uuid
import warnings
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

from langsmith import Client
from langsmith import utils as ls_utils

from tasks.config import ActionConfig
from tasks.langsmith import ATTEMPTS, RateLimiter

Outcome = tuple[str, Any]
FEEDBACK_LIMIT = (2000, 10.0)
OTHER_LIMIT = (1000, 10.0)
BATCH = 100
FEEDBACK_THREADS = 8
MISSING = "run not in the window's spans"


PERMANENT = (ls_utils.LangSmithAuthError, ls_utils.LangSmithNotFoundError, ls_utils.LangSmithUserError)


def with_retries(call: Callable[[], Any], pace: RateLimiter, attempts: int = ATTEMPTS) -> Any:
    """`call()` paced and retried on what passes (429, 5xx, dropped connections); a 409 means done before.

    The SDK's own retries stop at some of these (a 502 on a POST), and each attempt must wait for the bucket.
    """
    for attempt in range(attempts):
        try:
            with pace.slot():
                return call()
        except ls_utils.LangSmithConflictError:
            return "conflict"
        except PERMANENT:
            raise
        except (ls_utils.LangSmithError, OSError):
            if attempt + 1 == attempts:
                raise
            if attempt:
                time.sleep(min(0.2 * 2**attempt, 5.0))


def _describe(record: dict[str, Any]) -> str:
    if record.get("comment"):  # written by a call (or the context of an action it asked for)
        return record["comment"]
    score = "" if record.get("score") is None else f" (score {record['score']:.3g})"
    what = f"failed {record['evaluator']}{score}" if record.get("evaluator") else "failing trace"
    if record.get("culprit_span"):
        return f"tracetriage: {what}; culprit span {record['culprit_span']} ({record['culprit_reason']})"
    return f"tracetriage: {what}"


def _extra(record: dict[str, Any]) -> dict[str, Any]:
    extra = {"tracetriage": {k: record.get(k) for k in ("loop", "window_start", "action", "action_id", "evaluator",
                                                         "culprit_run_id", "culprit_span", "culprit_reason")}}
    if record.get("metadata") is not None:  # what a call attached to the action it asked for
        extra["metadata"] = record["metadata"]
    return extra


def _score(record: dict[str, Any]) -> float | None:
    """The feedback's score: the record's; 0 for a failure without one, unless a call gave a `value` instead."""
    if record.get("score") is None:
        return None if record.get("value") is not None else 0.0
    return record["score"]


def _run_key(run: Any) -> dict[str, Any]:
    return {"run_id": str(run.id), "session_id": str(run.session_id), "start_time": _aware(run.start_time)}


def _aware(moment: datetime) -> datetime:
    from datetime import UTC

    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class LangSmithWriter:
    """Write-back to one LangSmith workspace; paces its requests across calls."""

    def __init__(self, client: Client):
        self.client = client
        self.feedback_pace = RateLimiter(*FEEDBACK_LIMIT)
        self.other_pace = RateLimiter(*OTHER_LIMIT)
        self._queues: dict[str, str] = {}
        self._queued: dict[str, set[str]] = {}
        self._datasets: dict[str, str] = {}

    def feedback(self, rule: ActionConfig, records: list[dict[str, Any]], runs: dict[str, Any]) -> list[Outcome]:
        """`create_feedback` on each failing run (and on its culprit span with `on_culprit`), synchronously."""

        def send(record: dict[str, Any]) -> Outcome:
            run = runs.get(record["trace_id"])
            if run is None:
                return "failed", MISSING
            targets = [(record["run_id"], record["action_id"])]
            if rule.on_culprit and record.get("culprit_run_id"):
                targets.append((record["culprit_run_id"], str(uuid.uuid5(uuid.UUID(record["action_id"]), "culprit"))))
            try:
                for run_id, feedback_id in targets:
                    with_retries(lambda run_id=run_id, feedback_id=feedback_id: self.client.create_feedback(
                        run_id, key=rule.key or record.get("evaluator") or "tracetriage_failure",
                        score=_score(record), value=record.get("value"),
                        comment=_describe(record), feedback_id=feedback_id, feedback_source_type="model",
                        session_id=str(run.session_id), extra=_extra(record), stop_after_attempt=1),
                        self.feedback_pace)
            except Exception as exc:  # noqa: BLE001 - recorded in the ledger, retried on the next run
                return "failed", _error(exc)
            return "sent", {"feedback_ids": [f for _, f in targets]}

        with ThreadPoolExecutor(FEEDBACK_THREADS) as pool:
            return list(pool.map(send, records))

    def queue_id(self, rule: ActionConfig) -> str:
        """The rule's queue, created (with the rubric from config) if missing."""
        name = rule.queue
        if name not in self._queues:
            found = with_retries(lambda: list(self.client.list_annotation_queues(name=name)), self.other_pace)
            match = [q for q in found if q.name == name]
            if match:
                self._queues[name] = str(match[0].id)
            else:
                queue_id = uuid.uuid5(uuid.NAMESPACE_URL, f"tracetriage/queue/{name}")
                with_retries(lambda: self.client.create_annotation_queue(
                    name=name, description="Failing traces routed by tracetriage", rubric_instructions=rule.rubric,
                    queue_id=queue_id), self.other_pace)
                self._queues[name] = str(queue_id)
        return self._queues[name]

    def annotation_queue(self, rule: ActionConfig, records: list[dict[str, Any]], runs: dict[str, Any],
                         tried_before: AbstractSet[str] = frozenset()) -> list[Outcome]:
        """Runs added to the queue by key, in batches; the ledger keeps a run from being added twice.

        An add carries no idempotency key, so actions `tried_before` (a run died, or a send failed, after the add
        may have landed) are first looked up in the queue, and the runs it holds are not added again."""
        try:
            queue = self.queue_id(rule)
            held = self.queued_runs(queue) if any(r["action_id"] in tried_before for r in records) else set()
        except Exception as exc:  # noqa: BLE001
            return [("failed", f"annotation queue {rule.queue!r}: {_error(exc)}")] * len(records)

        def add(batch: list[dict[str, Any]]) -> None:
            keys = [_run_key(runs[r["trace_id"]]) for r in batch]
            if keys := [key for key in keys if key["run_id"] not in held]:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    self.client.add_runs_to_annotation_queue(queue, runs=keys)

        return _batched(records, runs, lambda batch: with_retries(lambda: add(batch), self.other_pace),
                        lambda r: {"queue_id": queue})

    def queued_runs(self, queue: str) -> set[str]:
        """The ids of the runs a queue holds, read once per window."""
        if queue not in self._queued:
            def listed() -> set[str]:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    return {str(run.id) for run in self.client.list_runs_from_annotation_queue(queue)}

            self._queued[queue] = with_retries(listed, self.other_pace)
        return self._queued[queue]

    def dataset_id(self, rule: ActionConfig) -> str:
        name = rule.dataset
        if name not in self._datasets:
            if with_retries(lambda: self.client.has_dataset(dataset_name=name), self.other_pace):
                dataset = with_retries(lambda: self.client.read_dataset(dataset_name=name), self.other_pace)
            else:
                dataset = with_retries(lambda: self.client.create_dataset(
                    name, description="Failing production runs, from tracetriage"), self.other_pace)
                if dataset == "conflict":  # created by an attempt whose response was lost
                    dataset = with_retries(lambda: self.client.read_dataset(dataset_name=name), self.other_pace)
            self._datasets[name] = str(dataset.id)
        return self._datasets[name]

    def dataset(self, rule: ActionConfig, records: list[dict[str, Any]], runs: dict[str, Any]) -> list[Outcome]:
        """Failing runs as examples: inputs, outputs, metadata with window, score and culprit; ids from actions."""
        try:
            dataset = self.dataset_id(rule)
        except Exception as exc:  # noqa: BLE001
            return [("failed", f"dataset {rule.dataset!r}: {_error(exc)}")] * len(records)

        def example(r: dict[str, Any]) -> dict[str, Any]:
            run = runs[r["trace_id"]]
            return {"id": example_id(r), "inputs": run.inputs or {}, "outputs": run.outputs or {},
                    "source_run_id": r["run_id"],
                    "metadata": {"window_start": r["window_start"], "loop": r["loop"], "evaluator": r.get("evaluator"),
                                 "score": r.get("score"), "culprit_span": r.get("culprit_span"),
                                 "culprit_run_id": r.get("culprit_run_id"), "culprit_reason": r.get("culprit_reason")}}

        return _batched(records, runs, lambda batch: with_retries(lambda: self.client.create_examples(
            dataset_id=dataset, examples=[example(r) for r in batch]), self.other_pace),
            lambda r: {"example_id": example_id(r)})


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


def _batched(records: list[dict[str, Any]], runs: dict[str, Any], send: Callable[[list[dict[str, Any]]], Any],
             detail: Callable[[dict[str, Any]], Any]) -> list[Outcome]:
    """`send` the records BATCH at a time; one outcome per record (a run missing from the window fails)."""
    outcomes: list[Outcome] = []
    for begin in range(0, len(records), BATCH):
        batch = records[begin:begin + BATCH]
        present = [r for r in batch if r["trace_id"] in runs]
        try:
            if present:
                send(present)
        except Exception as exc:  # noqa: BLE001 - recorded in the ledger, retried on the next run
            outcomes += [("failed", _error(exc))] * len(batch)
            continue
        outcomes += [("sent", detail(r)) if r["trace_id"] in runs else ("failed", MISSING) for r in batch]
    return outcomes


def example_id(record: dict[str, Any]) -> str:
    return str(uuid.uuid5(uuid.UUID(record["action_id"]), "example"))
