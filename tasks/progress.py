"""Progress of long stages, for the CLI's progress bar and the Prefect UI's progress artifact."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed

Listener = Callable[[str, int, int], None]
_listeners: list[Listener] = []


def add_listener(listener: Listener) -> None:
    _listeners.append(listener)


def remove_listener(listener: Listener) -> None:
    if listener in _listeners:
        _listeners.remove(listener)


def report(stage: str, done: int, total: int) -> None:
    for listener in list(_listeners):
        listener(stage, done, total)


def track_batches(futures: Sequence[Any], window_start: datetime) -> Iterator[Any]:
    """The futures in their original order, reporting each completion as it happens."""
    total = len(futures)
    stage = f"evaluate {window_start:%Y-%m-%d %H:%M}"
    artifact = create_progress_artifact(0.0, description=f"Evaluation batches, window {window_start.isoformat()}")
    report(stage, 0, total)
    for done, _ in enumerate(as_completed(list(futures)), start=1):
        report(stage, done, total)
        update_progress_artifact(artifact, 100.0 * done / total)
    return iter(futures)
