"""Progress of long stages, for the CLI's progress bar and the Prefect UI's progress artifact."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import wait

from tasks.evaluation.batch_state import read_state, state_path

Listener = Callable[[str, int, int, str], None]
_listeners: list[Listener] = []
_LOG_EVERY = 10.0  # seconds between two progress lines in the flow run's log


def add_listener(listener: Listener) -> None:
    _listeners.append(listener)


def remove_listener(listener: Listener) -> None:
    if listener in _listeners:
        _listeners.remove(listener)


def report(stage: str, done: int, total: int, detail: str = "") -> None:
    """`detail` is shown after the stage's name (e.g. calls in flight); listeners key on `stage`."""
    for listener in list(_listeners):
        listener(stage, done, total, detail)


def calls_progress(score_paths: Sequence[str]) -> tuple[int, int, int, int]:
    """Evaluator calls of a window's batches so far: (done, total, in flight, retried), from the batches' state
    files (written by the worker processes as they go)."""
    states = [read_state(state_path(path)) for path in score_paths]
    return (sum(s.done for s in states), sum(s.total for s in states), sum(s.in_flight for s in states),
            sum(s.retried for s in states))


def track_batches(futures: Sequence[Any], window_start: datetime, score_paths: Sequence[str] = ()) -> Iterator[Any]:
    """The futures in their original order, once all are done; meanwhile batches done and evaluator calls
    (done, in flight, retried) are reported every half second and logged every ten."""
    total = len(futures)
    stage = f"evaluate {window_start:%Y-%m-%d %H:%M}"
    calls_stage = f"calls {window_start:%Y-%m-%d %H:%M}"
    artifact = create_progress_artifact(0.0, description=f"Evaluation batches, window {window_start.isoformat()}")
    logger = get_run_logger()
    pending, logged, shown = list(futures), time.monotonic(), (-1, -1)
    while pending:
        pending = list(wait(pending, timeout=0.5).not_done)
        done_batches = total - len(pending)
        calls_done, calls_total, in_flight, retried = calls_progress(score_paths)
        detail = f" ({in_flight} in flight, {retried} retried)"
        report(stage, done_batches, total)
        if calls_total:
            report(calls_stage, calls_done, calls_total, detail)
        if (done_batches, calls_done) != shown:
            update_progress_artifact(artifact, 100.0 * done_batches / total,
                                     description=f"Evaluation batches, window {window_start.isoformat()}: "
                                                 f"{calls_done}/{calls_total} evaluator calls done{detail}")
            shown = (done_batches, calls_done)
        if calls_total and (not pending or time.monotonic() - logged >= _LOG_EVERY):
            logger.info("evaluating window %s: %d/%d batches, %d/%d evaluator calls done%s",
                        window_start.isoformat(), done_batches, total, calls_done, calls_total, detail)
            logged = time.monotonic()
    return iter(futures)
