"""Signed webhooks: a local receiver checks every signature, as the README shows a receiver doing."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from flows.triage import triage
from tasks.config import ActionConfig, FileSource, LoopConfig, When
from tasks.sources.sample import generate_traces, write_sample

SECRET = "whsec-canary-3f9a1c"  # must never be written anywhere but the signature


def verify(secret: str, headers, body: bytes, tolerance: int = 300) -> bool:
    """The README's receiver check: recompute the HMAC over '<timestamp>.<body>' and compare in constant time."""
    timestamp = headers["X-Tracetriage-Timestamp"]
    if abs(time.time() - int(timestamp)) > tolerance:  # refuse replays of old requests
        return False
    expected = "v1=" + hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, headers["X-Tracetriage-Signature"])


class Receiver:
    """A webhook receiver on 127.0.0.1 that answers with the scripted statuses, then 200."""

    def __init__(self, statuses: list[int] | None = None):
        self.statuses = list(statuses or [])
        self.requests: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                receiver.requests.append({"status": status, "key": self.headers["Idempotency-Key"],
                                          "signed": verify(SECRET, self.headers, body), "body": json.loads(body)})
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/triage"

    def __enter__(self) -> Receiver:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def delivered(self) -> list[str]:
        return [run["action_id"] for r in self.requests if r["status"] < 300 for run in r["body"]["runs"]]


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
