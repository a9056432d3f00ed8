"""What passes between the stages: one typed object per hand-over, so a stage says what it takes and gives.

    fetch ──WindowSpans──▶ evaluate ──ScoredWindow──▶ partition ──Verdicts──▶ attribute ──▶ aggregate
      ──FailureModes──▶ WindowTriage ──▶ spike check ──▶ snapshot ──▶ dispatch ──DispatchCounts──▶ WindowSummary

Tables stay Arrow or pandas inside these objects (the stages compute on them); the objects are frozen, so a
stage that adds something makes a new one (`dataclasses.replace`). A planned action is JSON data (it is
written to the ledger and sent to webhooks as it is), so its contract is a `TypedDict`: `Action`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, TypedDict

import pandas as pd
import pyarrow as pa

from tasks.schemas import ATTRIBUTION, PATTERNS, ROOT_CAUSES, frame_table

Outcome = tuple[str, Any]  # what one send did for one action: ("sent", response) or ("failed", reason)
MIN_LIFT = 1.2  # a pattern is a failure mode when it is at least this much more common among failures than passes


def error_text(exc: BaseException, limit: int = 500) -> str:
    """An exception as the one line a ledger entry, an error row or a failed action keeps."""
    return f"{type(exc).__name__}: {exc}"[:limit]


@dataclass
class WindowSpans:
    """One window's spans in a Parquet file, one row group per evaluation batch of whole traces."""

    window_start: datetime
    path: str
    batches: int
    traces: int
    spans: int
    orphans: int = 0  # spans of this window skipped because their trace root is not in the source


@dataclass
class SourceSpans:
    """Every window of a source, and what was skipped reading it."""

    windows: list[WindowSpans]
    skipped: dict[str, Any]


@dataclass(frozen=True)
class SourceWindows:
    """A source read for one run: its run-records file, its windows, and the range the run triages."""

    path: Path
    token: str  # the source's cache token: the file's fingerprint, window size, batch size and work epoch
    spans: SourceSpans
    start: datetime | None
    end: datetime | None
    trace_url: str | None = None  # a LangSmith project's trace URL prefix

    def chosen(self) -> list[WindowSpans]:
        """The windows in the range."""
        return [w for w in self.spans.windows if (self.start is None or w.window_start >= self.start)
                and (self.end is None or w.window_start < self.end)]


@dataclass(frozen=True)
class ScoredWindow:
    """A window after evaluation: its spans (the columns later stages read), every score, and root metadata."""

    window: WindowSpans
    window_end: datetime
    spans: pd.DataFrame
    scores: pa.Table  # SCORES, status not yet judged
    root_metadata: pd.DataFrame

    @property
    def window_start(self) -> datetime:
        return self.window.window_start

    def root_trace_ids(self) -> pa.Array:
        return pa.array(self.spans.loc[self.spans["is_root"], "trace_id"])


@dataclass(frozen=True)
class Verdicts:
    """The window partitioned: every score judged pass / fail / error, and one verdict per trace."""

    judged: pa.Table  # SCORES with status
    traces: pd.DataFrame  # trace_id, verdict
    scores: pd.DataFrame  # the judged scores later stages read (failed span scores, scores rules name)
    counts: dict[tuple[str, str], int]  # (evaluator, status) -> results
    evaluators: pa.Table  # EVALUATORS: each evaluator's counts, the trend series' inputs

    def count(self, verdict: str) -> int:
        return int((self.traces["verdict"] == verdict).sum())


@dataclass(frozen=True)
class FailureModes:
    """What the failures share: conditions over-represented among them, and the culprit spans' shares."""

    patterns: pd.DataFrame
    root_causes: pd.DataFrame


@dataclass(frozen=True)
class WindowTriage:
    """Everything a window's analysis found: what the spike check, the snapshot and dispatch read."""

    scored: ScoredWindow
    verdicts: Verdicts
    attribution: pd.DataFrame
    modes: FailureModes

    @property
    def window_start(self) -> datetime:
        return self.scored.window_start

    @property
    def window_end(self) -> datetime:
        return self.scored.window_end

    def tables(self) -> dict[str, pa.Table]:
        """The window's snapshot tables (the spans table apart: it is read from the window's file)."""
        return {"scores": self.verdicts.judged, "attribution": frame_table(self.attribution, ATTRIBUTION),
                "patterns": frame_table(self.modes.patterns, PATTERNS),
                "root_causes": frame_table(self.modes.root_causes, ROOT_CAUSES), "evaluators": self.verdicts.evaluators}


