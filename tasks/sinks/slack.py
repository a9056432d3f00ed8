"""Slack alerts through slack_sdk: Block Kit messages for spike episodes, their recovery, failure modes that
pass a bound, and traces that match a rule.

Credentials come from prefect-slack's blocks (`SlackWebhook`, an incoming webhook; `SlackCredentials`, a bot
token that posts with `chat.postMessage`) or from $SLACK_WEBHOOK_URL / $SLACK_BOT_TOKEN. Slack's 429 (it waits
the `Retry-After` Slack gives), 500/503 and dropped connections are retried by slack_sdk's own retry handlers.
Messages hold rates, shares, span names and trace links; runs' inputs and outputs only with `include_io: true`.

>>> text, blocks = spike_message({"spike": None, "window_start": "2026-11-02T09:00:00+00:00"}, {}, "demo")
>>> text
'demo: failure spike in window 2026-11-02T09:00:00+00:00'
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from typing import Any
from urllib.error import URLError
from urllib.parse import urlsplit

from slack_sdk import WebClient, WebhookClient
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_handlers import (
    ConnectionErrorRetryHandler,
    RateLimitErrorRetryHandler,
    ServerErrorRetryHandler,
)
from slack_sdk.models.blocks import (
    Block,
    ContextBlock,
    DividerBlock,
    HeaderBlock,
    MarkdownTextObject,
    SectionBlock,
)

from tasks.config import ActionConfig, ConfigError, is_allowed_url
from tasks.contracts import MIN_LIFT, Action, Outcome, SendContext, error_text
from tasks.sinks.webhook import idempotency_key

RETRIES = 3
TOP_MODES = 5
EXAMPLES = 5
SECTION_CHARS = 2900  # Slack refuses a section over 3,000 characters
IO_CHARS = 300


def retry_handlers() -> list:
    """slack_sdk's handlers: 429 after its Retry-After, 500/503 and dropped connections, each up to RETRIES times."""
    return [RateLimitErrorRetryHandler(max_retry_count=RETRIES), ServerErrorRetryHandler(max_retry_count=RETRIES),
            ConnectionErrorRetryHandler(max_retry_count=RETRIES)]


class _Redact(logging.Filter):
    """Blanks a secret in every record of a client's logger: slack_sdk logs the request URL (an incoming
    webhook's URL is its credential) at DEBUG, and again at INFO when it retries."""

    def __init__(self, secret: str, shown: str):
        super().__init__()
        self.secret, self.shown = secret, shown

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.secret in message:
            record.msg, record.args = message.replace(self.secret, self.shown), None
        return True


_LOGGERS = itertools.count()


def redacting_logger(secret: str, shown: str = "***") -> logging.Logger:
    """A logger for one Slack client that never writes its secret (children of `tracetriage.slack`)."""
    logger = logging.getLogger(f"tracetriage.slack.client{next(_LOGGERS)}")
    logger.addFilter(_Redact(secret, shown))
    return logger


def webhook_target(url: str, origin: str) -> SlackTarget:
    """An incoming webhook as a target; the URL is the credential, so errors about it never show it."""
    if not is_allowed_url(url):
        raise ConfigError(f"the Slack webhook URL in {origin} must be https://hooks.slack.com/services/... (not "
                          f"shown: it is a secret)")
    parts = urlsplit(url)
    return SlackTarget(webhook=WebhookClient(url, retry_handlers=retry_handlers(), logger=redacting_logger(
        url, f"{parts.scheme}://{parts.netloc}/services/***")))


def bot_target(token: str, channel: str | None, api_url: str | None = None) -> SlackTarget:
    """A bot token and a channel as a target (`chat.postMessage`); `api_url` for a Slack-compatible server."""
    base = {"base_url": api_url} if api_url else {}
    return SlackTarget(web=WebClient(token=token, retry_handlers=retry_handlers(), logger=redacting_logger(token),
                                     **base), channel=channel)


class SlackTarget:
    """Where one slack rule posts: an incoming webhook, or a bot token and a channel."""

    def __init__(self, webhook: WebhookClient | None = None, web: WebClient | None = None,
                 channel: str | None = None):
        self.webhook, self.web, self.channel = webhook, web, channel
        self._secret = webhook.url if webhook is not None else web.token

    def __repr__(self) -> str:
        return f"SlackTarget({'webhook' if self.webhook else f'chat.postMessage {self.channel}'})"  # never the secret

    def post(self, text: str, blocks: list[Block], key: str | None = None) -> Outcome:
        """Post one message; with a bot token, `key` (the send's idempotency key) goes in the message metadata,
        so a Slack app can tell a repeat after a crash from a new alert."""
        try:
            if self.webhook is not None:
                response = self.webhook.send(text=text, blocks=blocks, unfurl_links=False)
                if response.status_code == 200:
                    return "sent", {"status": 200}
                return "failed", f"HTTP {response.status_code}: {str(response.body)[:200]}"
            metadata = {"event_type": "tracetriage_alert", "event_payload": {"idempotency_key": key}} if key else None
            reply = self.web.chat_postMessage(channel=self.channel, text=text, blocks=blocks, unfurl_links=False,
                                              metadata=metadata)
            return "sent", {"channel": reply.get("channel"), "ts": reply.get("ts")}
        except SlackApiError as exc:
            return "failed", f"Slack API error: {exc.response.get('error') or exc.response.status_code}"
        except (URLError, OSError) as exc:
            return "failed", self._redacted(f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}")
        except Exception as exc:  # noqa: BLE001 - slack_sdk's own errors quote the URL: recorded, redacted
            return "failed", self._redacted(error_text(exc, 10_000))

    def _redacted(self, message: str) -> str:
        return message.replace(self._secret, "***")[:300]


