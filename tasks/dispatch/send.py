"""Dispatch: a window's planned actions carried out exactly once, through a table of sinks.

The ledger (`tasks.dispatch.ledger`) gets every `planned` entry before any effect and each send's
outcome right after that send. Receivers get the action id (or, for a send of many, a key
derived from their ids) as an idempotency key, so a crash between a send and its ledger
entry is absorbed by the receiver: the action log and LangSmith ignore an id they hold,
webhook receivers see the same `Idempotency-Key`. The plan is in `tasks.dispatch.plan`, what calls
ask for in `tasks.dispatch.follow_ups`, the sinks in `tasks.sinks.connections.sinks`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import replace
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from tasks.config import ActionConfig, LoopConfig, source_identity
from tasks.contracts import Action, DispatchCounts, Outcome, SendContext, Sink, WindowSummary, WindowTriage, error_text
from tasks.dispatch.episodes import episode_history
from tasks.dispatch.follow_ups import follow_ups, then_of
from tasks.dispatch.lease import DispatchLease
from tasks.dispatch.ledger import ActionLog, Ledger
from tasks.dispatch.plan import Plan, planned_actions
from tasks.evaluation.run_tree import grown
from tasks.evaluation.scoring import RunRows, records_path
from tasks.progress import report
from tasks.sinks.connections import flow_run_link, sinks_for
from tasks.sources.records import RecordFile
from tasks.store import SnapshotStore, not_disk_full


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


def _whole_sends(actions: list[Action], todo: set[str], rules: dict[str, ActionConfig],
                 sinks: dict[str, Sink]) -> list[Action]:
    """With a damaged ledger, the actions to send again: every send (a webhook batch, a Slack message) that holds an
    action not known to be sent goes again whole, as the first run made it from the full plan, so the receiver gets
    the idempotency key it saw then, never a new one for a new mix of actions."""
    chosen: list[Action] = []
    by_action: dict[str, list[Action]] = {}
    for p in actions:
        by_action.setdefault(p["action"], []).append(p)
    for name, group in by_action.items():
        rule = rules.get(name)
        size = sinks[rule.do if rule else "invalid"].chunk(rule, group[0], len(group))
        for begin in range(0, len(group), size):
            send = group[begin:begin + size]
            if any(p["action_id"] in todo for p in send):
                chosen += send
    return chosen


def dispatch_actions(config: LoopConfig, plan: Plan, ledger: Ledger, sinks: dict[str, Sink],
                     context: SendContext, window_spans_path: str) -> DispatchCounts:
    """Carry out planned actions not yet sent; returns the counts.

    The ledger gets every `planned` entry in one durable write before any effect, and each send's outcome right
    after that send: a crash between two sends leaves the later ones `planned`, which the next run carries out
    (receivers see the same idempotency keys). What a `call` asks for is kept in its `sent` entry, so a rerun
    finds the follow-ups of calls it does not make again. A send that raises fails its actions with the reason.
    """
    counts = DispatchCounts(planned=len(plan.actions), not_sampled=plan.not_sampled, over_cap=plan.over_cap)
    rules = {config.action_name(i): rule for i, rule in enumerate(config.actions)}
    todo = [p for p in plan.actions if ledger.state(p["action_id"]) != "sent"]
    counts.skipped_duplicate = len(plan.actions) - len(todo)
    # Planned or failed in an earlier run: the effect may have happened (what has no idempotency key checks).
    tried_before = {p["action_id"] for p in todo if ledger.state(p["action_id"]) is not None}
    if ledger.damaged:
        counts.ledger_damaged = ledger.damaged
        todo = _whole_sends(plan.actions, {p["action_id"] for p in todo}, rules, sinks)
        tried_before |= {p["action_id"] for p in todo}  # any of them may have been done
    ledger.record_many([{"action_id": p["action_id"], "action": p["action"], "trace_id": p["trace_id"]}
                        for p in todo], "planned")
    loaded: list[dict[str, Any]] = []
    loading = threading.Lock()  # sends in lanes ask at once

    def runs() -> dict[str, Any]:
        """The root runs of the window's actions and examples, read once, when a send first needs them."""
        with loading:
            if not loaded:
                trace_ids = {p["trace_id"] for p in plan.actions if p["trace_id"]}
                if context.summary is not None:
                    trace_ids |= {t for r in context.summary.root_causes for t in r["example_trace_ids"]}
                loaded.append(root_runs(window_spans_path, trace_ids,
                                        with_children=any(rule.do == "call" for rule in config.actions)))
        return loaded[0]

    context = replace(context, runs=runs, tried_before=tried_before)
    stage = f"dispatch {plan.actions[0]['window_start'][:16]}" if plan.actions else "dispatch"
    done, total = [0], [len(todo)]

    def carry_out(actions: list[Action], rule_of: Callable[[Action], ActionConfig | None]) -> None:
        groups: dict[tuple[str, int], list[Action]] = {}
        for a in actions:  # one group per action and rule: follow-ups of one name can have different specs
            groups.setdefault((a["action"], id(rule_of(a))), []).append(a)
        for (name, _), group in groups.items():
            rule = rule_of(group[0])
            sink = sinks[rule.do if rule else "invalid"]
            size = sink.chunk(rule, group[0], len(group))
            chunks = [group[begin:begin + size] for begin in range(0, len(group), size)]

            def send(chunk: list[Action], sink: Sink = sink, rule: ActionConfig | None = rule) -> list[Outcome]:
                try:
                    return sink.send(rule, chunk, context)
                except Exception as exc:  # noqa: BLE001 - a sink that broke: recorded, tried again next run
                    return [("failed", error_text(exc))] * len(chunk)

            # Sends of a sink that takes several at once (LangSmith feedback) overlap; each one's outcome still
            # goes in the ledger as soon as that send is done, here, in this thread.
            for chunk, outcomes in in_lanes(send, chunks, getattr(sink, "lanes", _one_lane)(rule)):
                record_outcomes(ledger, counts, name, rule, chunk, outcomes)
                done[0] += len(chunk)
                report(stage, done[0], total[0])

    carry_out(todo, lambda a: rules.get(a["action"]))

    extra_rules: dict[str, ActionConfig | None] = {}
    extra: list[Action] = []
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
    carry_out(extra_todo, lambda a: extra_rules[a["action_id"]])
    ledger.compact()
    return counts


