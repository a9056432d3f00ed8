"""Stage 3, partition: each score is pass / fail / error by its evaluator's threshold; each trace too.

An evaluator error (it raised, timed out, or returned nothing usable) is its own
class: it never counts as a failure. A trace fails when any root evaluator fails
it; it is an `error` trace when no root evaluator failed it but one errored.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.config import EvaluatorConfig
from tasks.schemas import SCORES

NO_SCORE = "returned no score; give a numeric score, or set pass_values for categorical values"


def score_statuses(scores: pa.Table, configs: list[EvaluatorConfig]) -> pa.Table:
    """SCORES with `status` filled in; a result that cannot be judged becomes an error with the reason."""
    frame = scores.to_pandas()
    status = np.full(len(frame), "error", dtype=object)
    error = frame["error"].to_numpy(dtype=object)
    score = frame["score"].to_numpy(dtype=float)
    has_score = ~np.isnan(score)
    has_value = frame["value"].notna().to_numpy()
    for config in configs:
        rows = (frame["evaluator"] == config.key).to_numpy() & pd.isna(error)
        numeric = rows & has_score
        passed = score >= config.threshold if config.higher_is_better else score <= config.threshold
        status[numeric] = np.where(passed[numeric], "pass", "fail")
        unjudged = rows & ~has_score
        if config.pass_values is not None:
            categorical = unjudged & has_value
            in_pass = frame["value"].isin(config.pass_values).to_numpy()
            status[categorical] = np.where(in_pass[categorical], "pass", "fail")
            unjudged &= ~categorical
        error[unjudged] = NO_SCORE
    frame["status"] = status
    frame["error"] = error
    return pa.Table.from_pandas(frame, schema=SCORES, preserve_index=False)


def trace_verdicts(scores: pa.Table, traces: pa.Array) -> pd.DataFrame:
    """One row per trace: `verdict` (pass | fail | error) from its root scores."""
    frame = scores.select(["trace_id", "is_root", "status"]).to_pandas()
    roots = frame[frame["is_root"]]
    counts = pd.crosstab(roots["trace_id"], roots["status"])
    for column in ("pass", "fail", "error"):
        if column not in counts:
            counts[column] = 0
    verdicts = pd.DataFrame({"trace_id": pd.unique(np.asarray(traces.to_pylist(), dtype=object))})
    verdicts = verdicts.merge(counts[["pass", "fail", "error"]], left_on="trace_id", right_index=True, how="left")
    verdicts = verdicts.fillna(0)
    verdicts["verdict"] = np.where(
        verdicts["fail"] > 0, "fail", np.where(verdicts["error"] > 0, "error", "pass")
    )
    return verdicts[["trace_id", "verdict"]]


@task(name="partition", cache_policy=NO_CACHE)
def partition_task(
    scores: pa.Table, traces: pa.Array, configs: list[EvaluatorConfig]
) -> tuple[pa.Table, pd.DataFrame]:
    judged = score_statuses(scores, configs)
    return judged, trace_verdicts(judged, traces)
