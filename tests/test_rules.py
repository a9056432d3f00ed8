"""Action rules: span conditions, failure-mode bounds, sampling and caps, Prefect events, and `call` follow-ups."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest
from pydantic import ValidationError

from flows.triage import triage
from tasks.config import ActionConfig, FileSource, LoopConfig, When
from tasks.dispatch.ledger import read_ledger
from tasks.dispatch.plan import action_id, planned_actions
from tasks.sources.sample import SAMPLE_START, generate_traces, write_sample
from tasks.store import SnapshotStore, read_table
from tests.prefect_api import read_events


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rules") / "runs.jsonl"
    write_sample(path, generate_traces(600, seed=3, hours=2))
    return path


def run(sample: Path, out: Path, *actions: ActionConfig, name: str = "rules") -> dict:
    config = LoopConfig(name=name, source=FileSource(path=str(sample)), eval_workers=1, actions=list(actions))
    return triage(config=config, out=str(out))


def logged(out: Path, action: str | None = None) -> list[dict]:
    rows = [json.loads(line) for line in (out / "actions.jsonl").read_text().splitlines()]
    return [r for r in rows if action is None or r["action"] == action]


def test_a_span_condition_matches_traces_whose_named_span_scored_below_the_bound(sample, tmp_path):
    run(sample, tmp_path, ActionConfig(when=When(evaluator="retrieval_relevance", span="search_docs", below=0.2),
                                       do="log", name="bad-retrieval"))
    scores = read_table(tmp_path / "snapshots", "scores").to_pandas()
    low = scores[(scores["evaluator"] == "retrieval_relevance") & (scores["span_name"] == "search_docs")
                 & (scores["score"] < 0.2)]
    rows = logged(tmp_path, "bad-retrieval")
    assert {r["trace_id"] for r in rows} == set(low["trace_id"]) and rows
    assert all(r["score"] < 0.2 for r in rows)


def test_a_span_condition_on_a_root_evaluator_is_refused():
    with pytest.raises(ValidationError, match="answer_grounded' scores root runs"):
        LoopConfig(actions=[ActionConfig(when=When(evaluator="answer_grounded", span="search_docs", below=0.5),
                                         do="log")])


def test_a_failure_mode_over_its_bound_acts_once_per_window(sample, tmp_path):
    result = run(sample, tmp_path, ActionConfig(when=When(pattern={"span": "lookup_order", "share_above": 0.1}),
                                                do="log", name="tool-mode"))
    patterns = read_table(tmp_path / "snapshots", "patterns").to_pandas()
    over = patterns[(patterns["span_name"] == "lookup_order") & (patterns["fail_share"] > 0.1)]
    rows = logged(tmp_path, "tool-mode")
    assert sorted((r["window_start"], r["pattern"]["condition"]) for r in rows) == sorted(
        (t.isoformat(), c) for t, c in zip(over["window_start"], over["condition"], strict=True))
    assert rows and all(r["event"] == "pattern" and r["trace_id"] is None for r in rows)
    assert sum(w["actions"]["sent"] for w in result["windows"]) == len(rows)


def test_a_sample_chooses_the_same_traces_on_every_run_and_a_cap_bounds_each_window(sample, tmp_path):
    half = ActionConfig(when=When(failing=True), do="log", name="half", sample=0.5)
    capped = ActionConfig(when=When(failing=True), do="log", name="capped", max_per_window=5)
    result = run(sample, tmp_path, half, capped)
    failing = [w["failing_traces"] for w in result["windows"]]
    chosen = {r["trace_id"] for r in logged(tmp_path, "half")}
    assert 0.35 * sum(failing) < len(chosen) < 0.65 * sum(failing)
    assert [w["actions"]["over_cap"] for w in result["windows"]] == [f - 5 for f in failing]
    assert sum(w["actions"]["not_sampled"] for w in result["windows"]) == sum(failing) - len(chosen)
    assert len(logged(tmp_path, "capped")) == 5 * len(failing)

    other = tmp_path / "again"
    run(sample, other, half, capped)
    assert {r["trace_id"] for r in logged(other, "half")} == chosen


def test_a_prefect_event_action_emits_one_event_per_matched_trace_with_the_action_id(sample, tmp_path):
    result = run(sample, tmp_path, ActionConfig(when=When(root_cause={"span": "lookup_order"}), do="prefect_event",
                                                event="support.tool_failure", name="tool-events"), name="evented")
    sent = [r for r in read_ledger(SnapshotStore(str(tmp_path / "snapshots")), "evented") if r["state"] == "sent"]
    assert len(sent) == sum(w["actions"]["sent"] for w in result["windows"]) > 0

    def events() -> list[dict]:
        return read_events(event={"name": ["support.tool_failure"]}, resource={"id_prefix": ["tracetriage.run."]})

    deadline = time.monotonic() + 20
    while len(events()) < len(sent) and time.monotonic() < deadline:
        time.sleep(0.5)  # the server writes events in the background
    found = events()
    assert {e["id"] for e in found} == {r["response"]["event_id"] for r in sent}  # derived from the action ids
    assert all(e["payload"]["culprit_span"] == "lookup_order" for e in found)
    assert all({"window", "span"} <= {r["prefect.resource.role"] for r in e["related"]} for e in found)


CALLED: list[str] = []


def open_ticket(run, score, record):
    """A user's on-call hook: always a log follow-up; then, for tool errors, something invalid, else a log."""
    CALLED.append(record["action_id"])
    then = [{"do": "log", "name": "ignored: the follow-up's name derives from its parent"}]
    then.append({"do": "teleport"} if record["culprit_reason"] == "error" else {"do": "log"})
    return {"ticket": f"T-{str(run.id)[:6]}", "then": then, 7: "an int key"}


