"""The window summary (the CLI's JSON and text output) and the Prefect artifacts made from it."""

from __future__ import annotations

import re
import string
import uuid
from datetime import datetime
from typing import Any
from urllib.parse import quote

import pandas as pd
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from tasks.config import EvaluatorConfig
from tasks.report import REASONS

TOP = 10
MIN_LIFT = 1.2


def _records(frame: pd.DataFrame, columns: list[str]) -> list[dict[str, Any]]:
    out = []
    for row in frame[columns].to_dict("records"):
        out.append({k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()})
    return out


def window_summary(
    window_start: datetime, window_end: datetime, traces: int, spans: int, skipped: int,
    status_counts: dict[tuple[str, str], int], verdicts: pd.DataFrame, configs: list[EvaluatorConfig],
    root_causes: pd.DataFrame, patterns: pd.DataFrame, actions: dict[str, int], spike: dict[str, Any] | None,
    snapshot_uri: str, trace_url: str | None = None,
) -> dict[str, Any]:
    """The window's JSON summary; with `trace_url` (a LangSmith source), example traces come with their links."""
    evaluators = {
        c.key: {"threshold": c.threshold,
                **{s: int(status_counts.get((c.key, s), 0)) for s in ("pass", "fail", "error")}}
        for c in configs
    }
    patterns = patterns.assign(example_trace_ids=patterns["example_trace_ids"].map(list))
    root_causes = root_causes.assign(example_trace_ids=root_causes["example_trace_ids"].map(list))
    summary = {
        "window_start": window_start.isoformat(),
        "window_end": window_end.isoformat(),
        "traces": traces,
        "spans": spans,
        "skipped_records": skipped,
        "evaluators": evaluators,
        "failing_traces": int((verdicts["verdict"] == "fail").sum()),
        "root_causes": _records(root_causes, ["span_name", "reason", "traces", "share", "example_trace_ids"]),
        "patterns": _records(patterns, ["condition", "kind", "span_name", "detail", "failing_traces", "fail_share",
                                        "pass_share", "lift", "example_trace_ids"]),
        "actions": actions,
        "spike": spike,
        "snapshot_uri": snapshot_uri,
    }
    if trace_url:
        summary["trace_url"] = trace_url  # Slack links any trace a rule matched, not only these examples
        for item in summary["root_causes"] + summary["patterns"]:
            item["example_trace_urls"] = [f"{trace_url}{t}?trace_id={t}" for t in item["example_trace_ids"]]
    return summary


def summary_text(window: dict[str, Any], top: int = 5) -> str:
    """A readable block for one window."""
    failing, traces = window["failing_traces"], window["traces"]
    rate = failing / traces if traces else 0.0
    lines = [
        f"window {window['window_start']} .. {window['window_end']}: {traces} traces, {window['spans']} spans, "
        f"{failing} failing ({rate:.1%}), {window['skipped_records']} records skipped",
        "  evaluators: " + ", ".join(
            f"{k} {v['pass']}/{v['fail']}/{v['error']}" for k, v in window["evaluators"].items()
        ) + "  (pass/fail/error)",
    ]
    if window["root_causes"]:
        lines.append("  root causes:")
        for cause in window["root_causes"][:top]:
            share, span, reason = cause["share"], cause["span_name"], cause["reason"]
            lines.append(f"    {share:6.1%}  {span} ({reason}), {cause['traces']} traces")
    telling = telling_patterns(window)
    if telling:
        lines.append(f"  failure modes (over-represented among failures, lift >= {MIN_LIFT}):")
        for pattern in telling[:top]:
            lines.append(f"    {pattern['fail_share']:6.1%} of failures vs {pattern['pass_share'] or 0:6.1%} of passes "
                         f"(lift {_lift(pattern)})  {pattern['condition']}"
                         + (f" ({pattern['detail']})" if pattern.get("detail") else ""))
    lines += spike_lines(window.get("spike"))
    a = window["actions"]
    lines.append(f"  actions: {actions_line(a)}")
    if a.get("ledger_damaged"):
        lines.append(f"    {ledger_damaged_line(a)}")
    for action, failure in (a.get("failures") or {}).items():
        lines.append(f"    FAILED {action}: {failure['count']} actions, e.g. {failure['error']} "
                     "(tried again on the next run)")
    return "\n".join(lines)