def _one_lane(rule: ActionConfig | None) -> int:
    return 1


def in_lanes(send: Callable[[list[Action]], list[Outcome]], chunks: list[list[Action]],
             lanes: int) -> Iterator[tuple[list[Action], list[Outcome]]]:
    """(chunk, its outcomes) for each chunk as its send ends: with `lanes` > 1, that many sends at once."""
    if lanes <= 1 or len(chunks) <= 1:
        for chunk in chunks:
            yield chunk, send(chunk)
        return
    with ThreadPoolExecutor(min(lanes, len(chunks)), thread_name_prefix="dispatch") as pool:
        futures = {pool.submit(send, chunk): chunk for chunk in chunks}
        for future in as_completed(futures):
            yield futures[future], future.result()


def record_outcomes(ledger: Ledger, counts: DispatchCounts, name: str, rule: ActionConfig | None,
                    actions: list[Action], outcomes: list[Outcome]) -> None:
    """One send's outcomes in the ledger (what a call asked for kept in its `sent` entry) and in the counts."""
    sent = [(a, detail) for a, (got, detail) in zip(actions, outcomes, strict=True) if got == "sent"]
    failed = [(a, detail) for a, (got, detail) in zip(actions, outcomes, strict=True) if got != "sent"]
    ledger.record_many([{"action_id": a["action_id"], "action": name, "response": detail,
                         **(then_of(detail) if rule and rule.do == "call" else {})} for a, detail in sent], "sent")
    ledger.record_many([{"action_id": a["action_id"], "action": name, "error": detail} for a, detail in failed],
                       "failed")
    counts.sent += len(sent)
    if failed:
        counts.add_failed(name, failed[0][1], len(failed))


# The planned actions are made inside the task: Prefect walks list and dict parameters
# looking for futures, which takes seconds for tens of thousands of action dicts.
@task(name="dispatch", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=2),
      retry_condition_fn=not_disk_full)
def dispatch_task(*, config: LoopConfig, triage: WindowTriage, spike: dict[str, Any] | None, store: SnapshotStore,
                  summary: WindowSummary, action_log_path: str) -> DispatchCounts:
    """The window's actions, planned and carried out under the loop's dispatch lease (one dispatch per loop)."""
    with DispatchLease(store, config.name) as lease:  # the ledger and the episode history are read under it
        ledger = Ledger(store, config.name, triage.window_start, lease)
        verdicts = triage.verdicts
        plan = planned_actions(config, triage.window_start, verdicts.scores, verdicts.traces, triage.attribution,
                               spike, triage.modes.patterns, episode_history(store, config, triage.window_start),
                               set(ledger.last))
        context = SendContext(loop=config.name, source=source_identity(config.source), summary=summary,
                              flow_run_url=flow_run_link())
        return dispatch_actions(config, plan, ledger, sinks_for(config, ActionLog(action_log_path)), context,
                                triage.scored.window.path)
