"""Follow-ups: what a `call` action (a user's function, e.g. #2907's `on_failure`) asked for, as actions.

A call may return one action or a list, in the form of langsmith-sdk #2907
(`{"action": "add_to_annotation_queue", "queue_name": ..., "metadata": {...}}`), as an
action spec (`{"do": ...}`), or `{"then": [...]}`. Each becomes a planned action whose id
derives from the call's, so a rerun plans the same ones; an invalid one fails with the
reason, never the window.
"""

from __future__ import annotations

import inspect
import uuid
from typing import Any

import orjson
from langsmith.schemas import RunBase
from pydantic import BaseModel, ValidationError

from tasks.config import ActionConfig, When
from tasks.contracts import Action, Outcome, SendContext, error_text
from tasks.evaluation.evaluators import import_ref

FOLLOW_UPS = ("log", "feedback", "annotation_queue", "dataset", "webhook", "slack", "prefect_event")


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


def context_comment(record: Action, when: When) -> str:
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


def follow_ups(parent: Action, rule: ActionConfig, then: list[Any],
               specs: dict[str, ActionConfig]) -> tuple[list[Action], dict[str, ActionConfig | None]]:
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

    def add(record: Action, fields: dict[str, Any]) -> None:
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
            record["do"], record["invalid"] = "invalid", error_text(exc)
            planned.append(record)
    return planned, rules



def call_action(ref: str, record: Action, run: Any) -> Any:
    fn = import_ref(ref, what="action function")
    params = inspect.signature(fn).parameters
    extras = {k: v for k, v in (("action_id", record["action_id"]), ("record", record)) if k in params}
    return fn(run, record.get("score"), **extras)



def then_of(response: Any) -> dict[str, Any]:
    """A call's request for further actions, kept in its ledger entry."""
    requested = requested_actions(response)
    return {"then": [json_safe(spec) for spec in requested]} if requested else {}


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


def json_safe(value: Any) -> Any:
    """`value` as JSON data for the ledger (UUIDs, datetimes, runs included); what orjson cannot write (int keys,
    huge ints) as its text, so a call that did its work is never recorded as failed because of what it
    returned."""
    try:
        return orjson.loads(orjson.dumps(value, default=_plain,
                                         option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY))
    except (TypeError, orjson.JSONEncodeError):
        return {"repr": repr(value)[:1000]}


class Calls:
    """The `call` sink: the user's function, one action at a time, given the run (with its `child_runs`) and the
    score; what it returns is kept in the ledger, and the actions it asks for follow (see `follow_ups`)."""

    def chunk(self, rule: ActionConfig, first: Action, total: int) -> int:
        return 1

    def send(self, rule: ActionConfig, actions: list[Action], context: SendContext) -> list[Outcome]:
        (action,) = actions
        try:
            returned = call_action(rule.ref, action, context.runs().get(action["trace_id"]))
        except Exception as exc:  # noqa: BLE001 - the user's function: recorded, tried again next run
            return [("failed", error_text(exc))]
        return [("sent", json_safe(returned))]


class Invalid:
    """Where a follow-up that could not be understood goes: it fails with the reason, never the window."""

    def chunk(self, rule: None, first: Action, total: int) -> int:
        return total

    def send(self, rule: None, actions: list[Action], context: SendContext) -> list[Outcome]:
        return [("failed", a["invalid"]) for a in actions]