class Action(TypedDict, total=False):
    """A planned action, as the ledger keeps it and a webhook receives it. Every action has the first seven keys;
    a trace's action has the trace's evaluator, score, verdict and culprit; a window's action has its `event`
    (spike, recovered, pattern) and what it is about; a follow-up (an action a call asked for) names the call in
    `follow_up_of` and may carry `metadata`, and a feedback's `score`, `value`, `comment`."""

    action_id: str
    loop: str
    action: str  # the rule's name (`actions[i].name`, else `<do>-<i>`), or `<call>.then-<i>` for a follow-up
    do: str
    window_start: str
    trace_id: str | None
    run_id: str | None
    evaluator: str | None
    score: float | None
    verdict: str
    culprit_run_id: str | None
    culprit_span: str | None
    culprit_reason: str | None
    event: str
    episode: dict[str, Any]
    spike: dict[str, Any] | None
    bound: float
    pattern: dict[str, Any]
    follow_up_of: str
    metadata: Any
    comment: str | None
    value: Any
    invalid: str


@dataclass
class DispatchCounts:
    """What dispatch did in a window; `failures` names each failed action's first error: nothing silent."""

    planned: int = 0
    sent: int = 0
    skipped_duplicate: int = 0
    failed: int = 0
    not_sampled: int = 0
    over_cap: int = 0
    failures: dict[str, dict[str, Any]] = field(default_factory=dict)  # action -> {count, error}
    ledger_damaged: int = 0  # unreadable ledger entries: the sends they may hide were repeated under their first keys

    def as_dict(self) -> dict[str, Any]:
        """The counts; `ledger_damaged` only when there was damage to report."""
        return {k: v for k, v in self.__dict__.items() if k != "ledger_damaged" or v}

    def add_failed(self, action: str, error: Any, count: int = 1) -> None:
        self.failed += count
        entry = self.failures.setdefault(action, {"count": 0, "error": str(error)[:300]})
        entry["count"] += count


@dataclass(frozen=True)
class WindowSummary:
    """A triaged window as people read it: the CLI's JSON and text, the artifacts, Slack messages.

    `as_dict()` is the JSON (kept in the windows table's `summary_json`); `trace_url`, the LangSmith project's
    trace URL prefix of a LangSmith source, links example traces (it is in the JSON as each example's URL)."""

    window_start: datetime
    window_end: datetime
    traces: int
    spans: int
    skipped_records: int
    evaluators: dict[str, dict[str, Any]]
    failing_traces: int
    root_causes: list[dict[str, Any]]
    patterns: list[dict[str, Any]]
    spike: dict[str, Any] | None
    actions: dict[str, Any] = field(default_factory=dict)
    snapshot_uri: str = ""
    trace_url: str | None = None

    def with_actions(self, counts: DispatchCounts) -> WindowSummary:
        return dataclasses.replace(self, actions=counts.as_dict())

    def with_snapshot(self, uri: str) -> WindowSummary:
        return dataclasses.replace(self, snapshot_uri=uri)

    def url_of(self, trace_id: str) -> str | None:
        """The trace's page in LangSmith (None for a file source)."""
        return f"{self.trace_url}{trace_id}?trace_id={trace_id}" if self.trace_url else None

    def as_dict(self) -> dict[str, Any]:
        return {"window_start": self.window_start.isoformat(), "window_end": self.window_end.isoformat(),
                "traces": self.traces, "spans": self.spans, "skipped_records": self.skipped_records,
                "evaluators": self.evaluators, "failing_traces": self.failing_traces,
                "root_causes": self.root_causes, "patterns": self.patterns, "actions": self.actions,
                "spike": self.spike, "snapshot_uri": self.snapshot_uri}


@dataclass
class SendContext:
    """What a sink may need besides the actions it sends: the window, links, and the window's runs."""

    loop: str
    source: str  # the source's identity (config.source_identity), part of Prefect event ids
    summary: WindowSummary | None = None
    flow_run_url: str | None = None
    runs: Callable[[], dict[str, Any]] = dict  # the root runs of the window's actions, read on first need
    tried_before: AbstractSet[str] = frozenset()  # actions an earlier run may have carried out


class Sink(Protocol):
    """An outside system dispatch sends to. `chunk` says how many actions one `send` covers (the ledger is
    written after each send); `send` returns one outcome per action."""

    def chunk(self, rule: Any, first: Action, total: int) -> int: ...

    def send(self, rule: Any, actions: list[Action], context: SendContext) -> list[Outcome]: ...
