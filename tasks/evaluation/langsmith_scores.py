"""Scores already in LangSmith, and the dataset examples of experiments, as evaluators see them.

`ref: langsmith:feedback/<key>` (in Python, `evaluator="feedback:<key>"`) is an evaluator
whose score for a run is the run's existing feedback score under `<key>`: what an online
evaluator or an `evaluate()` experiment wrote. Nothing is scored again and no request is
made for it: the scores come with the runs (the `FEEDBACK_STATS` select of the v2 run
query, `feedback_stats` in v1, the mean score of the key on that run). A run without
that feedback is an evaluator error, "no feedback <key>", kept apart from failures.

It is a columnar evaluator (it takes the table of the spans it scores), so it reads only
the `feedback_stats` of each record and builds no `Run` objects.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyarrow as pa
from langsmith.schemas import Example

from tasks.sources.records import RecordFile

FEEDBACK_PREFIX = "langsmith:feedback/"


def feedback_score_evaluator(key: str) -> Callable[..., dict[str, list[Any]]]:
    """A columnar evaluator: each span's existing LangSmith feedback score under `key`, or an error row."""
    from tasks.evaluation.scoring import records_path

    def feedback_score(spans: pa.Table) -> dict[str, list[Any]]:
        scores: list[float | None] = []
        errors: list[str | None] = []
        offsets = spans.column("record_offset").to_pylist()
        lengths = spans.column("record_length").to_pylist()
        with RecordFile(records_path(spans.schema)) as records:
            for offset, length in zip(offsets, lengths, strict=True):
                stat = (records.record(offset, length).get("feedback_stats") or {}).get(key)
                score = stat.get("avg") if isinstance(stat, dict) else None
                scores.append(None if score is None else float(score))
                errors.append(None if score is not None else f"no feedback {key}")
        return {"score": scores, "error": errors}

    feedback_score.__qualname__ = f"feedback_score[{key}]"
    return feedback_score


def reference_example(record: dict[str, Any]) -> Example | None:
    """The dataset example an experiment's root run was made from (fetched with the runs), else None."""
    example = record.get("reference_example")
    return None if example is None else Example(**example)
