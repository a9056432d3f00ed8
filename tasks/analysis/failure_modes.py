"""Failure modes: which conditions dominate a window's failures, and the culprit spans' shares.

For each span condition (span × evaluator below threshold, span × error, span
latency outlier, root metadata value) it counts the failing and passing traces
that show it: `fail_share` (among failing traces), `pass_share` (among passing
traces) and `lift = fail_share / pass_share` (null when no passing trace shows
it). Traces whose verdict is `error` (an evaluator could not judge them) are in
neither group. Root causes are the exclusive culprits from attribution.
"""

from __future__ import annotations

from datetime import datetime

import numpy as np
import orjson
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.config import EvaluatorConfig
from tasks.contracts import FailureModes, ScoredWindow, Verdicts
from tasks.memory import release_memory
from tasks.schemas import SCHEMA_VERSION

EXAMPLES = 5
MIN_SPANS_FOR_OUTLIERS = 20
OUTLIER_IQR = 3.0
MAX_METADATA_VALUES = 50


def _below_conditions(scores: pd.DataFrame, configs: list[EvaluatorConfig]) -> pd.DataFrame:
    failed = scores[(scores["status"] == "fail") & ~scores["is_root"]]
    sign = {c.key: ("<" if c.higher_is_better else ">") for c in configs}
    threshold = {c.key: c.threshold for c in configs}
    label = failed["evaluator"].map(lambda k: f"{k} {sign[k]} {threshold[k]:g}")
    return pd.DataFrame({
        "trace_id": failed["trace_id"],
        "condition": failed["span_name"] + ": " + label,
        "kind": "span_below_threshold",
        "span_name": failed["span_name"],
    })


def _error_conditions(spans: pd.DataFrame) -> pd.DataFrame:
    errored = spans[(spans["status"] == "error") & ~spans["is_root"]]
    return pd.DataFrame({
        "trace_id": errored["trace_id"],
        "condition": errored["name"] + ": error",
        "kind": "span_error",
        "span_name": errored["name"],
    })


def latency_cutoffs(spans: pd.DataFrame) -> pd.Series:
    """Per span name, the latency above which a span is an outlier: Q3 + 3 IQR of the window."""
    names, latency, child = _latency_columns(spans)
    cutoffs = {}
    for name in pd.unique(names[child]):
        values = latency[child & (names == name)]
        values = values[~np.isnan(values)]
        if len(values) >= MIN_SPANS_FOR_OUTLIERS:
            q1, q3 = np.quantile(values, [0.25, 0.75])
            cutoffs[name] = q3 + OUTLIER_IQR * (q3 - q1)
    return pd.Series(cutoffs, dtype=float)


