"""Evaluator results kept per (evaluator version, run), so a rerun never pays for a model call twice.

One SQLite file in the run's work directory (`<out>/work/judge-cache.sqlite`), shared by the
evaluation worker processes (WAL mode: readers never wait, writers queue for milliseconds).
The key is the evaluator's version (its ref, key, params, code and module source: see
`BoundEvaluator.version`) and the run's id plus a digest of its record, so a run whose
record changed (outputs that arrived late, a new status) is scored again. Only results are
kept, never errors: a run that timed out or ran out of retries is tried again next time.
Deleting `<out>/work` drops the cache with the other work files.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sqlite3
import threading
import time
import uuid
from pathlib import Path

import orjson

from tasks.evaluation.evaluators import Result

CACHE_FILE = "judge-cache.sqlite"
_FLUSH_ROWS, _FLUSH_SECONDS = 256, 0.5
_LOOKUP_CHUNK = 500  # under SQLite's limit of bound parameters
_TABLE = ("CREATE TABLE IF NOT EXISTS results (version TEXT, run TEXT, results BLOB, PRIMARY KEY (version, run)) "
          "WITHOUT ROWID")

log = logging.getLogger(__name__)


class JudgeCache:
    """Results by (version, run key); `put` buffers, and the buffer is written every 0.5 s, 256 rows or at close."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._pending: list[tuple[str, str, bytes]] = []
        self._flushed = time.monotonic()
        if not self.path.exists():
            self._create()
        found = self.path.stat().st_ino
        try:
            self._db = self._open()
        except sqlite3.OperationalError:  # locked past the timeout, or the disk's error: not the file's
            raise
        except sqlite3.DatabaseError as exc:  # a damaged file is only lost work: start a new one
            log.warning("judge cache %s is unreadable (%s); starting a new one", self.path, exc)
            with contextlib.suppress(FileNotFoundError):
                if self.path.stat().st_ino == found:  # not a new cache that another worker made meanwhile
                    self.path.replace(self.path.with_suffix(f".damaged-{time.time_ns()}"))
            if not self.path.exists():
                self._create()
            self._db = self._open()

    def _create(self) -> None:
        """A new cache file, made whole under a temporary name and linked into place unless another process's is
        there first: the evaluation workers open a new cache at once, and setting WAL mode and creating the table
        take locks that SQLite's busy timeout does not always wait for ("database is locked" at once)."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{uuid.uuid4().hex}")
        try:
            db = sqlite3.connect(tmp, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(_TABLE)
            db.close()
            with contextlib.suppress(FileExistsError):
                os.link(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(_TABLE)  # a no-op on a cache made by _create; the table of a cache made before it did
        except BaseException:
            db.close()
            raise
        return db

    def get_many(self, version: str, runs: list[str]) -> dict[str, list[Result]]:
        found: dict[str, list[Result]] = {}
        with self._lock:
            for start in range(0, len(runs), _LOOKUP_CHUNK):
                chunk = runs[start:start + _LOOKUP_CHUNK]
                rows = self._db.execute(
                    f"SELECT run, results FROM results WHERE version = ? AND run IN ({','.join('?' * len(chunk))})",
                    [version, *chunk]).fetchall()
                for run, blob in rows:
                    found[run] = [Result(*item, None) for item in orjson.loads(blob)]
        return found

    def put(self, version: str, run: str, results: list[Result]) -> None:
        """Keep `results` unless one is an error or a score that is no number (then the run is evaluated again)."""
        if any(r.error is not None or (r.score is not None and not math.isfinite(r.score)) for r in results):
            return
        blob = orjson.dumps([[r.feedback_key, r.score, r.value, r.comment] for r in results])
        with self._lock:
            self._pending.append((version, run, blob))
            if len(self._pending) >= _FLUSH_ROWS or time.monotonic() - self._flushed >= _FLUSH_SECONDS:
                self._flush()

    def _flush(self) -> None:
        if self._pending:
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany("INSERT OR REPLACE INTO results VALUES (?, ?, ?)", self._pending)
            self._pending.clear()
        self._flushed = time.monotonic()

    def flush(self) -> None:
        with self._lock:
            self._flush()

    def close(self) -> None:
        self.flush()
        self._db.close()