def markdown_section(text: str) -> SectionBlock:
    """A markdown section, cut at the last whole line that fits (a cut inside `<url|name>` breaks the markup)."""
    if len(text) > SECTION_CHARS:
        text = text[:text.rfind("\n", 0, SECTION_CHARS - 2)] + "\n…"
    return SectionBlock(text=MarkdownTextObject(text=text))


def esc(value: Any) -> str:
    """Text from traces and config, escaped as Slack asks (`&`, `<`, `>`): a run's output cannot ping
    `<!channel>` or smuggle in a link."""
    return str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _rate(window: dict[str, Any]) -> str:
    traces, failing = window.get("traces", 0), window.get("failing_traces", 0)
    return f"{_pct(failing / traces if traces else 0.0)} ({failing} of {traces} traces)"


def _trace_link(trace_id: str, url: str | None) -> str:
    return f"<{url}|`{trace_id[:8]}`>" if url else f"`{trace_id}`"


def failure_modes(window: dict[str, Any]) -> str:
    """The top root causes (culprit spans) and failure patterns, with their shares of failures."""
    lines = [f"• {c['share']:.0%} *{esc(c['span_name'])}* ({c['reason']}), {c['traces']} traces"
             for c in window.get("root_causes", [])[:TOP_MODES]]
    lines += [f"• {p['fail_share']:.0%} of failures (vs {_pct(p['pass_share'])} of passes): {esc(p['condition'])}"
              for p in window.get("patterns", [])[:TOP_MODES] if p["lift"] is None or p["lift"] >= MIN_LIFT]
    return "\n".join(lines) or "no failure mode stands out"


def examples(window: dict[str, Any], runs: dict[str, Any] | None = None, include_io: bool = False,
             trace_ids: list[str] | None = None) -> str:
    """A few example traces, linked to LangSmith when the source is LangSmith; inputs/outputs only if asked."""
    urls: dict[str, str | None] = {}
    for cause in window.get("root_causes", []):
        for i, trace in enumerate(cause["example_trace_ids"]):
            urls.setdefault(trace, (cause.get("example_trace_urls") or [None] * (i + 1))[i])
    chosen = (trace_ids if trace_ids is not None else list(urls))[:EXAMPLES]
    lines = []
    for trace in chosen:
        line = f"• {_trace_link(trace, urls.get(trace) or _url_for(window, trace))}"
        run = (runs or {}).get(trace)
        if include_io and run is not None:
            line += f"\n    in: `{_code(run.inputs)}`\n    out: `{_code(run.outputs)}`"
        lines.append(line)
    return "\n".join(lines) or "none"


def _code(value: Any) -> str:
    """A run's inputs or outputs inside an inline code span: escaped, without backticks, cut to IO_CHARS."""
    return esc(str(value).replace("`", "'")[:IO_CHARS])


def _url_for(window: dict[str, Any], trace_id: str) -> str | None:
    base = window.get("trace_url")
    return f"{base}{trace_id}?trace_id={trace_id}" if base else None


def _context(window: dict[str, Any], loop: str, flow_run_url: str | None) -> ContextBlock:
    parts = [f"loop *{esc(loop)}*", f"window {window.get('window_start')} .. {window.get('window_end')}"]
    if flow_run_url:
        parts.append(f"<{flow_run_url}|Prefect flow run>")
    return ContextBlock(elements=[MarkdownTextObject(text=" · ".join(parts))])


def spike_message(record: dict[str, Any], window: dict[str, Any], loop: str, flow_run_url: str | None = None,
                  runs: dict[str, Any] | None = None, include_io: bool = False) -> tuple[str, list[Block]]:
    """The alert that opens a spike episode: what spiked, now vs baseline, failure modes, examples, links."""
    spike = record.get("spike") or {}
    text = f"{loop}: failure spike in window {record['window_start']}"
    base = spike.get("baseline", {})
    spiked = [f"• *{esc(s['series'])}*: {_pct(s['rate'])} now vs {_pct(s['baseline_rate'])} baseline "
              f"({s['ratio']:.1f}x, {s['failing']}/{s['total']})" for s in spike.get("series", [])]
    spiked += [f"• new failure mode *{esc(m['series'])}*: {_pct(m['share'])} of failures (at most "
               f"{_pct(m['baseline_max_share'])} before)" for m in spike.get("new_failure_modes", [])]
    blocks = [HeaderBlock(text=f":rotating_light: Failure spike: {loop}"[:150]),  # plain text: no markup
              markdown_section(f"*Failure rate* {_rate(window)}\n*What spiked* (baseline: {base.get('windows', '?')} "
                               f"windows {base.get('from', '?')} .. {base.get('to', '?')}):\n" + "\n".join(spiked)),
              DividerBlock(),
              markdown_section("*Top failure modes*\n" + failure_modes(window)),
              markdown_section("*Example traces*\n" + examples(window, runs, include_io)),
              _context(window, loop, flow_run_url)]
    return text, blocks