def skipped_text(skipped: dict[str, dict[str, Any]], top: int = 3) -> str | None:
    """The source's skipped records in one line: how many, and the top reasons with where they occurred."""
    total = sum(item["count"] for item in skipped.values())
    if not total:
        return None
    reasons = sorted(skipped.items(), key=lambda item: -item[1]["count"])
    shown = [f"{item['count']} {reason}" + (f" (e.g. {', '.join(item['examples'])})" if item["examples"] else "")
             for reason, item in reasons[:top]]
    more = f", and {len(reasons) - top} more reasons (see --json)" if len(reasons) > top else ""
    return f"skipped {total} records of the source: " + "; ".join(shown) + more


def spike_lines(spike: dict[str, Any] | None) -> list[str]:
    """What spiked, by how much, against which baseline; nothing when the window is ordinary."""
    if not spike:
        return []
    base = spike["baseline"]
    lines = [f"  SPIKE against the {base['windows']} windows {base['from']} .. {base['to']}:"]
    for s in spike["series"]:
        lines.append(f"    {s['series']}: {s['rate']:.1%} vs baseline {s['baseline_rate']:.1%} "
                     f"({s['ratio']:.1f}x, z={s['z']:.1f}, p={s['p_value']:.1e}, {s['failing']}/{s['total']})")
    for mode in spike["new_failure_modes"]:
        lines.append(f"    new failure mode {mode['series']}: {mode['share']:.1%} of failures "
                     f"(at most {mode['baseline_max_share']:.1%} before)")
    return lines


_PUNCTUATION = re.compile(f"([{re.escape(string.punctuation)}])")


