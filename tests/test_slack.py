"""Slack alerts through the real slack_sdk, to a local Slack stand-in: Block Kit, episodes, 429s."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from prefect_slack import SlackCredentials, SlackWebhook
from slack_sdk.models.blocks import Block, ContextBlock, DividerBlock, HeaderBlock, SectionBlock

from flows.triage import triage
from tasks.config import ActionConfig, FileSource, LangSmithSource, LoopConfig, When
from tasks.dispatch.episodes import episode_event
from tasks.sinks.slack import markdown_section, traces_message
from tasks.sources.sample import DEFAULT_RATES, SAMPLE_START, generate_traces, generate_windows, write_sample
from tests.slack_server import SlackServer
from tests.webhook_receiver import SECRET, Receiver

TOKEN = "xoxb-canary-51c0ffee"
SPIKES = (7, 8, 11)  # of 13 hourly windows
HOUR = timedelta(hours=1)


@pytest.fixture(scope="module")
def episodes(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """13 windows of 300 traces; tool errors at five times their rate in windows 7, 8 and 11.

    Rules: an incoming webhook with a 1 h cooldown, a bot token with a 3 h cooldown, a bot-token digest of the
    tool-error traces (with inputs and outputs), and a signed webhook on spikes. Slack answers the very first
    request with a 429.
    """
    tmp = tmp_path_factory.mktemp("episodes")
    rates = [{**DEFAULT_RATES, "tool_error": 0.25} if i in SPIKES else DEFAULT_RATES for i in range(13)]
    source = tmp / "runs.jsonl"
    write_sample(source, generate_windows(300, rates, seed=21))
    with SlackServer(token=TOKEN, statuses=[429]) as slack, Receiver() as hook, \
            pytest.MonkeyPatch.context() as patch:
        patch.setenv("EPISODE_HOOK_SECRET", SECRET)
        SlackWebhook(url=slack.webhook_url).save("triage-hook", overwrite=True)
        SlackCredentials(token=TOKEN).save("triage-bot", overwrite=True)
        bot = {"do": "slack", "credentials": "triage-bot", "api_url": slack.api_url}
        config = LoopConfig(name="episodes", source=FileSource(path=str(source)), eval_workers=1, actions=[
            ActionConfig(when=When(spike=True), do="slack", block="triage-hook", name="oncall"),
            ActionConfig(when=When(spike=True), channel="#llm-oncall", cooldown="3h", name="oncall-bot", **bot),
            ActionConfig(when=When(root_cause={"span": "lookup_order", "reason": "error"}), channel="#tool-errors",
                         include_io=True, name="tool-errors", **bot),
            ActionConfig(when=When(spike=True), do="webhook", url=hook.url, secret_env="EPISODE_HOOK_SECRET",
                         name="episode-hook"),
        ])
        result = triage(config=config, out=str(tmp / "out"))
        yield {"result": result, "slack": slack, "hook": hook, "config": config, "out": tmp / "out",
               "source": source}


def _header(body: dict) -> str:
    return body["blocks"][0]["text"]["text"]


def _window(result: dict, index: int) -> str:
    return result["windows"][index]["window_start"]


def test_the_planted_spikes_are_the_ones_detected(episodes):
    assert [i for i, w in enumerate(episodes["result"]["windows"]) if w["spike"]] == list(SPIKES)


def test_one_alert_per_episode_and_a_recovery_when_the_cooldown_ends(episodes):
    """1 h cooldown: 7-8 is one episode (recovered in 9), 11 another (recovered in 12)."""
    hook = episodes["slack"].messages("/services/")
    kinds = [("spike" if "Failure spike" in _header(m) else "recovered", m["blocks"][-1]["elements"][0]["text"])
             for m in hook]
    result = episodes["result"]
    assert [k for k, _ in kinds] == ["spike", "recovered", "spike", "recovered"]
    for (_, context), window in zip(kinds, (7, 9, 11, 12), strict=True):
        assert _window(result, window) in context


def test_a_webhook_rule_on_spikes_gets_the_same_episode_events_signed(episodes):
    bodies = [r["body"] for r in episodes["hook"].requests]
    events = [(b["window_start"], e["event"]) for b in bodies for e in b["events"]]
    result = episodes["result"]
    assert events == [(_window(result, 7), "spike"), (_window(result, 9), "recovered"),
                      (_window(result, 11), "spike"), (_window(result, 12), "recovered")]
    assert all(b["runs"] == [] for b in bodies) and all(r["signed"] for r in episodes["hook"].requests)
    assert bodies[0]["events"][0]["spike"] == result["windows"][7]["spike"]


def test_a_longer_cooldown_makes_flapping_spikes_one_episode(episodes):
    """3 h cooldown: the spike in 11 comes 2 h after the last one ended, so it is the same episode."""
    posted = [m for m in episodes["slack"].messages("/api/chat.postMessage") if m["channel"] == "#llm-oncall"]
    (alert,) = posted
    assert "Failure spike" in _header(alert) and _window(episodes["result"], 7) in json.dumps(alert)
    metadata = alert["metadata"]
    assert metadata["event_type"] == "tracetriage_alert" and metadata["event_payload"]["idempotency_key"]
    requests = [r for r in episodes["slack"].requests if r["path"] == "/api/chat.postMessage"]
    assert {r["authorization"] for r in requests} == {f"Bearer {TOKEN}"}


def test_the_alert_is_block_kit_with_what_spiked_the_failure_modes_examples_and_links(episodes):
    alert = episodes["slack"].messages("/services/")[0]
    blocks = Block.parse_all(alert["blocks"])
    assert [type(b) for b in blocks] == [HeaderBlock, SectionBlock, DividerBlock, SectionBlock, SectionBlock,
                                         ContextBlock]
    for block in blocks:
        block.validate_json()  # within Slack's limits
    window = episodes["result"]["windows"][7]
    what, modes, examples = (b.text.text for b in blocks[1:] if isinstance(b, SectionBlock))
    for series in window["spike"]["series"]:
        assert f"*{series['series']}*: {series['rate']:.1%} now vs {series['baseline_rate']:.1%} baseline" in what
    top = window["root_causes"][0]
    assert f"{top['share']:.0%} *{top['span_name']}* ({top['reason']})" in modes
    assert all(trace[:8] in examples or trace in examples for trace in top["example_trace_ids"][:2])
    context = blocks[-1].elements[0].text
    assert "/flow-runs/flow-run/" in context and window["window_start"] in context
    assert alert["text"].startswith("episodes: failure spike")


def test_inputs_and_outputs_appear_only_where_the_rule_asks(episodes):
    roots = [json.loads(line) for line in episodes["source"].read_text().splitlines()]
    questions = [r["inputs"]["question"] for r in roots if r["parent_run_id"] is None]
    spike_alerts = episodes["slack"].messages("/services/")
    assert not any(q in json.dumps(m) for m in spike_alerts for q in questions)
    digests = [m for m in episodes["slack"].messages("/api/chat.postMessage") if m["channel"] == "#tool-errors"]
    assert len(digests) == sum(1 for w in episodes["result"]["windows"]
                               if any(c["span_name"] == "lookup_order" and c["reason"] == "error"
                                      for c in w["root_causes"]))
    assert all(any(q in json.dumps(m) for q in questions) for m in digests)


def test_a_429_waits_for_retry_after_and_the_message_goes_once(episodes):
    first, second = episodes["slack"].requests[:2]
    assert (first["status"], second["status"]) == (429, 200)
    assert first["raw"] == second["raw"] and second["at"] - first["at"] >= 1.0
    assert episodes["result"]["windows"][7]["actions"]["failed"] == 0


def test_a_rerun_of_the_episode_posts_nothing(episodes):
    seen = len(episodes["slack"].requests)
    start = pd.Timestamp(_window(episodes["result"], 7)).to_pydatetime()
    again = triage(config=episodes["config"], start=start, end=start + 6 * HOUR, out=str(episodes["out"]))
    assert len(again["windows"]) == 6 and len(episodes["slack"].requests) == seen
    assert all(w["actions"]["sent"] == 0 for w in again["windows"])


def episode(spiking: set[int], triaged: range | list[int], cooldown: timedelta) -> list[str | None]:
    """The episode event of each triaged hourly window, given which windows spiked."""
    history, events = [], []
    for i in triaged:
        now = SAMPLE_START + i * HOUR
        found = episode_event(i in spiking, history, now, HOUR, cooldown)
        events.append(found and found["event"])
        history.append((now, i in spiking))
    return events


def test_episode_events_for_a_flapping_series():
    assert episode({2, 4}, range(7), HOUR) == [None, None, "spike", "recovered", "spike", "recovered", None]
    assert episode({2, 4}, range(8), 2 * HOUR) == [None, None, "spike", None, None, None, "recovered", None]


def test_a_recovery_is_not_lost_when_its_window_was_never_triaged():
    """Window 3 had no traces: the recovery goes with window 4, once; a spike in 6 opens a new episode."""
    assert episode({2, 6}, [0, 1, 2, 4, 5, 6, 7], HOUR) == [None, None, "spike", "recovered", None, "spike",
                                                             "recovered"]


def test_a_slack_rule_without_credentials_stops_the_run_before_anything_is_sent(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("SLACK_WEBHOOK_URL", raising=False)
    monkeypatch.delenv("SLACK_BOT_TOKEN", raising=False)
    config = LoopConfig(actions=[ActionConfig(when=When(spike=True), do="slack")])
    with pytest.raises(ValueError, match=r"`do: slack` needs `block:`.*SLACK_WEBHOOK_URL"):
        triage(config=config, out=str(tmp_path))
    assert not (tmp_path / "snapshots").exists()


def test_a_malformed_slack_webhook_url_is_refused_without_showing_it(tmp_path: Path):
    SlackWebhook(url="hooks.slack.com/services/T0/B0/canary-in-a-bad-url").save("bad-hook", overwrite=True)
    config = LoopConfig(actions=[ActionConfig(when=When(spike=True), do="slack", block="bad-hook")])
    with pytest.raises(ValueError, match="Slack webhook URL in SlackWebhook block 'bad-hook' must be https") as raised:
        triage(config=config, out=str(tmp_path))
    assert "canary-in-a-bad-url" not in str(raised.value)


def test_text_from_traces_is_escaped_and_a_long_section_is_cut_at_a_whole_line():
    run = SimpleNamespace(inputs={"question": "<!channel> & `rm -rf`"}, outputs={"answer": "<https://evil.example|ok>"})
    records = [{"trace_id": "t1", "window_start": "2026-11-02T09:00:00+00:00", "action": "digest",
                "culprit_span": "a<b>", "culprit_reason": "error"}]
    _, blocks = traces_message(records, "digest", {"traces": 1, "failing_traces": 1}, "loop", None, {"t1": run},
                               include_io=True)
    shown = json.dumps([b.to_dict() for b in blocks])
    assert "<!channel>" not in shown and "&lt;!channel&gt; &amp;" in shown
    assert "<https://evil" not in shown and "a&lt;b&gt;" in shown and "`rm" not in shown

    (section,) = Block.parse_all([markdown_section("• a line of a long list\n" * 200).to_dict()])
    lines = section.text.text.split("\n")
    assert len(section.text.text) <= 3000 and lines[-1] == "…" and set(lines[:-1]) == {"• a line of a long list"}


def test_a_slack_alert_on_a_langsmith_source_links_each_example_trace_to_langsmith(tmp_path: Path, monkeypatch):
    """The traces a per-trace rule matched are not all among the root causes' examples (traces without an error
    pass, mostly): each links anyway."""
    import re

    from tasks.sinks.connections import langsmith_client
    from tasks.sources.langsmith import source_project, trace_url_prefix
    from tests.langsmith_server import LangSmithTestServer

    key = "ls-slack-test-key"
    with LangSmithTestServer(api_key=key) as langsmith, SlackServer(token=TOKEN) as slack:
        monkeypatch.setenv("LANGSMITH_ENDPOINT", langsmith.url)
        monkeypatch.setenv("LANGSMITH_API_KEY", key)
        monkeypatch.setenv("LANGSMITH_TRACING", "false")
        langsmith.add_project("slack-links", generate_traces(200, seed=43, start=SAMPLE_START, hours=1).records)
        SlackCredentials(token=TOKEN).save("links-bot", overwrite=True)
        config = LoopConfig(name="links", eval_workers=1, source=LangSmithSource(project="slack-links"), actions=[
            ActionConfig(when=When(evaluator="no_error", above=0.5), do="slack", credentials="links-bot",
                         channel="#triage", api_url=slack.api_url, name="error-free-traces")])
        triage(config=config, start=SAMPLE_START, end=SAMPLE_START + HOUR, out=str(tmp_path / "out"))
        client = langsmith_client(None)
        prefix = trace_url_prefix(client, source_project(client, "slack-links"))
        (message,) = slack.messages("/api/chat.postMessage")

    sections = [b["text"]["text"] for b in message["blocks"] if b["type"] == "section"]
    examples = next(s for s in sections if s.startswith("*Example traces*")).splitlines()[1:]
    assert examples and all(line.startswith("• <") for line in examples), examples
    for line in examples:
        url, short = re.fullmatch(r"• <([^|]+)\|`([0-9a-f]{8})`>", line).groups()
        trace = url.removeprefix(prefix).partition("?")[0]
        assert url == f"{prefix}{trace}?trace_id={trace}" and trace.startswith(short)
