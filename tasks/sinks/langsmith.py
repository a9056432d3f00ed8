"""Results back into LangSmith: feedback, annotation queue items and dataset examples, through the SDK.

Each function takes planned actions (see `tasks.dispatch.send`) and returns one outcome per
action: `("sent", response)` or `("failed", error)`. Ids are deterministic (the action
id is the feedback id; the example id is derived from it), so a retry after a lost
response writes nothing twice (a 409 counts as done). Every kind is written in batches:
feedback as parts of multipart ingest requests, queue items and examples in bulk
requests; paced under LangSmith's limits (1,000 requests / 10 s for these routes).
"""

from __future__ import annotations

import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from collections.abc import Set as AbstractSet
from datetime import UTC, datetime
from typing import Any

import orjson
from langsmith import Client
from langsmith import utils as ls_utils

from tasks.config import ActionConfig
from tasks.contracts import Action, Outcome, SendContext, error_text
from tasks.sources.langsmith import ATTEMPTS, RateLimiter

FEEDBACK_LIMIT = (2000, 10.0)
OTHER_LIMIT = (1000, 10.0)
FEEDBACK_LANES = 4  # feedback sends at once: their latency overlaps; each still waits for its slot of the pace
BATCH = 100  # actions per dispatch send (the ledger is written after each): feedback, one ingest request
# Queue adds and examples per request: the spec sets no limit and the SDK sends a queue-add list whole (examples
# it splits at 20 MB), so the ledger's granularity is what bounds them.
BULK = 1000
INGEST_PARTS, INGEST_BYTES = 100, 20_971_520  # `BatchIngestConfig` defaults in the spec and the SDK
PART_OVERHEAD = 200  # a part's boundary and headers, bytes
READ_BACK_RUNS = 50  # run ids per feedback read-back request (they go in the query string)
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


def _feedback_body(key: str, record: dict[str, Any], run: Any, run_id: str, feedback_id: str) -> dict[str, Any]:
    """A feedback part as `create_feedback(..., feedback_source_type="model")` would make it."""
    now = datetime.now(UTC).isoformat()
    return {"id": feedback_id, "run_id": run_id, "trace_id": record["trace_id"], "key": key,
            "score": _score(record), "value": record.get("value"), "comment": _describe(record),
            "feedback_source": {"type": "model", "metadata": {}}, "session_id": str(run.session_id),
            "extra": _extra(record), "created_at": now, "modified_at": now}


def _json(body: dict[str, Any]) -> bytes:
    return orjson.dumps(body, default=str, option=orjson.OPT_SERIALIZE_NUMPY)


def _by_size(items: list[int], payloads: Callable[[int], list[bytes]], parts: int,
             size: int) -> Iterator[list[tuple[int, list[bytes]]]]:
    """Consecutive batches of whole items (with their payloads), each at most `parts` payloads and `size` bytes
    (an item larger than that alone is a batch of its own, for the server to refuse)."""
    batch: list[tuple[int, list[bytes]]] = []
    count = length = 0
    for item in items:
        encoded = payloads(item)
        more = sum(len(p) + PART_OVERHEAD for p in encoded)
        if batch and (count + len(encoded) > parts or length + more > size):
            yield batch
            batch, count, length = [], 0, 0
        batch.append((item, encoded))
        count += len(encoded)
        length += more
    if batch:
        yield batch


def _run_key(run: Any) -> dict[str, Any]:
    return {"run_id": str(run.id), "session_id": str(run.session_id), "start_time": _aware(run.start_time)}


