"""A window triaged twice ends in the same state as once: same snapshots, no action twice."""

from __future__ import annotations

import json
import shutil
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from flows.loop import feedback_loop
from flows.triage import triage, triage_latest
from tasks.config import ActionConfig, FileSource, LoopConfig, When
from tasks.dispatch.ledger import LEDGER_DIR, read_ledger
from tasks.sources.langsmith import window_range
from tasks.sources.sample import generate_traces, write_sample
from tasks.store import SNAPSHOT_TABLES, SnapshotStore, read_table

CALLS: list[tuple[str, float | None]] = []
FLAKY = {"fail": True}


def record_call(run, score):
    CALLS.append((str(run.id), score))
    return {"ticket": f"T-{str(run.id)[:8]}"}


def flaky_call(run, score):
    if FLAKY["fail"]:
        raise ConnectionError("ticket service unreachable")
    CALLS.append((str(run.id), score))
    return "ok"


@pytest.fixture(scope="module")
def small_sample(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("small") / "runs.jsonl"
    write_sample(path, generate_traces(600, seed=3, hours=2))
    return path


def _snapshots(out: Path) -> dict[str, pd.DataFrame]:
    return {
        name: read_table(out / "snapshots", name).to_pandas()
        .drop(columns=["summary_json"], errors="ignore")
        .sort_values(list(SNAPSHOT_TABLES[name].names[:3]))
        .reset_index(drop=True)
        for name in SNAPSHOT_TABLES
    }


def test_a_second_run_leaves_snapshots_equal_row_for_row_and_the_action_log_unchanged(small_sample, tmp_path):
    config = LoopConfig(source=FileSource(path=str(small_sample)))
    first = triage(config=config, out=str(tmp_path))
    log_after_first = (tmp_path / "actions.jsonl").read_bytes()
    tables_after_first = _snapshots(tmp_path)

    second = triage(config=config, out=str(tmp_path))

    assert (tmp_path / "actions.jsonl").read_bytes() == log_after_first
    for name, table in _snapshots(tmp_path).items():
        pd.testing.assert_frame_equal(table, tables_after_first[name], obj=name)
    for before, after in zip(first["windows"], second["windows"], strict=True):
        assert after["actions"] == {"planned": before["actions"]["planned"], "sent": 0, "failures": {},
                                    "skipped_duplicate": before["actions"]["planned"], "failed": 0, "not_sampled": 0,
                                    "over_cap": 0}
        assert before["actions"]["sent"] == before["actions"]["planned"] > 0


def test_a_rerun_with_the_cache_deleted_still_sends_nothing_twice(small_sample, tmp_path):
    config = LoopConfig(source=FileSource(path=str(small_sample)))
    triage(config=config, out=str(tmp_path))
    lines = (tmp_path / "actions.jsonl").read_text().splitlines()
    shutil.rmtree(tmp_path / "work")

    again = triage(config=config, out=str(tmp_path))

    assert (tmp_path / "actions.jsonl").read_text().splitlines() == lines
    assert all(w["actions"]["sent"] == 0 for w in again["windows"])


def test_an_action_whose_ledger_entry_was_lost_is_not_logged_twice(small_sample, tmp_path):
    """A crash after the effect but before `sent` reached the ledger: the action log's id check absorbs it."""
    config = LoopConfig(source=FileSource(path=str(small_sample)))
    triage(config=config, out=str(tmp_path))
    lines = (tmp_path / "actions.jsonl").read_text().splitlines()
    for segment in (tmp_path / "snapshots" / LEDGER_DIR).rglob("*.jsonl"):
        segment.write_text("".join(line + "\n" for line in segment.read_text().splitlines() if '"sent"' not in line))

    again = triage(config=config, out=str(tmp_path))

    assert (tmp_path / "actions.jsonl").read_text().splitlines() == lines
    assert sum(w["actions"]["sent"] for w in again["windows"]) == len(lines)  # confirmed, not re-logged


def test_a_call_action_gets_the_root_run_and_score_once_per_failing_run(small_sample, tmp_path):
    CALLS.clear()
    config = LoopConfig(
        source=FileSource(path=str(small_sample)),
        actions=[ActionConfig(when=When(evaluator="answer_grounded", below=0.5), do="call",
                              ref="tests.test_rerun:record_call")],
    )
    result = triage(config=config, out=str(tmp_path))
    calls = list(CALLS)
    triage(config=config, out=str(tmp_path))

    assert CALLS == calls  # the rerun called nothing
    planned = sum(w["actions"]["planned"] for w in result["windows"])
    assert len(calls) == planned == sum(w["evaluators"]["answer_grounded"]["fail"] for w in result["windows"])
    assert all(score is not None and score < 0.5 for _, score in calls)
    responses = [e for e in _ledger_rows(tmp_path) if e["state"] == "sent"]
    assert {r["response"]["ticket"][:2] for r in responses} == {"T-"}


def test_a_failed_action_is_reported_and_retried_on_the_next_run(small_sample, tmp_path):
    CALLS.clear()
    FLAKY["fail"] = True
    config = LoopConfig(
        source=FileSource(path=str(small_sample)),
        actions=[ActionConfig(when=When(failing=True), do="call", ref="tests.test_rerun:flaky_call")],
    )
    first = triage(config=config, out=str(tmp_path))
    failed = sum(w["actions"]["failed"] for w in first["windows"])
    assert failed == sum(w["failing_traces"] for w in first["windows"]) > 0
    assert CALLS == []

    FLAKY["fail"] = False
    second = triage(config=config, out=str(tmp_path))

    assert sum(w["actions"]["sent"] for w in second["windows"]) == failed
    assert len(CALLS) == len(set(CALLS)) == failed
    states = {row["action_id"]: row["state"] for row in _ledger_rows(tmp_path)}
    assert set(states.values()) == {"sent"}


def test_feedback_loop_is_the_python_form_of_the_loop(small_sample, tmp_path):
    seen = []

    def correct(outputs: dict) -> float:
        return float(bool(outputs) and "answer" in outputs)

    result = feedback_loop(
        "support-bot", source=str(small_sample), evaluator=correct, threshold=0.7,
        on_failure=lambda run, score: seen.append((run.name, score)) or {"queued": True}, out=str(tmp_path),
    )
    failing = sum(w["failing_traces"] for w in result["windows"])
    assert failing == len(seen) > 0  # the tool-error traces have no outputs
    assert {name for name, _ in seen} == {"rag_agent"} and {score for _, score in seen} == {0.0}
    again = feedback_loop("support-bot", source=str(small_sample), evaluator=correct, threshold=0.7,
                          on_failure=lambda run, score: seen.append(run.name), out=str(tmp_path))
    assert len(seen) == failing and all(w["actions"]["sent"] == 0 for w in again["windows"])


def test_feedback_loop_without_a_source_says_what_to_pass():
    with pytest.raises(ValueError, match="project_name=.*experiment=.*source="):
        feedback_loop(evaluator=lambda outputs: 1.0)


def _ledger_rows(out: Path, loop: str = "tracetriage") -> list[dict]:
    return read_ledger(SnapshotStore(str(out / "snapshots")), loop)


def test_a_root_cause_rule_acts_on_exactly_the_traces_whose_culprit_it_names(small_sample, tmp_path):
    config = LoopConfig(source=FileSource(path=str(small_sample)), eval_workers=1, actions=[
        ActionConfig(when=When(root_cause={"span": "lookup_order", "reason": "error"}), do="log", name="tool-errors")])
    result = triage(config=config, out=str(tmp_path))
    logged = {json.loads(line)["trace_id"] for line in (tmp_path / "actions.jsonl").read_text().splitlines()}
    culprits = read_table(tmp_path / "snapshots", "attribution").to_pandas()
    culprits = culprits[culprits["is_culprit"] & (culprits["span_name"] == "lookup_order")
                        & (culprits["reason"] == "error")]
    assert logged == set(culprits["trace_id"]) and logged
    expected = sum(c["traces"] for w in result["windows"] for c in w["root_causes"]
                   if (c["span_name"], c["reason"]) == ("lookup_order", "error"))
    assert len(logged) == expected


def test_the_scheduled_run_tries_again_the_failed_actions_of_earlier_windows(tmp_path):
    """The hourly run triages the last closed window, and first the windows of the last day with actions not
    sent: a failure is tried again by the schedule, not only by a manual rerun of its window."""
    size, lag = timedelta(hours=1), timedelta(minutes=10)
    if (datetime.now(UTC) - lag).timestamp() % 3600 > 3540:  # the latest window is about to change: let it
        time.sleep(61)
    latest, _ = window_range(None, None, size, lag)
    source = tmp_path / "runs.jsonl"
    write_sample(source, generate_traces(300, seed=5, start=latest - size, hours=2))
    config = LoopConfig(source=FileSource(path=str(source)), eval_workers=1,
                        actions=[ActionConfig(when=When(failing=True), do="call", ref="tests.test_rerun:flaky_call")])
    CALLS.clear()
    FLAKY["fail"] = True
    (earlier,) = triage(config=config, start=latest - size, end=latest, out=str(tmp_path))["windows"]
    assert earlier["actions"]["failed"] == earlier["failing_traces"] > 0

    FLAKY["fail"] = False
    result = triage_latest(config=config, out=str(tmp_path))

    (retried,) = result["retried"]
    assert retried["window_start"] == earlier["window_start"]
    assert retried["actions"]["sent"] == earlier["failing_traces"]
    (window,) = result["windows"]
    assert window["window_start"] == latest.isoformat()
    assert len(CALLS) == len(set(CALLS)) == earlier["failing_traces"] + window["failing_traces"]
    again = triage_latest(config=config, out=str(tmp_path))
    assert again["retried"] == [] and again["windows"][0]["actions"]["sent"] == 0
