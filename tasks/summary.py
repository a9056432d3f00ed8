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
    # Conditions as common among passing traces (lift near 1) are not failure modes; the JSON keeps them all.
    telling = [p for p in window["patterns"] if p["lift"] is None or p["lift"] >= MIN_LIFT]
    if telling:
        lines.append(f"  failure modes (over-represented among failures, lift >= {MIN_LIFT}):")
        for pattern in telling[:top]:
            lift = "-" if pattern["lift"] is None else f"{pattern['lift']:.1f}x"
            lines.append(f"    {pattern['fail_share']:6.1%} of failures vs {pattern['pass_share'] or 0:6.1%} of passes "
                         f"(lift {lift})  {pattern['condition']}"
                         + (f" ({pattern['detail']})" if pattern.get("detail") else ""))
    lines += spike_lines(window.get("spike"))
    a = window["actions"]
    lines.append(f"  actions: {a['planned']} planned, {a['sent']} sent, {a['skipped_duplicate']} already done, "
                 f"{a['failed']} failed" + (f", {a['not_sampled']} not sampled" if a.get("not_sampled") else "")
                 + (f", {a['over_cap']} over the cap" if a.get("over_cap") else ""))
    if a.get("ledger_damaged"):
        lines.append(f"    LEDGER DAMAGED: {a['ledger_damaged']} entries could not be read; what they may hide "
                     "was sent again under its first idempotency keys (see docs/reliability.md)")
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
    fence = _fence(text, 1)
    return f"{fence} {text} {fence}" if "`" in text else f"`{text}`"


def _fence(text: str, least: int) -> str:
    return "`" * max(least, max((len(run) for run in re.findall("`+", text)), default=0) + 1)


def summary_markdown(window: dict[str, Any]) -> str:
    text = summary_text(window, top=TOP)  # in a code block, so trace text shows as text
    lines = [f"# Triage of {md(window['window_start'])}", "", _fence(text, 3), text, _fence(text, 3), ""]
    if window["root_causes"]:
        lines += ["## Example failing traces", ""]
        for cause in window["root_causes"][:TOP]:
            urls = cause.get("example_trace_urls") or [None] * len(cause["example_trace_ids"])
            ids = ", ".join(f"[{md(t, code=True)}]({quote(u, safe=':/?&=#%')})" if u else md(t, code=True)
                            for t, u in zip(cause["example_trace_ids"], urls, strict=True))
            lines.append(f"- **{md(cause['span_name'])}** ({cause['reason']}): {ids}")
    lines += ["", f"Snapshot: {md(window['snapshot_uri'])}"]
    return "\n".join(lines)


def _artifact_key(window_start: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in window_start.lower())[:40].strip("-")


def window_resource(loop: str, window_start: str) -> dict[str, str]:
    """The Prefect event resource of a loop's window."""
    return {"prefect.resource.id": f"tracetriage.window.{loop}.{window_start}",
            "prefect.resource.name": f"{loop} {window_start}", "tracetriage.loop": loop,
            "tracetriage.window_start": window_start}


def window_events(window: dict[str, Any], loop: str) -> list[dict[str, Any]]:
    """Prefect events for a triaged window, and for its spike: what Automations trigger on.

    Ids are uuid5 of loop, window and event, so a rerun repeats the same event and Prefect keeps it once.
    """
    start = window["window_start"]
    resource = window_resource(loop, start)
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
        event["id"] = uuid.uuid5(uuid.NAMESPACE_URL, f"tracetriage/{loop}/{start}/{event['event']}")
    return events


@task(name="publish-artifacts", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def publish_artifacts(window: dict[str, Any], loop: str = "tracetriage") -> None:
    for event in window_events(window, loop):
        emit_event(**event)
    key = _artifact_key(window["window_start"])
    rows = [{k: v for k, v in p.items() if k != "example_trace_ids"} for p in window["patterns"][:TOP]]
    create_table_artifact(table=rows or [{"condition": "no failures"}], key=f"patterns-{key}",
                          description=f"Top failure patterns, window {window['window_start']}")
    create_markdown_artifact(markdown=summary_markdown(window), key=f"summary-{key}",
                             description=f"Triage summary, window {window['window_start']}")
