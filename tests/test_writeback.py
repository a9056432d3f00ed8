"""Feedback write-back at LangSmith's request floor: multipart ingest batches, each sent exactly once in effect.

The real `langsmith` SDK client talks HTTP to `tests/langsmith_server.py`, which validates every part against
the official spec."""

from __future__ import annotations

import math
import uuid
from datetime import datetime
from types import SimpleNamespace

import langsmith
import pytest

from tasks.config import ActionConfig, When
from tasks.sinks.langsmith import LangSmithWriter
from tasks.sources.sample import generate_traces
from tests.langsmith_server import LangSmithTestServer

KEY = "ls-writeback-key"
RULE = ActionConfig(when=When(failing=True), do="feedback", on_culprit=True, name="feedback")


@pytest.fixture
def server():
    with LangSmithTestServer(api_key=KEY) as server:
        yield server


def failing(server: LangSmithTestServer, traces: int) -> tuple[list[dict], dict]:
    """One feedback action per trace of a fresh project (culprit: the trace's last span), and its root runs."""
    records = generate_traces(traces, seed=2, hours=1).records
    project_id = server.add_project("writeback", records)
    roots = {r["trace_id"]: r for r in records if r["parent_run_id"] is None}
    last_span = {r["trace_id"]: r["id"] for r in records if r["parent_run_id"] is not None}
    actions = [{"action_id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"feedback/{t}")), "trace_id": t, "run_id": t,
                "evaluator": "answer_grounded", "score": 0.2, "culprit_run_id": last_span[t],
                "culprit_span": "answer_llm", "culprit_reason": "below_threshold", "loop": "wb",
                "window_start": "2026-11-02T09:00:00+00:00", "action": "feedback"} for t in roots]
    runs = {t: SimpleNamespace(id=t, session_id=project_id, start_time=datetime.fromisoformat(r["start_time"]),
                               inputs=r["inputs"], outputs=r["outputs"]) for t, r in roots.items()}
    return actions, runs


def writer(server: LangSmithTestServer) -> LangSmithWriter:
    return LangSmithWriter(langsmith.Client(api_url=server.url, api_key=KEY, auto_batch_tracing=False))


def test_feedback_goes_as_multipart_ingest_batches_at_the_request_floor(server):
    actions, runs = failing(server, 230)
    outcomes = writer(server).feedback(RULE, actions, runs)
    assert {state for state, _ in outcomes} == {"sent"}
    parts = 2 * len(actions)  # each failing run and its culprit span
    assert len({f["id"] for f in server.feedback}) == len(server.feedback) == parts
    assert {(f["run_id"], f["trace_id"]) for f in server.feedback} >= {(a["run_id"], a["trace_id"]) for a in actions}
    assert server.counts()["runs_multipart"] == math.ceil(parts / 100) and max(server.ingest_parts) <= 100
    assert server.counts()["feedback_create"] == 0 and server.violations == []


def test_a_batch_sent_again_after_its_answer_was_lost_doubles_nothing(server):
    actions, runs = failing(server, 120)
    server.lose_answers["runs_multipart"] = 1  # the first batch lands, its 202 never arrives
    outcomes = writer(server).feedback(RULE, actions, runs)
    assert {state for state, _ in outcomes} == {"sent"}
    assert server.counts()["runs_multipart"] == math.ceil(240 / 100) + 1  # that batch once more
    assert len(server.feedback) == len({f["id"] for f in server.feedback}) == 240
    assert server.violations == []


def test_a_rerun_reads_back_what_landed_and_sends_only_the_rest(server):
    actions, runs = failing(server, 60)
    first = writer(server).feedback(RULE, actions[:40], runs)
    assert {state for state, _ in first} == {"sent"}
    server.reset_log()
    # The ledger says all 60 were tried (a crash after the first 40 were sent, before their outcome was kept).
    again = writer(server).feedback(RULE, actions, runs, tried_before={a["action_id"] for a in actions})
    assert [state for state, _ in again] == ["sent"] * 60
    assert server.ingest_parts == [40]  # only the 20 runs (and their culprit spans) not there yet
    assert len(server.feedback) == 120 and server.counts()["feedback_list"] >= 1 and server.violations == []


def test_a_run_missing_from_the_window_fails_alone(server):
    actions, runs = failing(server, 5)
    del runs[actions[2]["trace_id"]]
    outcomes = writer(server).feedback(RULE, actions, runs)
    assert [state for state, _ in outcomes] == ["sent", "sent", "failed", "sent", "sent"]
    assert len(server.feedback) == 8


def test_queue_adds_and_examples_go_in_one_request_per_thousand(server):
    actions, runs = failing(server, 230)
    queue = ActionConfig(when=When(failing=True), do="annotation_queue", queue="review", name="queue")
    dataset = ActionConfig(when=When(failing=True), do="dataset", dataset="hard-cases", name="dataset")
    sink = writer(server)
    assert {state for state, _ in sink.annotation_queue(queue, actions, runs)} == {"sent"}
    assert {state for state, _ in sink.dataset(dataset, actions, runs)} == {"sent"}
    writes = server.counts()
    assert writes["queue_add_runs_by_key"] == 1 and len(server.queue_adds) == 230
    assert writes["examples_bulk"] + writes["examples_multipart"] == 1 and len(server.examples) == 230
    assert server.violations == []