def test_what_a_call_returns_can_request_further_actions_done_once(sample, tmp_path):
    CALLED.clear()
    rule = ActionConfig(when=When(failing=True), do="call", ref="tests.test_rules:open_ticket",
                        name="oncall")
    first = run(sample, tmp_path, rule)
    calls = len(CALLED)
    follow_ups = logged(tmp_path, "oncall.then-0")
    assert calls and len(follow_ups) == calls  # one log follow-up per call
    assert {r["follow_up_of"] for r in follow_ups} == set(CALLED)
    invalid = [w["actions"]["failures"]["oncall.then-1"] for w in first["windows"]]
    assert all("teleport" in f["error"] for f in invalid)
    assert sum(f["count"] for f in invalid) == sum(w["actions"]["failed"] for w in first["windows"])
    # The second follow-up has two specs across calls: each call's own is done (no spec borrowed from another).
    valid_second = logged(tmp_path, "oncall.then-1")
    assert len(valid_second) == calls - sum(f["count"] for f in invalid) > 0
    assert all(r["culprit_reason"] != "error" for r in valid_second)

    again = run(sample, tmp_path, rule)
    assert len(CALLED) == calls and len(logged(tmp_path, "oncall.then-0")) == calls
    assert sum(w["actions"]["sent"] for w in again["windows"]) == 0
    assert sum(w["actions"]["failed"] for w in again["windows"]) == sum(f["count"] for f in invalid)


def test_under_a_cap_the_actions_already_in_the_ledger_come_first():
    """A rerun whose matches changed (an open window, a new evaluator version) stays within the cap."""
    config = LoopConfig(name="capped", actions=[ActionConfig(when=When(failing=True), do="log", name="few",
                                                             max_per_window=3)])
    traces = [f"trace-{i}" for i in range(10)]
    verdicts = pd.DataFrame({"trace_id": traces, "verdict": "fail"})
    attribution = pd.DataFrame({"trace_id": [], "run_id": [], "span_name": [], "reason": [], "is_culprit": []})
    attribution["is_culprit"] = attribution["is_culprit"].astype(bool)
    scores = pd.DataFrame({"trace_id": [], "evaluator": [], "score": [], "span_name": []})
    first = planned_actions(config, SAMPLE_START, scores, verdicts, attribution)
    assert [a["trace_id"] for a in first.actions] == traces[:3] and first.over_cap == 7
    known = {action_id("capped", SAMPLE_START, t, "few") for t in traces[7:9]}
    again = planned_actions(config, SAMPLE_START, scores, verdicts, attribution, known=known)
    assert [a["trace_id"] for a in again.actions] == ["trace-7", "trace-8", "trace-0"]
