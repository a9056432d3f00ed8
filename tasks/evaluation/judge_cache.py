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
import fcntl
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson

from tasks.evaluation.evaluators import Result

CACHE_FILE = "judge-cache.sqlite"
_FLUSH_ROWS, _FLUSH_SECONDS = 256, 0.5
_LOOKUP_CHUNK = 500  # under SQLite's limit of bound parameters
_TABLE = ("CREATE TABLE IF NOT EXISTS results (version TEXT, run TEXT, results BLOB, PRIMARY KEY (version, run)) "
          "WITHOUT ROWID")

log = logging.getLogger(__name__)


def _sidecars(database: Path) -> tuple[Path, Path]:
    """The WAL and shared-memory files SQLite keeps beside a database in WAL mode."""
    return Path(f"{database}-wal"), Path(f"{database}-shm")


class JudgeCache:
    """Results by (version, run key); `put` buffers, and the buffer is written every 0.5 s, 256 rows or at close."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._pending: list[tuple[str, str, bytes]] = []
        self._flushed = time.monotonic()
        self._db = self._connect()

    def _connect(self) -> sqlite3.Connection:
        """The cache's connection; the cache made first when there is none, a damaged one set aside for a new one.

        The evaluation workers open a new cache at the same moment, and SQLite may refuse setting WAL mode at once
        ("database is locked", without waiting its busy timeout): so a cache is made by one process at a time,
        whole under a temporary name, then moved into place. A lock that outlasts the busy timeout, or the disk's
        error, fails the batch (retried as any batch), never the file."""
        for _ in range(3):
            self._create_if_missing()
            try:
                return self._open()
            except sqlite3.OperationalError:
                if self.path.exists():
                    raise
                # set aside by another worker between the two steps: made again
            except sqlite3.DatabaseError as exc:  # a damaged file is only lost work: start a new one
                self._set_aside(exc)
        return self._open()

    @contextlib.contextmanager
    def _setup(self) -> Iterator[None]:
        """Held while the cache file is made or set aside: one process at a time."""
        with open(self.path.with_name(f".{self.path.name}.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _create_if_missing(self) -> None:
        if self.path.exists():
            return
        with self._setup():
            if self.path.exists():  # another worker made it meanwhile
                return
            tmp = self.path.with_name(f".{self.path.name}.new")  # a creator killed half-way left it: made anew
            for leftover in (tmp, *_sidecars(tmp)):
                leftover.unlink(missing_ok=True)
            with contextlib.closing(sqlite3.connect(tmp, isolation_level=None)) as db:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute(_TABLE)
            os.replace(tmp, self.path)

    def _set_aside(self, exc: sqlite3.DatabaseError) -> None:
        with self._setup():
            try:
                self._open().close()
                return  # another worker set the damaged one aside and made this one meanwhile
            except sqlite3.OperationalError:
                if self.path.exists():
                    raise
                return
            except sqlite3.DatabaseError:
                pass
            log.warning("judge cache %s is unreadable (%s); starting a new one", self.path, exc)
            aside = self.path.with_suffix(f".damaged-{time.time_ns()}")
            for part, moved in zip((self.path, *_sidecars(self.path)), (aside, *_sidecars(aside)), strict=True):
                with contextlib.suppress(FileNotFoundError):  # its WAL too: a new cache must not replay it
                    part.replace(moved)

    def _open(self) -> sqlite3.Connection:
        """A connection to the cache file as it is (never one that makes an empty file in its place)."""
        db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=rw", uri=True, timeout=60, isolation_level=None,
                             check_same_thread=False)
        try:
            if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(_TABLE)  # a no-op on a cache made here; the table of one made before
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

