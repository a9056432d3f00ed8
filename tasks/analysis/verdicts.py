"""Verdicts: each score is pass / fail / error by its evaluator's threshold; each trace too.

An evaluator error (it raised, timed out, or returned nothing usable) is its own
class: it never counts as a failure. A trace fails when any root evaluator fails
it; it is an `error` trace when no root evaluator failed it but one errored.
"""

from __future__ import annotations

from datetime import datetime

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.config import EvaluatorConfig
from tasks.contracts import ScoredWindow, Verdicts
from tasks.memory import release_memory
from tasks.schemas import EVALUATORS, SCHEMA_VERSION, SCORES

NO_SCORE = "returned no score; give a numeric score, or set pass_values for categorical values"


def score_statuses(scores: pa.Table, configs: list[EvaluatorConfig]) -> pa.Table:
    """SCORES with `status` filled in; a result that cannot be judged becomes an error with the reason."""
    evaluator, score, value = scores.column("evaluator"), scores.column("score"), scores.column("value")
    unerrored = pc.is_null(scores.column("error"))
    status = pa.repeat(pa.scalar("error"), scores.num_rows)
    error = scores.column("error")
    for config in configs:
        rows = pc.and_(pc.equal(evaluator, config.key), unerrored)
        compare = pc.greater_equal if config.higher_is_better else pc.less_equal
        passed = pc.fill_null(compare(score, config.threshold), False)
        numeric = pc.and_(rows, pc.is_valid(score))
        status = pc.if_else(numeric, pc.if_else(passed, "pass", "fail"), status)
        unjudged = pc.and_(rows, pc.is_null(score))
        if config.pass_values is not None:
            categorical = pc.and_(unjudged, pc.is_valid(value))
            in_pass = pc.fill_null(pc.is_in(value, pa.array(config.pass_values, pa.string())), False)
            status = pc.if_else(categorical, pc.if_else(in_pass, "pass", "fail"), status)
            unjudged = pc.and_(unjudged, pc.invert(categorical))
        error = pc.if_else(unjudged, NO_SCORE, error)
    columns = {name: scores.column(name) for name in SCORES.names}
    columns["status"], columns["error"] = status, error
    return pa.table([columns[name] for name in SCORES.names], schema=SCORES)


def trace_verdicts(scores: pa.Table, traces: pa.Array) -> pd.DataFrame:
    """One row per trace: `verdict` (pass | fail | error) from its root scores."""
    roots = scores.filter(scores.column("is_root"))
    status = roots.column("status")
    counted = pa.table({
        "trace_id": roots.column("trace_id"),
        "fail": pc.cast(pc.equal(status, "fail"), pa.int64()),
        "error": pc.cast(pc.equal(status, "error"), pa.int64()),
    }).group_by("trace_id").aggregate([("fail", "sum"), ("error", "sum")])
    unique = pa.table({"trace_id": pc.unique(traces).cast(pa.string())})
    verdicts = unique.join(counted, "trace_id", join_type="left outer")
    fail, error = pc.fill_null(verdicts.column("fail_sum"), 0), pc.fill_null(verdicts.column("error_sum"), 0)
    verdict = pc.if_else(pc.greater(fail, 0), "fail", pc.if_else(pc.greater(error, 0), "error", "pass"))
    return pa.table({"trace_id": verdicts.column("trace_id"), "verdict": verdict}).to_pandas()


def status_counts(scores: pa.Table) -> dict[tuple[str, str], int]:
    """(evaluator, status) -> number of results."""
    counts = scores.group_by(["evaluator", "status"]).aggregate([("status", "count")])
    return {(e, s): n for e, s, n in zip(*(counts.column(c).to_pylist() for c in
                                            ("evaluator", "status", "status_count")), strict=True)}


def evaluators_table(
    counts: dict[tuple[str, str], int], configs: list[EvaluatorConfig], window_start: datetime
) -> pa.Table:
    """EVALUATORS: each evaluator's pass / fail / error counts in the window (the trend series' inputs)."""
    return pa.Table.from_pylist([{
        "window_start": window_start, "evaluator": c.key, "target": c.target_label, "threshold": c.threshold,
        "passing": counts.get((c.key, "pass"), 0), "failing": counts.get((c.key, "fail"), 0),
        "errors": counts.get((c.key, "error"), 0), "schema_version": SCHEMA_VERSION,
    } for c in configs], schema=EVALUATORS)


def scores_for_analysis(scores: pa.Table, evaluators_in_rules: list[str]) -> pd.DataFrame:
    """The scores later stages read: failed span scores (attribution, patterns) and the scores of
    evaluators that action rules name; the rest stays in Arrow and the snapshot."""
    failed_spans = pc.and_(pc.invert(scores.column("is_root")), pc.equal(scores.column("status"), "fail"))
    named = pc.is_in(scores.column("evaluator"), pa.array(evaluators_in_rules, pa.string()))
    return scores.filter(pc.or_(failed_spans, named)).to_pandas()


@task(name="partition", cache_policy=NO_CACHE)
def partition_task(*, scored: ScoredWindow, configs: list[EvaluatorConfig], rule_evaluators: list[str]) -> Verdicts:
    """Every score judged, a verdict per trace, and the scores later stages read (failed span scores and the
    scores of the evaluators that rules name)."""
    judged = score_statuses(scored.scores, configs)
    counts = status_counts(judged)
    verdicts = Verdicts(judged=judged, traces=trace_verdicts(judged, scored.root_trace_ids()),
                        scores=scores_for_analysis(judged, rule_evaluators), counts=counts,
                        evaluators=evaluators_table(counts, configs, scored.window_start))
    release_memory()  # score_statuses' temporaries (a column per evaluator and step)
    return verdicts