def md(value: Any, code: bool = False) -> str:
    """Text from traces or config as markdown that shows it as it is: no HTML, links, emphasis or mentions.

    As text, every ASCII punctuation mark is backslash-escaped; as `code` (a code span, where escapes do not
    apply), the fence is longer than any run of backticks inside."""
    text = str(value)
    if not code:
        return _PUNCTUATION.sub(r"\\\1", text)
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}" if "`" in text else f"`{text}`"


def one_line(value: Any) -> str:
    """Text from the traces or config on one line, so a newline in a span name cannot break a list item or a table
    row. Table artifacts show their cells as text: this is all they need."""
    return " ".join(str(value).split())


def trace_text(value: Any, code: bool = False) -> str:
    """Text that comes from the traces or config (span names, conditions, metadata values, ids) as markdown shows
    it: on one line, and escaped."""
    return md(one_line(value), code=code)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _lift(pattern: dict[str, Any]) -> str:
    return "-" if pattern["lift"] is None else f"{pattern['lift']:.1f}x"


def _cause_label(cause: dict[str, Any]) -> str:
    return f"{cause['span_name']} ({REASONS.get(cause['reason'], cause['reason'])})"


def _condition(pattern: dict[str, Any]) -> str:
    detail = f" ({pattern['detail']})" if pattern.get("detail") else ""
    return one_line(f"{pattern['condition']}{detail}")


def telling_patterns(window: dict[str, Any]) -> list[dict[str, Any]]:
    """The failure modes: patterns over-represented among failures (lift >= MIN_LIFT, or no passing trace to
    compare with). A condition as common among passes (lift near 1) is not a failure mode; the JSON and the
    snapshot keep every pattern."""
    return [p for p in window["patterns"] if p["lift"] is None or p["lift"] >= MIN_LIFT]


def actions_line(actions: dict[str, Any]) -> str:
    return (f"{actions['planned']} planned, {actions['sent']} sent, {actions['skipped_duplicate']} already done, "
            f"{actions['failed']} failed" + (f", {actions['not_sampled']} not sampled" if actions.get("not_sampled")
                                             else "")
            + (f", {actions['over_cap']} over the cap" if actions.get("over_cap") else ""))


def ledger_damaged_line(actions: dict[str, Any]) -> str:
    return (f"LEDGER DAMAGED: {actions['ledger_damaged']} entries could not be read; what they may hide was sent "
            "again under its first idempotency keys (see docs/reliability.md)")


def summary_markdown(window: dict[str, Any]) -> str:
    """The window's summary in markdown that wraps (no code block): counts, evaluators, root causes, failure modes,
    spike, actions and example traces. Every text from traces or config is escaped."""
    failing, traces = window["failing_traces"], window["traces"]
    lines = [f"# Triage of {window['window_start']} .. {window['window_end']}", "",
             f"**{traces}** traces, {window['spans']} spans, **{failing} failing "
             f"({_percent(failing / traces if traces else 0.0)})**, {window['skipped_records']} records skipped.", "",
             "| evaluator | threshold | pass | fail | error |", "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {trace_text(key)} | {v['threshold']} | {v['pass']} | {v['fail']} | {v['error']} |"
              for key, v in window["evaluators"].items()]
    if window["root_causes"]:
        lines += ["", "## Root causes", ""]
        lines += [f"- **{_percent(c['share'])}** {trace_text(_cause_label(c))}, {c['traces']} traces"
                  for c in window["root_causes"][:TOP]]
    telling = telling_patterns(window)
    if telling:
        lines += ["", f"## Failure modes (lift at least {MIN_LIFT})", ""]
        lines += [f"- **{_percent(p['fail_share'])}** of failures vs {_percent(p['pass_share'] or 0.0)} of passes "
                  f"(lift {_lift(p)}): {trace_text(_condition(p))}" for p in telling[:TOP]]
    spike = spike_lines(window.get("spike"))
    if spike:
        lines += ["", "## Spike", ""] + [f"- {trace_text(line)}" for line in spike]
    lines += ["", "## Actions", "", f"- {actions_line(window['actions'])}"]
    if window["actions"].get("ledger_damaged"):
        lines.append(f"- {ledger_damaged_line(window['actions'])}")
    lines += [f"- FAILED {trace_text(action)}: {f['count']} actions, e.g. {trace_text(f['error'])} "
              "(tried again on the next run)" for action, f in (window["actions"].get("failures") or {}).items()]
    if window["root_causes"]:
        lines += ["", "## Example failing traces", ""]
        for cause in window["root_causes"][:TOP]:
            urls = cause.get("example_trace_urls") or [None] * len(cause["example_trace_ids"])
            ids = ", ".join(f"[{trace_text(t, code=True)}]({quote(u, safe=':/?&=#%')})" if u
                            else trace_text(t, code=True)
                            for t, u in zip(cause["example_trace_ids"], urls, strict=True))
            lines.append(f"- **{trace_text(_cause_label(cause))}**: {ids}")
    lines += ["", f"Snapshot: {trace_text(window['snapshot_uri'], code=True)}"]
    return "\n".join(lines)


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) of the loop and what the artifact is about, so
    two loops on one server never overwrite each other's artifacts."""
    slug = "".join(ch if ch.isalnum() else "-" for ch in "-".join(parts).lower())
    return "-".join(part for part in slug.split("-") if part)


def patterns_rows(window: dict[str, Any]) -> list[dict[str, Any]]:
    """The patterns table as a person reads it: the failure modes only, percentages, four narrow columns."""
    return [{"failure mode": _condition(p), "of failures": _percent(p["fail_share"]),
             "of passes": _percent(p["pass_share"] or 0.0), "lift": _lift(p)} for p in telling_patterns(window)[:TOP]]


def rollup_row(window: dict[str, Any], run_url: str | None) -> dict[str, Any]:
    """One window in the roll-up of the run a person started."""
    traces, failing = window["traces"], window["failing_traces"]
    cause = window["root_causes"][0] if window["root_causes"] else None
    spike = window.get("spike")
    return {"window": window["window_start"][:16].replace("T", " "), "traces": traces,
            "failing": _percent(failing / traces if traces else 0.0),
            "top root cause": f"{one_line(_cause_label(cause))} {_percent(cause['share'])}" if cause else "none",
            "spike": ", ".join(s["series"] for s in spike["series"] + spike["new_failure_modes"]) if spike else "no",
            "actions": f"{window['actions']['sent']} sent, {window['actions']['failed']} failed",
            "run": run_url or ""}


def rollup_text(rows: list[dict[str, Any]]) -> str:
    """The roll-up as the run's last log lines show it."""
    if not rows:
        return "no windows triaged"
    return pd.DataFrame(rows).to_string(index=False)


def window_resource(loop: str, window_start: str) -> dict[str, str]:
    """The Prefect event resource of a loop's window."""
    return {"prefect.resource.id": f"tracetriage.window.{loop}.{window_start}",
            "prefect.resource.name": f"{loop} {window_start}", "tracetriage.loop": loop,
            "tracetriage.window_start": window_start}


def window_events(window: dict[str, Any], loop: str, source: str) -> list[dict[str, Any]]:
    """Prefect events for a triaged window, and for its spike: what Automations trigger on.

    Ids are uuid5 of the source's identity, loop, window and event: a rerun repeats the same event and Prefect
    keeps it once, while two sources triaged under one loop name never drop each other's events.
    """
    start = window["window_start"]
    resource = {**window_resource(loop, start), "tracetriage.source": source}
    evaluators = [{"prefect.resource.id": f"tracetriage.evaluator.{key}", "prefect.resource.role": "evaluator"}
                  for key in window["evaluators"]]
    rate = window["failing_traces"] / window["traces"] if window["traces"] else 0.0
    events = [{"event": "tracetriage.window.triaged", "resource": resource, "related": evaluators,
               "payload": {"traces": window["traces"], "failing_traces": window["failing_traces"],
                           "failure_rate": rate, "actions": window["actions"], "spike": window["spike"] is not None}}]
    if window["spike"]:
        spiked = [s["series"] for s in window["spike"]["series"]] + \
                 [m["series"] for m in window["spike"]["new_failure_modes"]]
        events.append({"event": "tracetriage.spike.detected", "resource": resource, "payload": window["spike"],
                       "related": [{"prefect.resource.id": f"tracetriage.series.{name}",
                                    "prefect.resource.role": "pattern" if name.startswith(("pattern:", "root_cause:"))
                                    else "evaluator"} for name in spiked]})
    for event in events:
        event["id"] = uuid.uuid5(uuid.NAMESPACE_URL, f"tracetriage/{source}/{loop}/{start}/{event['event']}")
    return events


@task(name="publish-artifacts", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def publish_artifacts(window: dict[str, Any], loop: str, source: str) -> None:
    for event in window_events(window, loop, source):
        emit_event(**event)
    start = window["window_start"]
    rows = patterns_rows(window)
    hidden = len(window["patterns"]) - len(telling_patterns(window))
    create_table_artifact(
        table=rows or [{"failure mode": "none over-represented among failures"}],
        key=artifact_key(loop, "patterns", start),
        description=f"{loop}: top failure modes, window {start} (lift at least {MIN_LIFT}; {hidden} patterns as "
                    f"common among passes are hidden, the snapshot's patterns table has them all)")
    create_markdown_artifact(markdown=summary_markdown(window), key=artifact_key(loop, "summary", start),
                             description=f"{loop}: triage summary, window {start}")


@task(name="publish-rollup", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def publish_rollup(rows: list[dict[str, Any]], loop: str, period: str) -> None:
    """The roll-up table on the run a person started: one row per window, with a link to the window's run."""
    # A plain URL: the v1 UI links it; v2 shows table cells as text (a markdown link would show raw there).
    create_table_artifact(table=rows or [{"window": "none", "traces": 0}], key=artifact_key(loop, "rollup"),
                          description=f"{loop}: {len(rows)} windows triaged, {period}")
