"""The loop config: one pydantic model, read from YAML by the CLI and taken as the flow's parameter.

Everything is validated before any stage runs; errors name the field and the fix.
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import json
import os
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

_DURATION_PATTERN = r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)\s*$"
_DURATION = re.compile(_DURATION_PATTERN)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
DEFAULT_OUT = ".tracetriage"  # the state directory: snapshots, ledger, action log and work files
MAX_WINDOW = timedelta(days=366)  # longer windows (or lags) push window ends past what a datetime holds
# The same grammar in the JSON schema: Prefect's UI checks `pattern` before it creates a run, so "1 hour" is refused
# in the form rather than on the worker.
DURATION_SCHEMA = {"pattern": _DURATION_PATTERN}


def parse_duration(text: str | int | float) -> timedelta:
    """'90s', '15m', '1h', '1d' (or a number of seconds) as a timedelta."""
    if isinstance(text, int | float):
        return timedelta(seconds=float(text))
    match = _DURATION.match(str(text))
    if not match:
        raise ValueError(f"duration {text!r} is not understood; write it like '30s', '15m', '1h' or '1d'")
    try:
        return timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2)])
    except OverflowError:
        raise ValueError(f"duration {text!r} is too long") from None


def positive_duration(value: str, what: str, example: str) -> str:
    """`value` if it is a duration longer than zero; else a ValueError naming `what`."""
    if parse_duration(value) <= timedelta(0):
        raise ValueError(f"{what} {value!r} must be longer than zero, e.g. '{example}'")
    return value


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """'512MB', '2GB', '1.5 GB' (or a number of bytes) as bytes; KB/MB/GB are powers of 1024."""
    match = _SIZE.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"size {text!r} is not understood; write it like '512MB' or '2GB'")
    unit = (match.group(2) or "B").upper()
    return int(float(match.group(1)) * 1024 ** ("B", "KB", "MB", "GB", "TB").index(unit))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FileSource(_Strict):
    """Run records exported to a file: JSONL (one LangSmith run per line) or Parquet."""

    kind: Literal["file"] = "file"
    path: str = Field(description="JSONL or Parquet file of LangSmith run records, roots and child spans together.")


class SampleSource(_Strict):
    """The built-in sample traces of a RAG/agent app, generated on the fly (no credentials, no network)."""

    kind: Literal["sample"] = "sample"
    traces: int = Field(2000, ge=1, description="How many traces to generate.")
    seed: int = Field(7, description="Random seed; the same seed gives the same traces and the same action ids.")
    hours: int = Field(3, ge=1, description="The traces' root start times are spread over this many hours.")


class RateLimit(_Strict):
    requests: int = Field(15, ge=1, description="Run-query requests allowed in each `per` period.")
    per: str = Field("10s", description="The period (LangSmith Cloud allows 15 run queries per 10 s per API key).",
                     json_schema_extra=DURATION_SCHEMA)

    @property
    def per_seconds(self) -> float:
        return parse_duration(self.per).total_seconds()


class LangSmithSource(_Strict):
    """Runs of a LangSmith tracing project, or of an `evaluate()` experiment, fetched through the langsmith SDK."""

    kind: Literal["langsmith"] = "langsmith"
    project: str | None = Field(None, description="Tracing project (session) name.")
    experiment: str | None = Field(None, description="Instead of `project`: an evaluate() experiment's name; all its "
                                                     "runs are read, each with the dataset example it was made "
                                                     "from (for evaluators that take `example` or "
                                                     "`reference_outputs`).")
    filter: str | None = Field(None, description="LangSmith filter on every run, e.g. 'eq(run_type, \"llm\")'.")
    trace_filter: str | None = Field(None, description="LangSmith filter on each run's root, e.g. "
                                                       "'eq(status, \"success\")'.")
    api: Literal["auto", "v2", "v1"] = Field(
        "auto", description="'v2' POST /v2/runs/query; 'v1' POST /runs/query for older self-hosted backends; "
                            "'auto' v2 when the backend has it.")
    grace: str = Field("15m", description="Spans starting this long after the window end still complete their "
                                          "trace (long-running agents need more).", json_schema_extra=DURATION_SCHEMA)
    page_size: int = Field(1000, ge=1, le=1000, description="Runs per v2 page (v1 pages are at most 100).")
    rate_limit: RateLimit = Field(default_factory=RateLimit, description="Client-side pace of run queries.")
    credentials: str | None = Field(None, description="Name of a LangSmithCredentials block; else the "
                                                      "LANGSMITH_* environment variables.")
    feedback_stats: bool = Field(False, description="Also fetch each run's feedback scores (set by the loop when "
                                                    "an evaluator is `langsmith:feedback/KEY`).")

    @field_validator("grace")
    @classmethod
    def _grace_is_duration(cls, value: str) -> str:
        parse_duration(value)
        return value

    @model_validator(mode="after")
    def _one_session(self) -> LangSmithSource:
        if not (self.project or self.experiment) or (self.experiment and self.project not in (None,
                                                                                               self.experiment)):
            raise ValueError("a langsmith source needs `project: NAME` or `experiment: NAME` (one of them)")
        if self.experiment and self.project is None:
            self.project = self.experiment  # an experiment is a project (session) with a reference dataset
        return self


SOURCE_KINDS: dict[str, type[_Strict]] = {"sample": SampleSource, "file": FileSource, "langsmith": LangSmithSource}


def _inline(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """A property schema with its `$ref` replaced by the definition (the flat form has no definitions of its own)."""
    if "$ref" not in schema:
        return schema
    return {**defs[schema["$ref"].rsplit("/", 1)[-1]], **{k: v for k, v in schema.items() if k != "$ref"}}


def source_form_schema() -> dict[str, Any]:
    """`source` as Prefect's form can render it: one flat object of `kind` and the fields of every kind, each
    described with the kind it is for. (The union itself, a `oneOf` with a discriminator, renders as a JSON box.)"""
    properties: dict[str, Any] = {"kind": {
        "type": "string", "enum": list(SOURCE_KINDS), "default": "sample", "title": "Kind",
        "description": "sample: the built-in sample traces; file: exported LangSmith run records; langsmith: a "
                       "LangSmith tracing project. Fill in only the fields for the chosen kind."}}
    for kind, model in SOURCE_KINDS.items():
        schema = model.model_json_schema()
        for name, field in schema["properties"].items():
            if name == "kind":
                continue
            field = _inline(field, schema.get("$defs", {}))
            branches = field.get("anyOf", [])
            if field.get("default", ...) is None and len(branches) == 2 and {"type": "null"} in branches:
                # Optional text: a plain input (left empty, it is omitted) instead of a string-or-null switch.
                field = {**{k: v for k, v in field.items() if k not in ("anyOf", "default")},
                         **next(b for b in branches if b != {"type": "null"})}
            properties[name] = {**field, "description": f"For kind {kind}: {field.get('description', '')}".strip()}
    return {"type": "object", "title": "Source", "properties": properties, "additionalProperties": False,
            "description": "Where runs come from. Default: the built-in sample traces."}


def source_of_kind(value: Any) -> Any:
    """A source as the form sends it (every kind's fields, at their defaults) reduced to the fields of its `kind`.

    A field of another kind that holds anything but its default is an error, so a path typed in while `kind` is
    still `sample` is not silently ignored."""
    if not isinstance(value, dict) or value.get("kind") not in SOURCE_KINDS:
        return value
    kind = value["kind"]
    own = SOURCE_KINDS[kind].model_fields
    kept = {}
    for name, given in value.items():
        owner = next((k for k, m in SOURCE_KINDS.items() if name in m.model_fields), None)
        if name in own and given == "" and own[name].default is None:
            kept[name] = None  # an optional text field the form left empty
            continue
        if name in own or owner is None:
            kept[name] = given  # an unknown field stays, for the "unknown field" error
            continue
        default = SOURCE_KINDS[owner].model_fields[name].get_default(call_default_factory=True)
        if given is None or given == "" or given == default or (
                isinstance(default, BaseModel) and given == default.model_dump()):
            continue
        raise ValueError(f"source.{name} is a field of kind {owner!r}, but source.kind is {kind!r}: set "
                         f"source.kind to {owner!r} or leave {name} at its default")
    return kept


# How a source is read, not which runs it holds: left out of its identity.
_READING_FIELDS = {"api", "grace", "page_size", "rate_limit", "credentials"}


def source_identity(source: FileSource | SampleSource | LangSmithSource) -> str:
    """Which runs a source holds, as a short stable id (`file:...`, `langsmith:...`): part of event ids, so two
    sources triaged under one loop name never collide, while a rerun of the same source repeats its ids."""
    fields = source.model_dump(mode="json", exclude=_READING_FIELDS)
    if isinstance(source, FileSource):
        fields["path"] = str(Path(source.path).expanduser().resolve())
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    return f"{source.kind}:{digest}"


# Parsed as the discriminated union (the code checks `isinstance(config.source, FileSource)`); shown to Prefect's
# forms as the flat object.
Source = Annotated[FileSource | SampleSource | LangSmithSource, Field(discriminator="kind"),
                   BeforeValidator(source_of_kind), WithJsonSchema(source_form_schema())]


class WindowConfig(_Strict):
    size: str = Field("1h", description="Window length, aligned to the epoch: '15m', '1h', '1d'.",
                      json_schema_extra=DURATION_SCHEMA)
    lag: str = Field(
        "10m",
        description="A window is final (and cacheable) only this long after its end, for late-arriving spans.",
        json_schema_extra=DURATION_SCHEMA,
    )

    @field_validator("size")
    @classmethod
    def _is_positive_duration(cls, value: str) -> str:
        if positive_duration(value, "window size", "1h") and parse_duration(value) > MAX_WINDOW:
            raise ValueError(f"window size {value!r} is longer than {MAX_WINDOW.days}d")
        return value

    @field_validator("lag")
    @classmethod
    def _is_duration(cls, value: str) -> str:
        if parse_duration(value) < timedelta(0):
            raise ValueError(f"window lag {value!r} cannot be negative")
        if parse_duration(value) > MAX_WINDOW:
            raise ValueError(f"window lag {value!r} is longer than {MAX_WINDOW.days}d")
        return value

    @property
    def size_delta(self) -> timedelta:
        return parse_duration(self.size)

    @property
    def lag_delta(self) -> timedelta:
        return parse_duration(self.lag)

    def is_final(self, window_end: datetime) -> bool:
        """Whether a window (or range) ending at `window_end` is closed: its end plus the lag has passed, so its
        runs can no longer change and its work is cached."""
        return datetime.now(UTC) >= window_end + self.lag_delta


class SpanTarget(_Strict):
    """Which spans a span evaluator scores: by run type, by name, or both."""

    run_type: str | None = Field(None, description="LangSmith run type: llm, chain, tool, retriever, ...")
    name: str | None = Field(None, description="Span name, e.g. 'search_docs'.")

    @model_validator(mode="after")
    def _names_something(self) -> SpanTarget:
        if self.run_type is None and self.name is None:
            raise ValueError("a span target needs run_type or name, e.g. {run_type: retriever}")
        if self.run_type is not None:
            self.run_type = self.run_type.lower()
        return self


class CallRateLimit(_Strict):
    """Calls of one evaluator, evenly spaced: `requests` each `per` (no bursts, so a provider counting a sliding
    window or a token bucket never sees more)."""

    requests: int = Field(ge=1, description="Calls allowed in each `per` period, by every process of the run.")
    per: str = Field("60s", description="The period, e.g. '60s' for a provider's requests per minute.")

    @field_validator("per")
    @classmethod
    def _per_is_positive(cls, value: str) -> str:
        return positive_duration(value, "rate_limit per", "60s")

    @property
    def interval(self) -> float:
        """Seconds between two calls."""
        return parse_duration(self.per).total_seconds() / self.requests


# Errors a model provider's client raises for a rate limit or a transient fault, matched by class name along
# the exception's class hierarchy (no import needed): 'package.Name' matches a class `Name` of that package.
DEFAULT_RETRY_ON = (
    "openai.RateLimitError", "openai.APITimeoutError", "openai.APIConnectionError", "openai.InternalServerError",
    "anthropic.RateLimitError", "anthropic.APITimeoutError", "anthropic.APIConnectionError",
    "anthropic.InternalServerError", "httpx.TimeoutException", "httpx.NetworkError",
    "langsmith.utils.LangSmithRateLimitError",
)


class CallRetry(_Strict):
    """Retries of one evaluation on the errors named in `on`, after exponential backoff with jitter (or the
    error's Retry-After); after the last attempt, an error row."""

    attempts: int = Field(4, ge=1, le=20, description="Tries of one evaluation, the first included.")
    backoff: float = Field(1.0, ge=0, description="Seconds before the first retry; doubled each retry.")
    max_backoff: float = Field(30.0, ge=0, description="Longest wait between two tries.")
    on: list[str] = Field(default_factory=lambda: list(DEFAULT_RETRY_ON),
                          description="Exception classes to retry, as 'package.ClassName' or 'ClassName'.")


class EvaluatorConfig(_Strict):
    key: str = Field(description="Feedback key the scores are recorded under.")
    ref: str = Field(description="Import path 'package.module:function', 'builtin:NAME', or "
                                 "'langsmith:feedback/KEY' (the score each run already has in LangSmith).")
    threshold: float = Field(0.5, strict=True,  # a quoted "0.5" is a typo to point out, not a number to guess
                             description="Scores below it fail (above it with higher_is_better: false).")
    higher_is_better: bool = True
    score_range: tuple[float, float] = Field(
        (0.0, 1.0), description="The scores this evaluator gives; the threshold must lie inside it."
    )
    target: Literal["root"] | SpanTarget = Field(
        "root", description="'root': decides pass/fail of the trace; a span target feeds attribution."
    )
    params: dict[str, Any] | None = Field(
        None, description="If set, `ref` names a factory called with these keyword arguments."
    )
    pass_values: list[str] | None = Field(
        None, description="For evaluators returning a categorical value: the values that pass."
    )
    timeout: float = Field(30.0, gt=0, description="Seconds one call of the evaluator may take before it is an "
                                                    "error row (a hung sync call is given up on at it).")
    max_concurrency: int | None = Field(
        None, ge=1, le=256, description="Evaluations in flight at once per batch; default 32 for async evaluators, "
                                        "8 for sync ones (on threads; 1 for the CPU-bound built-ins); 1 calls one "
                                        "at a time."
    )
    rate_limit: CallRateLimit | None = Field(
        None, description="At most `requests` calls each `per`, shared by every batch and process of the run "
                          "(a model provider's requests per minute)."
    )
    retry: CallRetry = Field(default_factory=lambda: CallRetry(), description="Retries of rate-limit and transient "
                                                                           "errors, with backoff.")
    cache: bool | None = Field(
        None, description="Keep each run's result, so a rerun never calls the evaluator again for a run it scored; "
                          "default: on for evaluators by import path, off for built-ins (faster than a lookup)."
    )

    @field_validator("key")
    @classmethod
    def _key_is_plain(cls, value: str) -> str:
        if not value or not re.fullmatch(r"[A-Za-z0-9_.\-]+", value):
            raise ValueError(f"evaluator key {value!r} must be letters, digits, '_', '-' or '.'")
        return value

    @field_validator("ref")
    @classmethod
    def _ref_has_form(cls, value: str) -> str:
        if ":" not in value:
            raise ValueError(
                f"evaluator ref {value!r} must be 'package.module:function' or 'builtin:<name>' (or "
                f"'langsmith:feedback/<key>' for scores already in LangSmith)"
            )
        if value.startswith("langsmith:") and not re.fullmatch(r"langsmith:feedback/[A-Za-z0-9_.\-]+", value):
            raise ValueError(f"evaluator ref {value!r}: LangSmith scores are 'langsmith:feedback/<key>', e.g. "
                             f"'langsmith:feedback/correctness'")
        return value

    @property
    def feedback_key(self) -> str | None:
        """For `ref: langsmith:feedback/<key>`, the feedback key whose existing scores are the scores."""
        return self.ref.removeprefix("langsmith:feedback/") if self.ref.startswith("langsmith:feedback/") else None

    @model_validator(mode="after")
    def _threshold_in_range(self) -> EvaluatorConfig:
        low, high = self.score_range
        if not low <= self.threshold <= high:
            raise ValueError(
                f"threshold {self.threshold} of evaluator {self.key!r} is outside its score_range [{low}, {high}]; "
                f"lower the threshold or set score_range"
            )
        return self

    @property
    def is_root(self) -> bool:
        return self.target == "root"

    @property
    def target_label(self) -> str:
        """'root', or the span target as `name=...`, `run_type=...`."""
        if self.target == "root":
            return "root"
        return ", ".join(f"{k}={v}" for k, v in self.target.model_dump().items() if v is not None)


class RootCause(_Strict):
    """A failing trace's culprit span (see attribution): by span name, reason, or both."""

    span: str | None = Field(None, description="The culprit span's name, e.g. lookup_order.")
    reason: Literal["error", "below_threshold", "no_upstream_cause"] | None = None

    @model_validator(mode="after")
    def _names_something(self) -> RootCause:
        if self.span is None and self.reason is None:
            raise ValueError("a root_cause needs span or reason, e.g. {span: lookup_order, reason: error}")
        return self


class PatternBound(_Strict):
    """A failure mode (a row of the patterns table) whose share of the window's failures passes a bound."""

    condition: str | None = Field(None, description="Text the pattern's condition contains, e.g. 'search_docs' or "
                                                     "'latency outlier' (case-insensitive).")
    span: str | None = Field(None, description="The span the pattern is about, e.g. search_docs.")
    share_above: float = Field(description="Act when this share of failing traces (0..1) has the pattern.", gt=0,
                               le=1)
    min_lift: float = Field(1.0, ge=0, description="And the pattern is this many times likelier among failures "
                                                   "than passes (1.0: any).")


class When(_Strict):
    """Which traces an action applies to, or which windows (`spike`, `pattern`)."""

    evaluator: str | None = Field(None, description="Evaluator key whose score is compared.")
    span: str | None = Field(None, description="With a span evaluator: only the scores of spans with this name.")
    below: float | None = Field(None, strict=True)
    above: float | None = Field(None, strict=True)
    failing: bool | None = Field(None, description="true: every failing trace.")
    spike: bool | None = Field(None, description="true: once per spike episode (and once when it recovers).")
    root_cause: RootCause | None = Field(None, description="Failing traces whose culprit span matches.")
    pattern: PatternBound | None = Field(None, description="Once per window and failure mode whose share of "
                                                           "failures passes `share_above`.")

    @model_validator(mode="after")
    def _says_something(self) -> When:
        window_level = [k for k in ("spike", "pattern") if getattr(self, k)]
        if window_level:
            other = [k for k in ("evaluator", "span", "below", "above", "failing", "root_cause", "spike", "pattern")
                     if getattr(self, k) is not None and k != window_level[0]]
            if len(window_level) > 1 or other:
                raise ValueError(f"`when: {{{window_level[0]}: ...}}` is about the window; it takes no "
                                 f"{', '.join(other)}")
            return self
        if self.evaluator is None and not self.failing and self.root_cause is None:
            raise ValueError("a `when` needs an evaluator with below/above, `failing: true`, `root_cause:`, "
                             "`pattern:` or `spike: true`")
        if self.evaluator is not None and self.below is None and self.above is None:
            raise ValueError(f"`when: {{evaluator: {self.evaluator}}}` needs `below:` or `above:`")
        if self.below is not None and self.above is not None and self.below <= self.above:
            raise ValueError(f"`when: {{below: {self.below}, above: {self.above}}}` matches no score (none is below "
                             f"{self.below} and above {self.above} at once); for either side, write two rules")
        if self.span is not None and self.evaluator is None:
            raise ValueError(f"`when: {{span: {self.span}}}` compares a span evaluator's score: add `evaluator:` and "
                             f"`below:` or `above:` (or use `root_cause: {{span: {self.span}}}`)")
        return self

    @property
    def is_window_level(self) -> bool:
        return bool(self.spike or self.pattern)


RUN_ACTIONS = ("feedback", "annotation_queue", "dataset")  # they act on runs, so never on a whole window
SLACK_WEBHOOK_ENV = "SLACK_WEBHOOK_URL"
SLACK_TOKEN_ENV = "SLACK_BOT_TOKEN"


class ActionConfig(_Strict):
    when: When
    do: Literal["log", "call", "feedback", "annotation_queue", "dataset", "webhook", "slack", "prefect_event"] = Field(
        description="'log': the local action log; 'call': a Python function; 'feedback': LangSmith feedback on the "
                    "run; 'annotation_queue': a LangSmith review queue; 'dataset': LangSmith dataset examples; "
                    "'webhook': a signed POST to `url`; 'slack': a Block Kit message; 'prefect_event': a Prefect "
                    "event for Automations.")
    ref: str | None = Field(None, description="For do: call, the function 'package.module:function'.")
    name: str | None = Field(None, description="Action name used in its id; defaults to `do` and its index.")
    key: str | None = Field(None, description="For do: feedback, the feedback key; default the rule's evaluator.")
    on_culprit: bool = Field(False, description="For do: feedback, also give feedback on the culprit span.")
    queue: str | None = Field(None, description="For do: annotation_queue, the queue's name (created if missing).")
    rubric: str | None = Field(None, description="For do: annotation_queue, rubric instructions of a new queue.")
    dataset: str | None = Field(None, description="For do: dataset, the dataset's name (created if missing).")
    url: str | None = Field(None, description="For do: webhook, the receiver (https, or http to localhost).")
    secret_env: str | None = Field(None, description="For do: webhook, the env variable holding the HMAC secret.")
    secret_block: str | None = Field(None, description="For do: webhook, a Prefect Secret block holding it.")
    batch: int = Field(100, ge=1, le=1000, description="For do: webhook, failing runs per request.")
    block: str | None = Field(None, description="For do: slack, a prefect-slack SlackWebhook block; else "
                                                "`credentials`, else $SLACK_WEBHOOK_URL, else $SLACK_BOT_TOKEN.")
    credentials: str | None = Field(None, description="For do: slack, a prefect-slack SlackCredentials block (bot "
                                                      "token); posts with chat.postMessage to `channel`.")
    channel: str | None = Field(None, description="For do: slack with a bot token, the channel, e.g. #llm-oncall.")
    api_url: str | None = Field(None, description="For do: slack with a bot token, the Slack Web API base URL "
                                                  "(default https://slack.com/api/).")
    include_io: bool = Field(False, description="For do: slack, show the example traces' inputs and outputs.")
    cooldown: str = Field("1h", description="For when: spike, the spike-free time that ends an episode (and "
                                            "sends the recovery); a spike within it does not alert again.",
                          json_schema_extra=DURATION_SCHEMA)
    event: str | None = Field(None, description="For do: prefect_event, the event name; default "
                                                "tracetriage.action.ACTION-NAME.")
    sample: float = Field(1.0, gt=0, le=1, description="Act on this fraction of the matching traces, chosen by "
                                                       "action id (a rerun chooses the same ones).")
    max_per_window: int | None = Field(None, ge=1, description="Act on at most this many traces per window.")

    @model_validator(mode="after")
    def _has_its_target(self) -> ActionConfig:
        needs = {"call": ("ref", "package.module:function"), "annotation_queue": ("queue", "NAME"),
                 "dataset": ("dataset", "NAME"), "webhook": ("url", "https://...")}
        if self.do in needs and not getattr(self, needs[self.do][0]):
            field, example = needs[self.do]
            raise ValueError(f"`do: {self.do}` needs `{field}: {example}`")
        if self.when.is_window_level and self.do in RUN_ACTIONS:
            kind = "spike: true" if self.when.spike else "pattern: ..."
            raise ValueError(f"`do: {self.do}` acts on runs; `when: {{{kind}}}` is about a window")
        if self.do == "webhook":
            check_url(self.url)
            if bool(self.secret_env) == bool(self.secret_block):
                raise ValueError("`do: webhook` needs one of `secret_env: VARIABLE` or `secret_block: NAME`")
        if self.do == "slack":
            if self.block and self.credentials:
                raise ValueError("`do: slack` takes `block:` (an incoming webhook) or `credentials:` (a bot token), "
                                 "not both")
            if self.credentials and not self.channel:
                raise ValueError("`do: slack` with `credentials:` (a bot token) needs `channel: '#name'`")
            if self.api_url is not None:
                if not is_allowed_url(self.api_url):  # the bot token goes with every request
                    raise ValueError(f"`do: slack` api_url {self.api_url!r} must use https (http is allowed only to "
                                     f"localhost)")
        if parse_duration(self.cooldown) <= timedelta(0):
            raise ValueError(f"cooldown {self.cooldown!r} must be longer than zero, e.g. '1h'")
        return self

    @property
    def writes_to_langsmith(self) -> bool:
        return self.do in RUN_ACTIONS

    @property
    def cooldown_delta(self) -> timedelta:
        return parse_duration(self.cooldown)


class SnapshotConfig(_Strict):
    url: str | None = Field(
        None, description="Where snapshots go: a directory, s3://bucket/prefix or gs://bucket/prefix; "
                          "defaults to the snapshots folder in the flow's `out` directory."
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options for the URL (endpoint_url, region, ...); put credentials in a block or env.",
    )
    block: str | None = Field(None, description="Name of a SnapshotStorage block that holds the URL and credentials.")
    spans: bool = Field(False, description="Also keep every span of each window (the `spans` table).")

    @model_validator(mode="after")
    def _url_or_block(self) -> SnapshotConfig:
        if self.block and (self.url or self.storage_options):
            raise ValueError("snapshots: give `block:` or `url:`/`storage_options:`, not both")
        return self


class SpikeConfig(_Strict):
    """When a window's failure rate departs from its trailing baseline (see README, "Spikes")."""

    baseline_windows: int = Field(24, ge=2, description="Trailing windows the current one is compared with.")
    min_baseline_windows: int = Field(6, ge=2, description="Fewer past windows than this: no spike check.")
    min_failing_traces: int = Field(20, ge=1, description="A series needs this many failures in the window to spike.")
    max_p_value: float = Field(
        1e-6, gt=0, lt=1,
        description="The sensitivity: a rate spikes when the chance of it under the baseline is below this. "
                    "Larger values alert on smaller departures.",
    )
    min_ratio: float = Field(1.5, ge=1, description="And only when the rate is at least this multiple of baseline.")
    new_mode_share: float = Field(
        0.25, gt=0, le=1, description="A failure mode absent from the baseline that now holds this share of "
                                      "failures is a new failure mode.",
    )


class RunnerConfig(_Strict):
    """Where a window's tasks run: a bounded thread pool here, or an existing Dask cluster."""

    kind: Literal["threads", "dask"] = Field("threads", description="'threads' (default) or 'dask'.")
    address: str | None = Field(None, description="For dask: the scheduler, e.g. tcp://10.0.0.5:8786; else "
                                                  "$TRACETRIAGE_DASK_ADDRESS.")
    threads: int = Field(4, ge=1, le=64, description="For threads: the pool's size.")

    @model_validator(mode="after")
    def _dask_has_an_address(self) -> RunnerConfig:
        if self.kind == "dask" and not (self.address or os.environ.get("TRACETRIAGE_DASK_ADDRESS")):
            raise ValueError("runner `kind: dask` needs `address: tcp://host:8786` or $TRACETRIAGE_DASK_ADDRESS")
        return self

    @property
    def dask_address(self) -> str | None:
        return (self.address or os.environ.get("TRACETRIAGE_DASK_ADDRESS")) if self.kind == "dask" else None


class LoopConfig(_Strict):
    """A feedback loop: where runs come from, how they are scored, and what happens to failures."""

    name: str = Field("tracetriage", description="Loop name: part of every action id and of the ledger's path.")
    source: Source = Field(default_factory=SampleSource)
    window: WindowConfig = Field(default_factory=WindowConfig)
    evaluators: list[EvaluatorConfig] = Field(
        default_factory=lambda: default_evaluators(),
        description="Evaluators; the default is the built-in set tuned to the sample traces. Edit or add to the "
                    "list: it replaces the default set as a whole.",
        json_schema_extra=lambda schema: schema.update(default=_form_default(default_evaluators())),
    )
    actions: list[ActionConfig] = Field(
        default_factory=lambda: default_actions(),
        description="Rules: which traces get which action. The default writes each failing trace to the action log.",
        json_schema_extra=lambda schema: schema.update(default=_form_default(default_actions())),
    )
    snapshots: SnapshotConfig = Field(default_factory=SnapshotConfig)
    spikes: SpikeConfig = Field(default_factory=SpikeConfig)
    runner: RunnerConfig = Field(default_factory=RunnerConfig, description="Where a window's tasks run.")
    batch_size: int = Field(2000, ge=1, description="Traces per evaluation task (grown to keep at most 16 tasks).")
    eval_workers: int = Field(
        0, ge=0, le=256, description="Processes that evaluate batches: 0 is one per core, 1 evaluates in-process."
    )
    max_worker_memory: str | None = Field(
        None, description="Resident memory an evaluation worker process may reach, e.g. '2GB' or '512MB': a worker "
                          "over it is replaced, and the runs it was scoring become error rows."
    )

    @field_validator("max_worker_memory")
    @classmethod
    def _memory_is_size(cls, value: str | None) -> str | None:
        if value is not None:
            parse_size(value)
        return value

    @property
    def max_worker_memory_bytes(self) -> int | None:
        return None if self.max_worker_memory is None else parse_size(self.max_worker_memory)

    @field_validator("name")
    @classmethod
    def _name_is_plain(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", value) or not value.strip("."):
            raise ValueError(f"loop name {value!r} must be letters, digits, '_', '-' or '.', and not only dots "
                             f"(it names directories of the ledger)")
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> LoopConfig:
        keys = [e.key for e in self.evaluators]
        duplicates = sorted({k for k in keys if keys.count(k) > 1})
        if duplicates:
            raise ValueError(f"evaluator keys must be unique; {duplicates} appear more than once")
        if not any(e.is_root for e in self.evaluators):
            raise ValueError("at least one evaluator needs `target: root`: root evaluators decide pass/fail")
        for i, action in enumerate(self.actions):
            name = action.when.evaluator
            if name is not None and name not in keys:
                hint = difflib.get_close_matches(name, keys, n=1)
                fix = f"; did you mean {hint[0]!r}?" if hint else f"; known keys: {keys}"
                raise ValueError(f"actions[{i}].when.evaluator {name!r} is not an evaluator key{fix}")
            if action.when.span is not None and next(e for e in self.evaluators if e.key == name).is_root:
                raise ValueError(f"actions[{i}].when.span: evaluator {name!r} scores root runs; `span:` needs an "
                                 f"evaluator with a span target")
        names = [a.name for a in self.actions if a.name]
        if len(names) != len(set(names)):
            raise ValueError("action names must be unique")
        if any(e.feedback_key for e in self.evaluators):
            if isinstance(self.source, LangSmithSource):
                self.source.feedback_stats = True  # the scores come with the runs: no request of their own
            elif isinstance(self.source, SampleSource):
                raise ValueError("a `langsmith:feedback/<key>` evaluator reads scores from LangSmith runs; the "
                                 "sample source has none")
        return self

    @property
    def rule_evaluators(self) -> list[str]:
        """The evaluators that action rules name (their scores are kept for dispatch)."""
        return [a.when.evaluator for a in self.actions if a.when.evaluator]

    def action_name(self, index: int) -> str:
        action = self.actions[index]
        return action.name or f"{action.do}-{index}"



def _form_default(models: list[BaseModel]) -> list[dict[str, Any]]:
    """Defaults as the JSON schema shows them, so a form starts from them instead of an empty list."""
    return [m.model_dump(mode="json", exclude_defaults=True) for m in models]


def default_actions() -> list[ActionConfig]:
    """Every failing trace to the local action log."""
    return [ActionConfig(when=When(failing=True), do="log", name="log-failures")]


def default_evaluators() -> list[EvaluatorConfig]:
    """Built-in evaluators that need no LLM, tuned to the sample RAG/agent traces."""
    return [
        EvaluatorConfig(key="answer_grounded", ref="builtin:groundedness", threshold=0.5),
        EvaluatorConfig(key="answer_relevant", ref="builtin:retrieval_relevance", threshold=0.3),
        EvaluatorConfig(key="no_error", ref="builtin:error_free", threshold=1.0),
        EvaluatorConfig(
            key="latency_ok", ref="builtin:latency_slo", params={"max_seconds": 8.0}, threshold=1.0
        ),
        EvaluatorConfig(
            key="retrieval_relevance",
            ref="builtin:retrieval_relevance",
            threshold=0.3,
            target=SpanTarget(run_type="retriever"),
        ),
        EvaluatorConfig(
            key="span_latency",
            ref="builtin:latency_slo",
            params={"max_seconds": 2.0},
            threshold=1.0,
            target=SpanTarget(name="rerank"),
        ),
        EvaluatorConfig(
            key="groundedness",
            ref="builtin:groundedness",
            threshold=0.5,
            target=SpanTarget(name="answer_llm"),
        ),
    ]


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def is_allowed_url(url: str) -> bool:
    """https to a host, or plain http to this machine only (tests, a local relay)."""
    parsed = urlparse(url)
    return bool(parsed.netloc) and (parsed.scheme == "https"
                                    or (parsed.scheme == "http" and is_loopback(parsed.hostname or "")))


def check_url(url: str) -> str:
    """Webhooks go over https; plain http only to this machine."""
    if is_allowed_url(url):
        return url
    raise ConfigError(f"webhook url {url!r} must use https (http is allowed only to localhost)")


class ConfigError(ValueError):
    """A config or input that cannot run; the message names the field, file or argument and the fix.

    The base of every error a user fixes in what they gave (the config, a flag, a file, a secret, an evaluator
    ref): the CLI prints its message without a traceback and exits 2. Any other exception is a bug: the CLI shows
    its traceback and exits 1.
    """


def load_block(block_type: Any, name: str, field: str) -> Any:
    """The saved Prefect block `name` of `block_type`; a ConfigError naming the config field when it cannot load
    (Prefect raises a bare ValueError for a name that was never saved)."""
    try:
        return block_type.load(name)
    except ValueError as exc:
        raise ConfigError(f"{field} {name!r}: {exc}") from None


def _all_field_names() -> set[str]:
    names: set[str] = set()
    for cls in (LoopConfig, FileSource, SampleSource, LangSmithSource, RateLimit, WindowConfig, SpanTarget,
                EvaluatorConfig, CallRateLimit, CallRetry, When, RootCause, ActionConfig, SnapshotConfig, SpikeConfig,
                RunnerConfig):
        names.update(cls.model_fields)
    return names


def describe_validation_error(error: ValidationError, origin: str) -> str:
    """One line per problem: where it is, what is wrong, and the fix where one can be guessed."""
    lines = [f"invalid config in {origin}:"]
    items = error.errors()

    for item in items:
        loc = [str(p) for p in item["loc"]]
        if loc and "literal[" in loc[-1] and not isinstance(item.get("input"), str):
            continue  # `target` was a mapping: the SpanTarget branch's error says more
        if item["type"] == "model_type" and isinstance(item.get("input"), str):
            continue  # `target` was a string: the literal branch's error ("should be 'root'") says more
        tags = {i for i in range(1, len(loc)) if loc[i - 1] == "source" and loc[i] in ("file", "sample", "langsmith")}
        where = ".".join(p for i, p in enumerate(loc) if not p.startswith("function-") and i not in tags)
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            hint = difflib.get_close_matches(loc[-1], sorted(_all_field_names()), n=1)
            message = f"unknown field{f'; did you mean {hint[0]!r}?' if hint else ''}"
        lines.append(f"  {where or '(top level)'}: {message}")

    return "\n".join(lines)


def load_config(path: str | Path | None = None, data: dict[str, Any] | None = None) -> LoopConfig:
    """The loop config from a YAML file (or a dict), validated; raises ConfigError naming the field."""
    origin = str(path) if path else "config"
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except IsADirectoryError:
            raise ConfigError(f"config file {path} is a directory; give the path of its YAML file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} cannot be read: {exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin} must be a YAML mapping, got {type(data).__name__}")
    try:
        config = LoopConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, origin)) from None
    if path is not None and isinstance(config.source, FileSource) and not Path(config.source.path).is_absolute():
        # A relative source path in a config file means: next to the config file.
        resolved = (Path(path).parent / Path(config.source.path).expanduser()).resolve()
        config = config.model_copy(update={"source": FileSource(path=str(resolved))})
    return config
