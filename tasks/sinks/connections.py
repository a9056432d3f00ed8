"""Connections: the one place where blocks and the environment become clients, and the table of sinks.

Secrets are read here, from Prefect blocks (LangSmithCredentials, Secret, SlackWebhook,
SlackCredentials, SnapshotStorage) or from environment variables, when a window is
dispatched and once before a run starts (so a missing secret stops the run before
anything is sent). They are never flow parameters and never logged.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect.runtime import flow_run

from tasks.config import (
    RUN_ACTIONS,
    SLACK_TOKEN_ENV,
    SLACK_WEBHOOK_ENV,
    ActionConfig,
    ConfigError,
    FileSource,
    LangSmithSource,
    LoopConfig,
    SnapshotConfig,
    load_block,
)
from tasks.contracts import Action, Outcome, SendContext, Sink
from tasks.dispatch.follow_ups import Calls, Invalid
from tasks.dispatch.ledger import ActionLog
from tasks.evaluation.evaluators import import_ref
from tasks.evaluation.scoring import bind_all
from tasks.sinks.prefect_events import PrefectEvents
from tasks.sinks.webhook import Webhooks
from tasks.sources.langsmith import project_id
from tasks.sources.records import check_records_file
from tasks.store import SnapshotStore

if TYPE_CHECKING:  # the LangSmith and Slack SDKs load only for a loop that uses them (0.4 s and 0.15 s to import)
    from langsmith import Client

    from tasks.sinks.slack import SlackTarget


def langsmith_client(credentials: str | None) -> Client:
    """A LangSmith client: a LangSmithCredentials block by name, else the LANGSMITH_* environment."""
    from blocks.langsmith import LangSmithCredentials

    block = load_block(LangSmithCredentials, credentials, "source.credentials") if credentials else None
    return (block or LangSmithCredentials()).get_client()


def open_store(snapshots: SnapshotConfig, default_url: str | Path) -> SnapshotStore:
    """The store a loop config names: its SnapshotStorage block, its URL, or `default_url`."""
    if snapshots.block:
        from blocks.storage import SnapshotStorage

        return load_block(SnapshotStorage, snapshots.block, "snapshots.block").get_store()
    return SnapshotStore(snapshots.url or str(default_url), snapshots.storage_options)


def webhook_secret(rule: ActionConfig) -> str:
    """The rule's secret: the environment variable `secret_env`, or the Prefect Secret block `secret_block`."""
    if rule.secret_block:
        from prefect.blocks.system import Secret

        return str(load_block(Secret, rule.secret_block, "secret_block").get())
    value = os.environ.get(rule.secret_env or "")
    if not value:
        raise ConfigError(f"webhook secret: environment variable {rule.secret_env} is not set")
    return value


def slack_target(rule: ActionConfig) -> SlackTarget:
    """The rule's target: its SlackWebhook `block`, its SlackCredentials `credentials`, else the environment."""
    from tasks.sinks.slack import bot_target, webhook_target

    if rule.block:
        from prefect_slack import SlackWebhook

        url = load_block(SlackWebhook, rule.block, "block").url.get_secret_value()
        return webhook_target(url, f"SlackWebhook block {rule.block!r}")
    token = None
    if rule.credentials:
        from prefect_slack import SlackCredentials

        token = load_block(SlackCredentials, rule.credentials, "credentials").token.get_secret_value()
    elif os.environ.get(SLACK_WEBHOOK_ENV):
        return webhook_target(os.environ[SLACK_WEBHOOK_ENV], f"${SLACK_WEBHOOK_ENV}")
    elif os.environ.get(SLACK_TOKEN_ENV) and rule.channel:
        token = os.environ[SLACK_TOKEN_ENV]
    if token is None:
        raise ConfigError(f"`do: slack` needs `block:` (a SlackWebhook block), `credentials:` and `channel:` (a "
                          f"SlackCredentials block), ${SLACK_WEBHOOK_ENV}, or ${SLACK_TOKEN_ENV} with `channel:`")
    return bot_target(token, rule.channel, rule.api_url)


class Later:
    """A sink made when a window first sends through it: a loop whose rules name no Slack target never imports
    the Slack SDK, though an `on_failure` may still ask for a Slack message."""

    def __init__(self, make: Any):
        self._make, self._sink = make, None

    def _made(self) -> Sink:
        if self._sink is None:
            self._sink = self._make()
        return self._sink

    def chunk(self, rule: Any, first: Action, total: int) -> int:
        return self._made().chunk(rule, first, total)

    def send(self, rule: Any, actions: list[Action], context: SendContext) -> list[Outcome]:
        return self._made().send(rule, actions, context)


def slack_sink(targets: dict[str, SlackTarget]) -> Sink:
    from tasks.sinks.slack import Slack

    return Slack(targets, slack_target)


class Unavailable:
    """A sink that could not be made (no LangSmith API key): its actions fail with the reason."""

    def __init__(self, reason: str):
        self.reason = reason

    def chunk(self, rule: Any, first: Action, total: int) -> int:
        return total

    def send(self, rule: Any, actions: list[Action], context: SendContext) -> list[Outcome]:
        return [("failed", self.reason)] * len(actions)


def langsmith_sink(config: LoopConfig) -> Sink:
    """The LangSmith writer of the source's workspace; without an API key, only the actions a call asks for may
    need it, and they fail with the reason."""
    from tasks.sinks.langsmith import LangSmithWriter

    credentials = config.source.credentials if isinstance(config.source, LangSmithSource) else None
    try:
        return LangSmithWriter(langsmith_client(credentials))
    except ValueError:
        if any(a.writes_to_langsmith for a in config.actions):
            raise
        return Unavailable("no LangSmith client: set LANGSMITH_API_KEY or source.credentials")


def sinks_for(config: LoopConfig, action_log: ActionLog | None) -> dict[str, Sink]:
    """The table dispatch routes through: each `do` and the sink that carries it out, with the secrets of the
    config's rules resolved now. A new sink is a module with `chunk` and `send`, and one line here."""
    rules = {config.action_name(i): a for i, a in enumerate(config.actions)}
    writes = any(a.writes_to_langsmith or a.do == "call" for a in config.actions)  # a call's follow-ups may write
    langsmith = langsmith_sink(config) if writes else Unavailable("no LangSmith client was needed by the rules")
    return {
        "log": action_log,
        "call": Calls(),
        "webhook": Webhooks({n: webhook_secret(r) for n, r in rules.items() if r.do == "webhook"}, webhook_secret),
        "slack": (slack_sink({n: slack_target(r) for n, r in rules.items() if r.do == "slack"})
                  if any(r.do == "slack" for r in rules.values()) else Later(lambda: slack_sink({}))),
        "prefect_event": PrefectEvents(),
        **dict.fromkeys(RUN_ACTIONS, langsmith),
        "invalid": Invalid(),
    }


def flow_run_link() -> str | None:
    """The Prefect UI page of this flow run, for Slack messages (None without a Prefect UI)."""
    url = flow_run.ui_url
    return url if url and url.startswith("http") else None


def validate(config: LoopConfig) -> LoopConfig:
    """Everything that can be checked before a side effect: the source, evaluators, action functions, LangSmith
    credentials and project, and every secret the rules need (webhooks, Slack, LangSmith)."""
    if isinstance(config.source, FileSource):
        check_records_file(config.source.path)
    bind_all(config.evaluators)
    for action in config.actions:
        if action.ref:
            import_ref(action.ref, what="action function")
    if isinstance(config.source, LangSmithSource):
        project_id(langsmith_client(config.source.credentials), config.source.project)
    sinks_for(config, None)
    return config