def _aware(moment: datetime) -> datetime:
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
        self._limits: tuple[int, int] | None = None
        self._info_lock = threading.Lock()

    def chunk(self, rule: ActionConfig, first: Action, total: int) -> int:
        return batch_limit(rule.do)

    def lanes(self, rule: ActionConfig) -> int:
        """Sends at once: feedback writes are independent (ids are the action ids; the pace is shared); queue adds
        and examples go one send at a time (the first may create the queue or dataset)."""
        return FEEDBACK_LANES if rule.do == "feedback" else 1

    def send(self, rule: ActionConfig, actions: list[Action], context: SendContext) -> list[Outcome]:
        """The `feedback`, `annotation_queue` and `dataset` sinks."""
        if rule.do == "dataset":
            return self.dataset(rule, actions, context.runs())
        write = self.feedback if rule.do == "feedback" else self.annotation_queue
        return write(rule, actions, context.runs(), context.tried_before)

    def feedback(self, rule: ActionConfig, records: list[dict[str, Any]], runs: dict[str, Any],
                 tried_before: AbstractSet[str] = frozenset()) -> list[Outcome]:
        """Feedback on each failing run (and on its culprit span with `on_culprit`), sent as the SDK's own
        background ingest sends it: `feedback.<id>` parts of `POST /runs/multipart` requests, as many parts per
        request as the server's `/info` allows (`batch_ingest_config`: `size_limit` parts, `size_limit_bytes`).

        A request's 202 says its parts were accepted for ingestion; a part the backend rejects later (e.g. its
        run was deleted) is not reported back to anyone, so "sent" means accepted. Feedback ids are the action
        ids, and ingestion keeps one feedback per id, so a batch sent again after a lost answer adds nothing;
        actions `tried_before` are first read back, and feedback that landed is not sent again."""
        bodies: dict[int, list[dict[str, Any]]] = {}
        outcomes: list[Outcome | None] = [None] * len(records)
        for i, record in enumerate(records):
            run = runs.get(record["trace_id"])
            if run is None:
                outcomes[i] = ("failed", MISSING)
                continue
            targets = [(record["run_id"], record["action_id"])]
            if rule.on_culprit and record.get("culprit_run_id"):
                targets.append((record["culprit_run_id"], str(uuid.uuid5(uuid.UUID(record["action_id"]), "culprit"))))
            key = rule.key or record.get("evaluator") or "tracetriage_failure"
            bodies[i] = [_feedback_body(key, record, run, run_id, feedback_id) for run_id, feedback_id in targets]
        try:
            landed = self.landed_feedback([b for i, parts in bodies.items() for b in parts
                                           if records[i]["action_id"] in tried_before])
        except Exception as exc:  # noqa: BLE001 - recorded in the ledger, retried on the next run
            return [o or ("failed", f"reading back feedback: {error_text(exc)}") for o in outcomes]
        unsent = {i: [b for b in parts if b["id"] not in landed] for i, parts in bodies.items()}
        for i in [i for i, parts in unsent.items() if not parts]:
            outcomes[i] = ("sent", {"feedback_ids": [b["id"] for b in bodies[i]]})
        parts_limit, bytes_limit = self.ingest_limits()
        for batch in _by_size([i for i in unsent if unsent[i]], lambda i: [_json(b) for b in unsent[i]],
                              parts_limit, bytes_limit):
            parts = [(b["id"], payload) for i, payloads in batch
                     for b, payload in zip(unsent[i], payloads, strict=True)]
            try:
                with_retries(lambda parts=parts: self._ingest(parts), self.other_pace)
            except Exception as exc:  # noqa: BLE001 - recorded in the ledger, retried on the next run
                for i, _ in batch:
                    outcomes[i] = ("failed", error_text(exc))
                continue
            for i, _ in batch:
                outcomes[i] = ("sent", {"feedback_ids": [b["id"] for b in bodies[i]]})
        return outcomes  # type: ignore[return-value]

    def ingest_limits(self) -> tuple[int, int]:
        """Parts and bytes per multipart ingest request, as the server's `/info` says (the SDK's defaults else):
        asked once, though sends in lanes want it at once."""
        with self._info_lock:
            if self._limits is None:
                config = getattr(self.client.info, "batch_ingest_config", None) or {}
                self._limits = (int(config.get("size_limit") or INGEST_PARTS),
                                int(config.get("size_limit_bytes") or INGEST_BYTES))
            return self._limits

    def _ingest(self, parts: list[tuple[str, bytes]]) -> None:
        boundary = uuid.uuid4().hex
        body = b"".join(
            b"--%s\r\nContent-Disposition: form-data; name=\"feedback.%s\"\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s\r\n" % (boundary.encode(), part_id.encode(), len(payload), payload)
            for part_id, payload in parts) + b"--%s--\r\n" % boundary.encode()
        self.client.request_with_retries(
            "POST", "/runs/multipart", stop_after_attempt=1,
            request_kwargs={"data": body, "headers": {"Content-Type": f"multipart/form-data; boundary={boundary}"}})

    def landed_feedback(self, bodies: list[dict[str, Any]]) -> set[str]:
        """Which of these feedback ids LangSmith holds: read back by run, a page of runs per request."""
        if not bodies:
            return set()
        wanted = {b["id"] for b in bodies}
        run_ids = sorted({b["run_id"] for b in bodies})
        found: set[str] = set()
        for begin in range(0, len(run_ids), READ_BACK_RUNS):
            chunk = run_ids[begin:begin + READ_BACK_RUNS]
            found |= with_retries(lambda chunk=chunk: {str(f.id) for f in self.client.list_feedback(run_ids=chunk)},
                                  self.other_pace)
        return found & wanted

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
            return [("failed", f"annotation queue {rule.queue!r}: {error_text(exc)}")] * len(records)

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
            return [("failed", f"dataset {rule.dataset!r}: {error_text(exc)}")] * len(records)

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


def _batched(records: list[dict[str, Any]], runs: dict[str, Any], send: Callable[[list[dict[str, Any]]], Any],
             detail: Callable[[dict[str, Any]], Any]) -> list[Outcome]:
    """`send` the records BULK at a time; one outcome per record (a run missing from the window fails)."""
    outcomes: list[Outcome] = []
    for begin in range(0, len(records), BULK):
        batch = records[begin:begin + BULK]
        present = [r for r in batch if r["trace_id"] in runs]
        try:
            if present:
                send(present)
        except Exception as exc:  # noqa: BLE001 - recorded in the ledger, retried on the next run
            outcomes += [("failed", error_text(exc))] * len(batch)
            continue
        outcomes += [("sent", detail(r)) if r["trace_id"] in runs else ("failed", MISSING) for r in batch]
    return outcomes


def batch_limit(do: str) -> int:
    """Actions of kind `do` that one send covers."""
    return BULK if do in ("annotation_queue", "dataset") else BATCH


def example_id(record: dict[str, Any]) -> str:
    return str(uuid.uuid5(uuid.UUID(record["action_id"]), "example"))
