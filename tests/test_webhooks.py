"""Signed webhooks: a local receiver checks every signature, as the README shows a receiver doing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.triage import triage
from tasks.config import ActionConfig, FileSource, LoopConfig, When
from tasks.sources.sample import generate_traces, write_sample
from tests.webhook_receiver import SECRET, Receiver


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("webhooks") / "runs.jsonl"
    write_sample(path, generate_traces(300, seed=61, hours=1))
    return path


def loop(sample: Path, url: str) -> LoopConfig:
    return LoopConfig(source=FileSource(path=str(sample)), eval_workers=1, actions=[
        ActionConfig(when=When(failing=True), do="webhook", url=url, secret_env="TRIAGE_WEBHOOK_SECRET", batch=40,
                     name="oncall-hook")])


def test_failing_runs_reach_the_receiver_signed_once_each_across_a_retry_and_a_rerun(sample, tmp_path, monkeypatch):
    monkeypatch.setenv("TRIAGE_WEBHOOK_SECRET", SECRET)
    with Receiver(statuses=[503]) as receiver:
        result = triage(config=loop(sample, receiver.url), out=str(tmp_path))
        failing = result["windows"][0]["failing_traces"]
        first, retried = receiver.requests[0], receiver.requests[1]
        assert first["status"] == 503 and retried["key"] == first["key"] and retried["body"] == first["body"]
        assert all(r["signed"] for r in receiver.requests)
        assert len(receiver.delivered()) == len(set(receiver.delivered())) == failing
        assert max(len(r["body"]["runs"]) for r in receiver.requests) == 40
        run = receiver.requests[0]["body"]["runs"][0]
        assert {"action_id", "trace_id", "score", "culprit_span", "culprit_reason"} <= set(run)
        assert receiver.requests[0]["body"]["version"] == 1

        requests = len(receiver.requests)
        again = triage(config=loop(sample, receiver.url), out=str(tmp_path))
        assert len(receiver.requests) == requests and again["windows"][0]["actions"]["sent"] == 0
    written = "".join(p.read_text(errors="ignore") for p in tmp_path.rglob("*") if p.is_file()
                      and p.suffix in (".jsonl", ".json", ".parquet"))
    assert SECRET not in written and SECRET not in json.dumps(result)


def test_a_refused_payload_is_not_retried_and_goes_again_on_the_next_run(sample, tmp_path, monkeypatch):
    monkeypatch.setenv("TRIAGE_WEBHOOK_SECRET", SECRET)
    with Receiver(statuses=[400] * 100) as receiver:
        result = triage(config=loop(sample, receiver.url), out=str(tmp_path))
        batches = -(-result["windows"][0]["failing_traces"] // 40)
        assert len(receiver.requests) == batches  # one try per batch: a 4xx is an answer
        assert result["windows"][0]["actions"]["failed"] == result["windows"][0]["failing_traces"]
        receiver.statuses.clear()
        again = triage(config=loop(sample, receiver.url), out=str(tmp_path))
        assert again["windows"][0]["actions"]["sent"] == result["windows"][0]["failing_traces"]


def test_a_webhook_rule_needs_https_or_localhost_and_exactly_one_secret():
    with pytest.raises(ValueError, match="must use https"):
        ActionConfig(when=When(failing=True), do="webhook", url="http://hooks.example.com/x", secret_env="S")
    with pytest.raises(ValueError, match="needs one of `secret_env"):
        ActionConfig(when=When(failing=True), do="webhook", url="https://hooks.example.com/x")
    assert ActionConfig(when=When(failing=True), do="webhook", url="https://hooks.example.com/x", secret_block="s")
