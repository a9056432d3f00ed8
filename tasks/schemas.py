"""One Arrow schema per table; writers, readers and tests all use these.

Snapshot tables carry `schema_version`. Schemas only grow: a new version adds
columns (or tables) and never renames, drops or narrows one, so readers read every
old partition with the current schema, the missing columns as nulls.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa

if TYPE_CHECKING:
    import pandas as pd

SCHEMA_VERSION = 2
SCHEMA_CHANGES = {
    1: "scores, attribution, patterns, root_causes, windows",
    2: "windows + spike, spike_json; patterns + detail (latency outlier conditions no longer carry the cutoff "
       "in their name); new tables evaluators and spans (optional)",
}

_TS = pa.timestamp("us", tz="UTC")

SPANS = pa.schema(
    [
        ("id", pa.string()),
        ("trace_id", pa.string()),
        ("parent_run_id", pa.string()),
        ("name", pa.string()),
        ("run_type", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("start_time", _TS),
        ("end_time", _TS),
        ("latency_s", pa.float64()),
        ("dotted_order", pa.string()),
        ("session_id", pa.string()),
        ("is_root", pa.bool_()),
        ("total_tokens", pa.int64()),
        ("record_offset", pa.int64()),  # where the run record sits in its JSONL file: parsed only if scored
        ("record_length", pa.int64()),
        ("app_path", pa.string()),
    ]
)

# Root runs' metadata as JSON text, read by evaluation (which parses root records anyway).
ROOT_METADATA = pa.schema([("trace_id", pa.string()), ("metadata", pa.string())])

# One row per (span, evaluator result). Written by evaluate, statuses filled by partition.
SCORES = pa.schema(
    [
        ("window_start", _TS),
        ("trace_id", pa.string()),
        ("run_id", pa.string()),
        ("span_name", pa.string()),
        ("run_type", pa.string()),
        ("dotted_order", pa.string()),
        ("is_root", pa.bool_()),
        ("evaluator", pa.string()),
        ("feedback_key", pa.string()),
        ("score", pa.float64()),
        ("value", pa.string()),
        ("comment", pa.string()),
        ("error", pa.string()),
        ("threshold", pa.float64()),
        ("status", pa.string()),  # pass | fail | error
        ("schema_version", pa.int32()),
    ]
)

# Every candidate culprit of every failing trace; `is_culprit` marks the chosen one.
ATTRIBUTION = pa.schema(
    [
        ("window_start", _TS),
        ("trace_id", pa.string()),
        ("run_id", pa.string()),
        ("span_name", pa.string()),
        ("run_type", pa.string()),
        ("dotted_order", pa.string()),
        ("reason", pa.string()),  # error | below_threshold | no_upstream_cause
        ("evaluator", pa.string()),
        ("score", pa.float64()),
        ("is_culprit", pa.bool_()),
        ("schema_version", pa.int32()),
    ]
)

PATTERNS = pa.schema(
    [
        ("window_start", _TS),
        ("condition", pa.string()),
        ("kind", pa.string()),  # span_below_threshold | span_error | span_latency_outlier | metadata
        ("span_name", pa.string()),
        ("failing_traces", pa.int64()),
        ("passing_traces", pa.int64()),
        ("fail_share", pa.float64()),
        ("pass_share", pa.float64()),
        ("lift", pa.float64()),
        ("example_trace_ids", pa.list_(pa.string())),
        ("schema_version", pa.int32()),
        ("detail", pa.string()),  # since version 2: e.g. the window's latency cutoff of an outlier condition
    ]
)

ROOT_CAUSES = pa.schema(
    [
        ("window_start", _TS),
        ("span_name", pa.string()),
        ("reason", pa.string()),
        ("traces", pa.int64()),
        ("share", pa.float64()),
        ("example_trace_ids", pa.list_(pa.string())),
        ("schema_version", pa.int32()),
    ]
)

WINDOWS = pa.schema(
    [
        ("window_start", _TS),
        ("window_end", _TS),
        ("traces", pa.int64()),
        ("spans", pa.int64()),
        ("skipped_records", pa.int64()),
        ("failing_traces", pa.int64()),
        ("passing_traces", pa.int64()),
        ("error_traces", pa.int64()),
        ("summary_json", pa.string()),
        ("schema_version", pa.int32()),
        ("spike", pa.bool_()),  # since version 2
        ("spike_json", pa.string()),  # since version 2: the spike object of the summary, or null
    ]
)

# One row per evaluator and window: the counts behind the failure-rate and error-rate series.
EVALUATORS = pa.schema(
    [
        ("window_start", _TS),
        ("evaluator", pa.string()),
        ("target", pa.string()),  # root, or the span name / run type it scores
        ("threshold", pa.float64()),
        ("passing", pa.int64()),
        ("failing", pa.int64()),
        ("errors", pa.int64()),
        ("schema_version", pa.int32()),
    ]
)

# The window's spans, when `snapshots.spans` is on: SPANS without the work-file fields.
SPANS_SNAPSHOT = pa.schema(
    [("window_start", _TS)]
    + [f for f in SPANS if f.name not in ("record_offset", "record_length")]
    + [("schema_version", pa.int32())]
)

def frame_table(frame: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    """The frame's columns of `schema` as an Arrow table of that schema. An empty frame gives the empty table:
    pandas types an empty column by its own defaults (a list column as strings), which Arrow cannot cast."""
    if frame.empty:
        return schema.empty_table()
    return pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)


SNAPSHOT_TABLES = {
    "scores": SCORES,
    "attribution": ATTRIBUTION,
    "patterns": PATTERNS,
    "root_causes": ROOT_CAUSES,
    "windows": WINDOWS,
    "evaluators": EVALUATORS,
    "spans": SPANS_SNAPSHOT,
}
