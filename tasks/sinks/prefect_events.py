"""Prefect events: what Automations trigger on. The `prefect_event` sink (one event per action), and the
resource every window's events name."""

from __future__ import annotations

import uuid

from prefect.events import emit_event

from tasks.config import ActionConfig
from tasks.contracts import Action, Outcome, SendContext
from tasks.dispatch.follow_ups import json_safe

BATCH = 100  # events per dispatch send (the ledger is written after each)


def window_resource(loop: str, window_start: str) -> dict[str, str]:
    """The Prefect event resource of a loop's window."""
    return {"prefect.resource.id": f"tracetriage.window.{loop}.{window_start}",
            "prefect.resource.name": f"{loop} {window_start}", "tracetriage.loop": loop,
            "tracetriage.window_start": window_start}


class PrefectEvents:
    """The `prefect_event` sink."""

    def chunk(self, rule: ActionConfig, first: Action, total: int) -> int:
        return BATCH

    def send(self, rule: ActionConfig, actions: list[Action], context: SendContext) -> list[Outcome]:
        return [self.emit(rule, action, context.source) for action in actions]

    @staticmethod
    def emit(rule: ActionConfig, record: Action, source: str) -> Outcome:
        """The event's id derives from the action id and the source's identity: a rerun emits the same id (Prefect
        keeps it once), and two sources under one loop name, whose window actions share an id, do not collide."""
        window = window_resource(record["loop"], record["window_start"])
        related = [{"prefect.resource.id": window["prefect.resource.id"], "prefect.resource.role": "window"}]
        if record.get("evaluator"):
            related.append({"prefect.resource.id": f"tracetriage.evaluator.{record['evaluator']}",
                            "prefect.resource.role": "evaluator"})
        if record.get("culprit_span"):
            related.append({"prefect.resource.id": f"tracetriage.span.{record['culprit_span']}",
                            "prefect.resource.role": "span"})
        resource = window if record["trace_id"] is None else {
            "prefect.resource.id": f"tracetriage.run.{record['trace_id']}", "tracetriage.loop": record["loop"],
            "tracetriage.window_start": record["window_start"]}
        event_id = uuid.uuid5(uuid.UUID(record["action_id"]), f"source/{source}")
        emitted = emit_event(event=rule.event or f"tracetriage.action.{record['action']}", resource=resource,
                             related=related, payload=json_safe(record), id=event_id)
        return ("sent", {"event_id": str(event_id)}) if emitted else ("failed", "no Prefect API to emit events to")
