"""`feedback_loop`: the Python form of the loop asked for in langsmith-sdk #2907.

    from flows.loop import feedback_loop

    def correct(outputs: dict) -> float:
        return float("sorry" not in outputs.get("answer", "").lower())

    result = feedback_loop(
        source="runs.jsonl",                         # exported LangSmith runs
        evaluator=correct,
        threshold=0.7,
        on_failure=lambda run, score: {"ticket": f"triage {run.id} ({score:.2f})"},
    )

It builds a `LoopConfig` and runs the same `triage` flow as the CLI. The evaluator and
the callback are registered in this process, so the flow must run here (not on a
worker); what `on_failure` returns is kept in the ledger.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from flows.triage import DEFAULT_OUT, triage
from tasks.config import ActionConfig, EvaluatorConfig, FileSource, LoopConfig, When
from tasks.evaluators import register


def feedback_loop(
    project_name: str | None = None,
    *,
    evaluator: Callable[..., Any],
    threshold: float = 0.7,
    on_failure: Callable[[Any, float | None], Any] | None = None,
    source: str | None = None,
    key: str | None = None,
    higher_is_better: bool = True,
    window: str = "1h",
    start: datetime | None = None,
    end: datetime | None = None,
    out: str = DEFAULT_OUT,
) -> dict[str, Any]:
    """Score every root run of `source` with `evaluator`; call `on_failure(run, score)` once per failing run.

    `project_name` names the loop (and, once LangSmith fetching lands, the project to read);
    today runs come from `source`, a JSONL or Parquet export of LangSmith run records.
    Returns the same document as `tracetriage run --json`.
    """
    if source is None:
        raise ValueError(
            "feedback_loop needs source=<JSONL or Parquet export of LangSmith runs>; "
            "reading a LangSmith project directly is not available yet"
        )
    key = key or getattr(evaluator, "__name__", "score").strip("<>") or "score"
    actions = []
    if on_failure is not None:
        bound = "above" if not higher_is_better else "below"
        actions.append(ActionConfig(when=When(evaluator=key, **{bound: threshold}), do="call",
                                    ref=register(on_failure), name="on_failure"))
    config = LoopConfig(
        name=project_name or "feedback-loop",
        source=FileSource(path=source),
        window={"size": window},
        evaluators=[EvaluatorConfig(key=key, ref=register(evaluator), threshold=threshold,
                                    higher_is_better=higher_is_better)],
        actions=actions,
    )
    return triage(config=config, start=start, end=end, out=out)
