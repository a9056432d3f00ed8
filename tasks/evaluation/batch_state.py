"""The live state of one evaluation batch, in a 64-byte file beside its scores: shared between the worker
process that scores the batch and the flow that waits for it.

The worker writes it through a shared memory map (a few stores per update, no system call); the
flow reads it for progress (calls done, in flight, retried) and, when a worker dies, to learn
which evaluator it was running and whether it stopped itself for crossing `max_worker_memory`.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

_FORMAT = "<8q"  # pid, evaluator index (-1: none yet), total, done, in flight, retried, memory (bytes), spare
SIZE = struct.calcsize(_FORMAT)


@dataclass(frozen=True)
class BatchState:
    pid: int = 0
    evaluator: int = -1
    total: int = 0
    done: int = 0
    in_flight: int = 0
    retried: int = 0
    memory_over: int = 0  # the worker's resident memory when it stopped itself for max_worker_memory; else 0


def state_path(scores_path: str) -> str:
    return scores_path.removesuffix(".parquet") + ".state"


def read_state(path: str | Path) -> BatchState:
    """The batch's state; all zero when the batch has not started (no file yet)."""
    try:
        raw = Path(path).read_bytes()
    except OSError:
        return BatchState()
    return BatchState(*struct.unpack(_FORMAT, raw[:SIZE])[:7]) if len(raw) >= SIZE else BatchState()


class StateWriter:
    """The worker's side: `update(...)` stores the fields given."""

    def __init__(self, path: str | Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, SIZE)
            self._map = mmap.mmap(fd, SIZE)
        finally:
            os.close(fd)
        self._values = [os.getpid(), -1, 0, 0, 0, 0, 0, 0]
        self._flush()

    def update(self, *, evaluator: int | None = None, total: int | None = None, done: int | None = None,
               in_flight: int | None = None, retried: int | None = None, memory_over: int | None = None) -> None:
        for position, value in enumerate((evaluator, total, done, in_flight, retried, memory_over), start=1):
            if value is not None:
                self._values[position] = value
        self._flush()

    def _flush(self) -> None:
        struct.pack_into(_FORMAT, self._map, 0, *self._values)

    def close(self) -> None:
        self._map.close()