def _latency_columns(spans: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (spans["name"].to_numpy(dtype=object), spans["latency_s"].to_numpy(dtype=float, na_value=np.nan),
            ~spans["is_root"].to_numpy(dtype=bool))


def _latency_conditions(spans: pd.DataFrame, cutoffs: pd.Series) -> pd.DataFrame:
    names, latency, child = _latency_columns(spans)
    cutoff = np.full(len(spans), np.inf)
    for name, value in cutoffs.items():
        cutoff[names == name] = value
    slow = spans.loc[child & (latency > cutoff), ["trace_id", "name"]]
    return pd.DataFrame({
        "trace_id": slow["trace_id"],
        "condition": slow["name"] + ": latency outlier",  # the same name every window, for trends
        "kind": "span_latency_outlier",
        "span_name": slow["name"],
    })


def _metadata_conditions(root_metadata: pd.DataFrame) -> pd.DataFrame:
    roots = root_metadata[root_metadata["metadata"].notna()]
    # Metadata texts repeat (a few models and prompt versions): parse each distinct one once.
    pairs = pd.DataFrame(
        [
            (text, key, str(value))
            for text in roots["metadata"].unique()
            for key, value in orjson.loads(text).items()
            if isinstance(value, str | int | float | bool)
        ],
        columns=["metadata", "key", "value"],
    )
    frame = roots.merge(pairs, on="metadata")
    if frame.empty:
        return pd.DataFrame(columns=["trace_id", "condition", "kind", "span_name"])
    distinct = frame.groupby("key")["value"].nunique()
    frame = frame[frame["key"].map(distinct) <= MAX_METADATA_VALUES]
    return pd.DataFrame({
        "trace_id": frame["trace_id"],
        "condition": "metadata." + frame["key"] + " = " + frame["value"],
        "kind": "metadata",
        "span_name": None,
    })


def _examples(frame: pd.DataFrame, by: list[str]) -> pd.Series:
    return frame.sort_values("trace_id").groupby(by, sort=False)["trace_id"].agg(lambda s: list(s[:EXAMPLES]))


def failure_patterns(
    spans: pd.DataFrame, scores: pd.DataFrame, verdicts: pd.DataFrame,
    configs: list[EvaluatorConfig], window_start: datetime, root_metadata: pd.DataFrame,
) -> pd.DataFrame:
    """PATTERNS rows, largest fail_share first."""
    cutoffs = latency_cutoffs(spans)
    conditions = pd.concat(
        [_below_conditions(scores, configs), _error_conditions(spans), _latency_conditions(spans, cutoffs),
         _metadata_conditions(root_metadata)],
        ignore_index=True,
    ).drop_duplicates(["trace_id", "condition"])
    verdict = verdicts.set_index("trace_id")["verdict"]
    conditions["verdict"] = conditions["trace_id"].map(verdict)
    n_fail = int((verdicts["verdict"] == "fail").sum())
    n_pass = int((verdicts["verdict"] == "pass").sum())
    keys = ["condition", "kind", "span_name"]
    conditions["span_name"] = conditions["span_name"].fillna("")
    counts = conditions.groupby(keys + ["verdict"], sort=False).size().unstack("verdict", fill_value=0)
    patterns = counts.reindex(columns=["fail", "pass"], fill_value=0).reset_index()
    patterns = patterns[patterns["fail"] > 0]
    failing = conditions[conditions["verdict"] == "fail"]
    examples = _examples(failing, ["condition"])
    fail_share = patterns["fail"] / n_fail if n_fail else 0.0
    pass_share = patterns["pass"] / n_pass if n_pass else np.nan
    out = pd.DataFrame({
        "window_start": pd.Timestamp(window_start),
        "condition": patterns["condition"],
        "kind": patterns["kind"],
        "span_name": patterns["span_name"].replace("", None),
        "failing_traces": patterns["fail"].astype("int64"),
        "passing_traces": patterns["pass"].astype("int64"),
        "fail_share": fail_share,
        "pass_share": pass_share,
    })
    out["lift"] = (out["fail_share"] / out["pass_share"]).where(out["pass_share"] > 0)
    out["example_trace_ids"] = out["condition"].map(examples)
    outlier = out["kind"] == "span_latency_outlier"
    labels = {name: f"latency > {value:.2f}s" for name, value in cutoffs.items()}
    out["detail"] = out["span_name"].map(labels).where(outlier, None)
    out["schema_version"] = SCHEMA_VERSION
    return out.sort_values(["fail_share", "condition"], ascending=[False, True], ignore_index=True)


def root_cause_shares(attribution: pd.DataFrame, verdicts: pd.DataFrame, window_start: datetime) -> pd.DataFrame:
    """ROOT_CAUSES rows: each (culprit span, reason) and its share of the failing traces."""
    culprits = attribution[attribution["is_culprit"]]
    n_fail = int((verdicts["verdict"] == "fail").sum())
    grouped = culprits.groupby(["span_name", "reason"]).size().rename("traces").reset_index()
    examples = _examples(culprits, ["span_name", "reason"])
    out = pd.DataFrame({
        "window_start": pd.Timestamp(window_start),
        "span_name": grouped["span_name"],
        "reason": grouped["reason"],
        "traces": grouped["traces"].astype("int64"),
        "share": grouped["traces"] / n_fail if n_fail else 0.0,
        "example_trace_ids": [examples[(s, r)] for s, r in zip(grouped["span_name"], grouped["reason"], strict=False)],
        "schema_version": SCHEMA_VERSION,
    })
    return out.sort_values(["share", "span_name"], ascending=[False, True], ignore_index=True)


@task(name="aggregate", cache_policy=NO_CACHE)
def aggregate_task(*, scored: ScoredWindow, verdicts: Verdicts, attribution: pd.DataFrame,
                   configs: list[EvaluatorConfig]) -> FailureModes:
    """The failure modes: patterns among the failures, and the culprit spans' shares."""
    modes = FailureModes(
        patterns=failure_patterns(scored.spans, verdicts.scores, verdicts.traces, configs, scored.window_start,
                                  scored.root_metadata),
        root_causes=root_cause_shares(attribution, verdicts.traces, scored.window_start))
    release_memory()
    return modes
