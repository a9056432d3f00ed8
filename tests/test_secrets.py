"""Secrets planted as canaries reach only the services they belong to, and nothing the loop writes or logs.

The LangSmith key, the webhook's HMAC secret, the Slack bot token and the Slack incoming-webhook URL live in
Prefect blocks; a loop uses all of them (with a webhook that refuses and a Slack webhook that is down, so
error messages are written too). Then every file under `--out`, the Prefect logs, artifacts, events and
flow-run parameters, the captured output and log records, and every request body the receivers got are
searched for each canary.
"""

from __future__ import annotations

import json
import logging
import socket
from datetime import timedelta

import httpx
import pytest
from prefect.blocks.system import Secret
from prefect.settings import PREFECT_API_URL
from prefect_slack import SlackCredentials, SlackWebhook

from blocks.langsmith import LangSmithCredentials
from flows.triage import triage
from tasks.config import ActionConfig, LangSmithSource, LoopConfig, When
from tasks.sources.sample import SAMPLE_START, generate_traces
from tests.langsmith_server import LangSmithTestServer
from tests.prefect_api import read_events
from tests.slack_server import SlackServer
from tests.webhook_receiver import Receiver

LANGSMITH_KEY = "lsv2_pt_canaryLANGSMITH0000000000000000_5eed"
HOOK_SECRET = "whsec-canary-HMAC-7e11"
SLACK_TOKEN = "xoxb-canary-SLACKTOKEN-9b7"
SLACK_HOOK_PART = "canaryHOOKURL5a1d"
CANARIES = (LANGSMITH_KEY, HOOK_SECRET, SLACK_TOKEN, SLACK_HOOK_PART)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(path: str, body: dict) -> list[dict]:
    """Every item a Prefect `.../filter` endpoint returns, page by page."""
    items, offset = [], 0
    while True:
        page = httpx.post(f"{PREFECT_API_URL.value()}{path}", json={**body, "limit": 200, "offset": offset},
                          timeout=30).raise_for_status().json()
        items += page
        if len(page) < 200:
            return items
        offset += 200


def test_canary_secrets_appear_in_no_log_artifact_snapshot_ledger_event_or_payload(tmp_path, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    records = generate_traces(200, seed=41, start=SAMPLE_START, hours=1).records
    with LangSmithTestServer(api_key=LANGSMITH_KEY) as langsmith, SlackServer(token=SLACK_TOKEN) as slack, \
            Receiver() as hook, Receiver([400] * 100) as refusing, pytest.MonkeyPatch.context() as patch:
        patch.setattr("tests.webhook_receiver.SECRET", HOOK_SECRET)  # the receiver verifies with the canary
        patch.setenv("LANGSMITH_TRACING", "false")
        langsmith.add_project("canary-project", records)
        LangSmithCredentials(api_key=LANGSMITH_KEY, api_url=langsmith.url).save("canary-langsmith", overwrite=True)
        Secret(value=HOOK_SECRET).save("canary-hook-secret", overwrite=True)
        SlackCredentials(token=SLACK_TOKEN).save("canary-slack-bot", overwrite=True)
        SlackWebhook(url=f"{slack.url}/services/T1/B1/{SLACK_HOOK_PART}").save("canary-slack-hook", overwrite=True)
        SlackWebhook(url=f"http://127.0.0.1:{_closed_port()}/services/T1/B2/{SLACK_HOOK_PART}").save(
            "canary-slack-hook-down", overwrite=True)
        failing = When(failing=True)
        config = LoopConfig(
            name="canary", eval_workers=1,
            source=LangSmithSource(project="canary-project", credentials="canary-langsmith"),
            actions=[
                ActionConfig(when=failing, do="feedback", name="feedback"),
                ActionConfig(when=failing, do="webhook", url=hook.url, secret_block="canary-hook-secret",
                             name="hook"),
                ActionConfig(when=failing, do="webhook", url=refusing.url, secret_block="canary-hook-secret",
                             name="hook-refused"),
                ActionConfig(when=failing, do="slack", credentials="canary-slack-bot", channel="#triage",
                             api_url=slack.api_url, name="slack-bot", include_io=True),
                ActionConfig(when=failing, do="slack", block="canary-slack-hook", name="slack-hook"),
                ActionConfig(when=failing, do="slack", block="canary-slack-hook-down", name="slack-down"),
                ActionConfig(when=failing, do="prefect_event", name="event"),
            ])
        (window,) = triage(config=config, start=SAMPLE_START, end=SAMPLE_START + timedelta(hours=1),
                           out=str(tmp_path / "out"))["windows"]
        payloads = [r["raw"] for r in slack.requests] + [json.dumps(r["body"]).encode() for r in hook.requests]
        payloads.append(json.dumps([langsmith.feedback, langsmith.examples], default=str).encode())
        slack_auth = {r["authorization"] for r in slack.requests if r["path"].startswith("/api/")}

    # The run did its work, and its failures were written down (with their error messages).
    assert window["failing_traces"] > 0 and len(hook.requests) >= 1 and len(slack.requests) == 2
    assert set(window["actions"]["failures"]) == {"hook-refused", "slack-down"}
    assert slack_auth == {f"Bearer {SLACK_TOKEN}"}  # the token went where it belongs, and only there
    assert all(r["signed"] for r in hook.requests)

    sinks = {f"payload {i}": body for i, body in enumerate(payloads)}
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            sinks[str(path.relative_to(tmp_path))] = path.read_bytes()
    assert any("_ledger" in name for name in sinks) and any("snapshots/scores" in name for name in sinks)
    runs = _api("/flow_runs/filter", {})
    run_ids = [r["id"] for r in runs]
    sinks["flow run parameters"] = json.dumps([r["parameters"] for r in runs]).encode()
    sinks["logs"] = json.dumps(_api("/logs/filter", {"logs": {"flow_run_id": {"any_": run_ids}}})).encode()
    sinks["artifacts"] = json.dumps(_api("/artifacts/filter", {})).encode()
    sinks["events"] = json.dumps(read_events()).encode()
    sinks["log records"] = "\n".join(r.getMessage() for r in caplog.records).encode()
    out, err = capfd.readouterr()
    sinks["stdout/stderr"] = (out + err).encode()
    # Each sink was really read: the block names are in the parameters, the summary in an artifact.
    assert b"canary-langsmith" in sinks["flow run parameters"] and b"Triage of" in sinks["artifacts"]
    assert b"tracetriage.window.triaged" in sinks["events"] and b"retry handler found" in sinks["log records"]
    leaks = [(canary, name) for name, data in sinks.items() for canary in CANARIES if canary.encode() in data]
    assert leaks == []
