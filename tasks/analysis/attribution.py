"""Attribution: the span inside each failing trace that caused the failure.

Candidates are the non-root spans of a failing trace that errored or that a span
evaluator failed. A candidate whose own descendant is also a candidate is not
chosen (an error propagating up, or a chain scored badly because a step inside
it was bad). Among the rest the most upstream one, first by `dotted_order`, is
the culprit. A failing trace with no candidate is pinned on its final LLM span
(else its root) with reason `no_upstream_cause`. Every candidate is kept, so the
choice hides nothing.
"""

from __future__ import annotations

from datetime import datetime

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.contracts import ScoredWindow, Verdicts
from tasks.memory import release_memory
from tasks.schemas import SCHEMA_VERSION

ERROR = "error"
BELOW_THRESHOLD = "below_threshold"
NO_UPSTREAM_CAUSE = "no_upstream_cause"
REASONS = {BELOW_THRESHOLD: "low score", ERROR: "error", NO_UPSTREAM_CAUSE: "no upstream cause"}  # as people read them

SPAN_COLUMNS = ["id", "trace_id", "name", "run_type", "status", "dotted_order", "is_root", "start_time"]


def read_spans(window_path: str) -> pd.DataFrame:
    """The columns of a window's spans that attribute and aggregate read (SPAN_COLUMNS and latency_s).

    Read without pre-buffering (which held every column chunk's bytes while decoding them), and the read's
    buffers handed back to the OS before the frame is used: the frame is ~140 MB at 100,000 traces, the read
    had left ~380 MB resident for the rest of the window."""
    spans = pq.ParquetFile(window_path).read(columns=SPAN_COLUMNS + ["latency_s"]).to_pandas()
    release_memory()
    return spans


def _among(trace_ids: pd.Series, chosen: pd.Index) -> np.ndarray:
    """`trace_ids.isin(chosen)`, by Arrow: pandas converts each chosen id to an Arrow scalar and back first
    (50 ms for 8,210 failing traces of 30,000, against 4 ms)."""
    found = pc.is_in(pa.array(trace_ids.array, pa.string()), value_set=pa.array(chosen.array, pa.string()))
    return found.fill_null(False).to_numpy(zero_copy_only=False)


def _candidates(spans: pd.DataFrame, scores: pd.DataFrame, failing: pd.Index) -> pd.DataFrame:
    in_failing = _among(spans["trace_id"], failing) & ~spans["is_root"]
    errored = spans[in_failing & (spans["status"] == "error")]
    errors = pd.DataFrame({
        "trace_id": errored["trace_id"], "run_id": errored["id"], "span_name": errored["name"],
        "run_type": errored["run_type"], "dotted_order": errored["dotted_order"], "reason": ERROR,
        "evaluator": None, "score": np.nan,
    })
    low = scores[(scores["status"] == "fail") & ~scores["is_root"] & _among(scores["trace_id"], failing)]
    below = pd.DataFrame({
        "trace_id": low["trace_id"], "run_id": low["run_id"], "span_name": low["span_name"],
        "run_type": low["run_type"], "dotted_order": low["dotted_order"], "reason": BELOW_THRESHOLD,
        "evaluator": low["evaluator"], "score": low["score"],
    })
    frames = [f for f in (errors, below) if len(f)]
    if not frames:
        return errors.iloc[0:0]
    return pd.concat(frames, ignore_index=True).sort_values(["trace_id", "dotted_order", "reason"],
                                                            ignore_index=True)


def _has_candidate_descendant(candidates: pd.DataFrame) -> np.ndarray:
    """True where the next candidate of the same trace lies inside this one (sorted by dotted_order)."""
    orders = candidates["dotted_order"].to_numpy(dtype=object)
    traces = candidates["trace_id"].to_numpy(dtype=object)
    inside = np.zeros(len(candidates), dtype=bool)
    if len(candidates) > 1:
        nxt = orders[1:]
        prefix = np.char.add(orders[:-1].astype(str), ".")
        inside[:-1] = (traces[1:] == traces[:-1]) & np.char.startswith(nxt.astype(str), prefix)
    return inside


def span_attribution(
    spans: pd.DataFrame, scores: pd.DataFrame, verdicts: pd.DataFrame, window_start: datetime
) -> pd.DataFrame:
    """ATTRIBUTION rows: every candidate of every failing trace, with `is_culprit` on the chosen one."""
    failing = pd.Index(verdicts.loc[verdicts["verdict"] == "fail", "trace_id"])
    candidates = _candidates(spans, scores, failing)
    eligible = ~_has_candidate_descendant(candidates)
    first = candidates[eligible].drop_duplicates("trace_id", keep="first").index
    candidates["is_culprit"] = candidates.index.isin(first)

    unexplained = failing.difference(pd.Index(candidates["trace_id"].unique()))
    if len(unexplained):
        pool = spans[_among(spans["trace_id"], unexplained)]
        llm = pool[pool["run_type"] == "llm"].sort_values("start_time").drop_duplicates("trace_id", keep="last")
        rootless = unexplained.difference(pd.Index(llm["trace_id"]))
        roots = pool[pool["is_root"] & _among(pool["trace_id"], rootless)]
        fallback = pd.concat([llm, roots])
        candidates = pd.concat([candidates, pd.DataFrame({
            "trace_id": fallback["trace_id"], "run_id": fallback["id"], "span_name": fallback["name"],
            "run_type": fallback["run_type"], "dotted_order": fallback["dotted_order"],
            "reason": NO_UPSTREAM_CAUSE, "evaluator": None, "score": np.nan, "is_culprit": True,
        })], ignore_index=True)
    candidates.insert(0, "window_start", pd.Timestamp(window_start))
    candidates["schema_version"] = SCHEMA_VERSION
    return candidates.reset_index(drop=True)


@task(name="attribute", cache_policy=NO_CACHE)
def attribute_task(*, scored: ScoredWindow, verdicts: Verdicts) -> pd.DataFrame:
    """ATTRIBUTION: for each failing trace, the candidate spans and the culprit."""
    attribution = span_attribution(scored.spans, verdicts.scores, verdicts.traces, scored.window_start)
    release_memory()
    return attribution
