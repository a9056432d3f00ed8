"""`feedback_loop`: the Python form of the loop asked for in langsmith-sdk #2907.

    from flows.loop import feedback_loop

    feedback_loop(
        project_name="my-rag-pipeline",                 # a LangSmith project (credentials from env)
        evaluator=my_faithfulness_evaluator,
        threshold=0.7,                                  # flag runs scoring below this
        on_failure=lambda run, score: {
            "action": "add_to_annotation_queue",
            "queue_name": "low-faithfulness-review",
            "metadata": {"failure_score": score, "trace_id": run.id,
                         "span_ids": [s.id for s in run.child_runs if s.name == "search_docs"]},
        },
    )

It builds a `LoopConfig` and runs the same `triage` flow as the CLI. The evaluators and
the callback are registered in this process, so the flow runs here (not on a worker);
with `schedule=` it is served from here (Prefect's `flow.serve`) and shows in the Prefect
UI as a deployment with that cron schedule.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from prefect import Flow, flow
from prefect.deployments.runner import RunnerDeployment

from flows.triage import triage
from tasks.config import (
    DEFAULT_OUT,
    ActionConfig,
    ConfigError,
    EvaluatorConfig,
    FileSource,
    LangSmithSource,
    LoopConfig,
    When,
)
from tasks.evaluation.evaluators import register
from tasks.sinks.connections import validate
from tasks.sources.langsmith import LangSmithSourceError

FEEDBACK = "feedback:"


class FeedbackLoopError(ConfigError):
    """A loop that cannot start: no credentials, no such project, a bad evaluator. One line, before any effect."""


def feedback_loop(
    project_name: str | None = None,
    *,
    evaluator: Callable[..., Any] | str | None = None,
    threshold: float = 0.7,
    evaluators: Sequence[EvaluatorConfig | Mapping[str, Any]] | None = None,
    on_failure: Callable[[Any, float | None], Any] | None = None,
    source: str | None = None,
    experiment: str | None = None,
    credentials: str | None = None,
    name: str | None = None,
    key: str | None = None,
    higher_is_better: bool = True,
    window: str = "1h",
    start: datetime | None = None,
    end: datetime | None = None,
    out: str = DEFAULT_OUT,
    schedule: str | None = None,
) -> dict[str, Any]:
    """Score the root runs of a LangSmith project; call `on_failure(run, score)` once per failing run and carry out
    the actions it returns, each exactly once across reruns.

    - Runs: `project_name` (a LangSmith project; the last closed window, or `start=`/`end=`), `experiment=`
      (every run of an `evaluate()` experiment, with its dataset examples), or `source=` (a JSONL or Parquet
      export; `project_name` then only names the loop). Credentials come from the `LANGSMITH_*` environment, or
      `credentials=` names a `LangSmithCredentials` block.
    - Scores: `evaluator=` with `threshold=`, or `evaluators=[...]`, each an `EvaluatorConfig` or a mapping
      `{"evaluator": fn, "threshold": 0.7, ...}` (other `EvaluatorConfig` fields allowed). An evaluator is a
      LangSmith-style function or `"feedback:<key>"`: the score each run already has in LangSmith under `<key>`.
    - `on_failure(run, score)` gets the root `Run` with `child_runs` (the trace's tree) and may return an action
      (`{"action": "add_to_annotation_queue", "queue_name": ..., "metadata": {...}}`, `add_to_dataset`,
      `trigger_webhook`, `create_feedback`, `slack`), a list of them, or `{"then": [...]}`.
    - `schedule="15 * * * *"`: instead of one run, serve the loop from this process on that cron schedule (it
      appears as a Prefect deployment); blocks until stopped.

    Returns the same document as `tracetriage run --json` (with `schedule`, nothing: it serves until stopped).
    Raises FeedbackLoopError (one line) when the loop cannot start, before anything is read or written.
    """
    config, callables = loop_config(project_name, evaluator=evaluator, threshold=threshold, evaluators=evaluators,
                                    on_failure=on_failure, source=source, experiment=experiment,
                                    credentials=credentials, name=name, key=key,
                                    higher_is_better=higher_is_better, window=window)
    try:
        validate(config)
    except (LangSmithSourceError, FileNotFoundError, ValueError) as exc:
        raise FeedbackLoopError(str(exc)) from None
    if schedule is not None:
        from prefect import serve

        serve(loop_deployment(config, callables, schedule, out))
        return {}
    return triage(config=config, start=start, end=end, out=out)


def loop_config(
    project_name: str | None = None, *, evaluator: Callable[..., Any] | str | None = None, threshold: float = 0.7,
    evaluators: Sequence[EvaluatorConfig | Mapping[str, Any]] | None = None,
    on_failure: Callable[..., Any] | None = None, source: str | None = None, experiment: str | None = None,
    credentials: str | None = None, name: str | None = None, key: str | None = None,
    higher_is_better: bool = True, window: str = "1h",
) -> tuple[LoopConfig, dict[str, Any]]:
    """The `LoopConfig` of a `feedback_loop` call, and the in-process callables its `python:` refs name."""
    callables: dict[str, Any] = {}

    def ref_of(obj: Any) -> str:
        ref = register(obj)
        callables[ref.removeprefix("python:")] = obj
        return ref

    if (evaluator is None) == (evaluators is None):
        raise FeedbackLoopError("feedback_loop needs evaluator= (with threshold=) or evaluators=[...], one of them")
    specs = [{"evaluator": evaluator, "threshold": threshold, "key": key, "higher_is_better": higher_is_better}] \
        if evaluators is None else list(evaluators)
    configs = [_evaluator_config(spec, ref_of) for spec in specs]
    actions = []
    if on_failure is not None:
        ref = ref_of(on_failure)
        roots = [e for e in configs if e.is_root]
        for e in roots:  # one call per (failing run, evaluator that failed it), with that evaluator's score
            bound = "below" if e.higher_is_better else "above"
            actions.append(ActionConfig(when=When(evaluator=e.key, **{bound: e.threshold}), do="call", ref=ref,
                                        name="on_failure" if len(roots) == 1 else f"on_failure-{e.key}"))
    if source is not None:
        runs: Any = FileSource(path=source)
    elif project_name is None and experiment is None:
        raise FeedbackLoopError("feedback_loop needs project_name= (a LangSmith project), experiment= (an "
                                "evaluate() experiment) or source= (a file of exported runs)")
    else:
        runs = LangSmithSource(project=None if experiment else project_name, experiment=experiment,
                               credentials=credentials)
    try:
        # Evaluators registered here are evaluated here: no worker processes to start for them.
        in_process = any(e.ref.startswith("python:") for e in configs)
        config = LoopConfig(name=_loop_name(name or project_name or experiment), source=runs,
                            window={"size": window}, evaluators=configs, actions=actions,
                            eval_workers=1 if in_process else 0)
    except ValueError as exc:
        raise FeedbackLoopError(" ".join(str(exc).split())) from None
    return config, callables


def _evaluator_config(spec: EvaluatorConfig | Mapping[str, Any], ref_of: Callable[[Any], str]) -> EvaluatorConfig:
    if isinstance(spec, EvaluatorConfig):
        return spec
    fields = {k: v for k, v in spec.items() if v is not None}
    target = fields.pop("evaluator", None)
    if target is None:
        raise FeedbackLoopError(f"evaluators entry {dict(spec)!r} needs 'evaluator': a function or 'feedback:<key>'")
    if isinstance(target, str) and target.startswith(FEEDBACK):
        fields.setdefault("key", target.removeprefix(FEEDBACK))
        ref = f"langsmith:feedback/{target.removeprefix(FEEDBACK)}"
    elif isinstance(target, str):
        ref = target  # an import path or builtin:<name>
    else:
        ref = ref_of(target)
    fields.setdefault("key", (getattr(target, "__name__", "") or "score").strip("<>") or "score")
    try:
        return EvaluatorConfig(ref=ref, **fields)
    except ValueError as exc:
        raise FeedbackLoopError(" ".join(str(exc).split())) from None


def _loop_name(text: str | None) -> str:
    """A loop name (part of every action id) from a project name, which may hold any character."""
    return re.sub(r"[^A-Za-z0-9_.\-]+", "-", text or "feedback-loop").strip("-") or "feedback-loop"


def served_flow(config: LoopConfig, callables: dict[str, Any], out: str) -> Flow[..., dict[str, Any]]:
    """A flow that triages the last closed window of `config` (and retries unfinished ones), carrying its
    callables with it: a served flow runs in a fresh process, which registers them again under the same refs."""

    @flow(name="feedback-loop", log_prints=True)
    def feedback_loop_window() -> dict[str, Any]:
        # Imported here, not captured: the flow is pickled by value, and these must come from their modules.
        from flows.triage import triage_latest
        from tasks.evaluation.evaluators import register

        for registered, obj in callables.items():
            register(obj, registered)
        return triage_latest(config=config, out=out)

    return feedback_loop_window


def loop_deployment(config: LoopConfig, callables: dict[str, Any], cron: str, out: str = DEFAULT_OUT
                    ) -> RunnerDeployment:
    """The deployment `feedback_loop(..., schedule=cron)` serves: flow `feedback-loop`, named after the loop."""
    return served_flow(config, callables, out).to_deployment(name=config.name, cron=cron)