def recovery_message(record: dict[str, Any], window: dict[str, Any], loop: str,
                     flow_run_url: str | None = None) -> tuple[str, list[Block]]:
    """The message that closes an episode: the last spiking window, and the rate now."""
    last = record["episode"]["last_spike_window"]
    text = f"{loop}: recovered, no spike since window {last}"
    blocks = [HeaderBlock(text=f":white_check_mark: Recovered: {loop}"[:150]),
              markdown_section(f"No spike since the window starting {last} "
                               f"(cooldown {record['episode']['cooldown']}).\n*Failure rate* now {_rate(window)}"),
              _context(window, loop, flow_run_url)]
    return text, blocks


def pattern_message(record: dict[str, Any], window: dict[str, Any], loop: str, flow_run_url: str | None = None,
                    runs: dict[str, Any] | None = None, include_io: bool = False) -> tuple[str, list[Block]]:
    """A failure mode whose share of failures passed the rule's bound."""
    pattern = record["pattern"]
    text = f"{loop}: {pattern['fail_share']:.0%} of failures have {esc(pattern['condition'])}"
    blocks = [HeaderBlock(text=f":mag: Failure mode: {loop}"[:150]),
              markdown_section(f"*{pattern['fail_share']:.0%}* of failing traces have *{esc(pattern['condition'])}* "
                               f"(vs {_pct(pattern['pass_share'])} of passing ones; bound {record['bound']:.0%}).\n"
                               f"*Failure rate* {_rate(window)}"),
              markdown_section("*Example traces*\n" + examples(window, runs, include_io, pattern["example_trace_ids"])),
              _context(window, loop, flow_run_url)]
    return text, blocks


def traces_message(records: list[dict[str, Any]], action: str, window: dict[str, Any], loop: str,
                   flow_run_url: str | None = None, runs: dict[str, Any] | None = None,
                   include_io: bool = False) -> tuple[str, list[Block]]:
    """One message for every trace a run-level rule matched in the window."""
    culprits: dict[str, int] = {}
    for r in records:
        key = f"{esc(r.get('culprit_span') or 'no culprit')} ({r.get('culprit_reason') or '-'})"
        culprits[key] = culprits.get(key, 0) + 1
    top = sorted(culprits.items(), key=lambda kv: -kv[1])[:TOP_MODES]
    text = f"{loop}: {len(records)} traces matched {action} in window {records[0]['window_start']}"
    blocks = [HeaderBlock(text=f":warning: {action}: {len(records)} traces"[:150]),
              markdown_section(f"*Failure rate* {_rate(window)}\n*Culprit spans*\n"
                               + "\n".join(f"• {name}: {n}" for name, n in top)),
              markdown_section("*Example traces*\n"
                               + examples(window, runs, include_io, [r["trace_id"] for r in records])),
              _context(window, loop, flow_run_url)]
    return text, blocks


def message(records: list[dict[str, Any]], rule: ActionConfig, window: dict[str, Any], loop: str,
            flow_run_url: str | None, runs: dict[str, Any]) -> tuple[str, list[Block]]:
    """The message for one send: a window-level record (spike, recovery, pattern) or a rule's matched traces."""
    first = records[0]
    if first.get("event") == "recovered":
        return recovery_message(first, window, loop, flow_run_url)
    if first.get("event") == "spike":
        return spike_message(first, window, loop, flow_run_url, runs, rule.include_io)
    if first.get("event") == "pattern":
        return pattern_message(first, window, loop, flow_run_url, runs, rule.include_io)
    return traces_message(records, first["action"], window, loop, flow_run_url, runs, rule.include_io)


class Slack:
    """The `slack` sink: one message per send, to the rule's target (resolved when the sinks are made, or, for a
    message a call asked for, by `resolve` when it is sent). A rule's matched traces go in one message."""

    def __init__(self, targets: dict[str, SlackTarget], resolve: Callable[[ActionConfig], SlackTarget]):
        self.targets, self.resolve = targets, resolve

    def __repr__(self) -> str:
        return f"Slack({self.targets!r})"

    def chunk(self, rule: ActionConfig, first: Action, total: int) -> int:
        return total if first["trace_id"] is not None else 1

    def send(self, rule: ActionConfig, actions: list[Action], context: SendContext) -> list[Outcome]:
        target = self.targets.get(actions[0]["action"]) or self.resolve(rule)
        window = {} if context.summary is None else {**context.summary.as_dict(),
                                                     "trace_url": context.summary.trace_url}
        text, blocks = message(actions, rule, window, context.loop, context.flow_run_url,
                               context.runs() if rule.include_io else {})
        return [target.post(text, blocks, idempotency_key(actions))] * len(actions)
