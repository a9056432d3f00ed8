"""The ledger and the action log: what dispatch planned, sent and failed, durable before and after each send.

Every action has a ledger entry written before (`planned`) and after (`sent` / `failed`,
with the response or error) its send. The ledger lies beside the snapshots, on the same
storage, one directory per loop and window; every write is a new segment, never a
rewrite. A rerun skips what the ledger says was sent; a failed action is tried again on
the next run. See docs/ledger.md.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from tasks.contracts import Action, Outcome, SendContext
from tasks.dispatch.lease import DispatchLease, run_logger
from tasks.store import PREFIX, SnapshotStore, partition_name, partition_start

LEDGER_DIR = "_ledger"
LEDGER_STATES = ("planned", "sent", "failed")

log = logging.getLogger("tracetriage.dispatch")

def _append_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append rows and make them durable before returning; an error names the file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as handle:
            handle.write(b"".join(orjson.dumps(row, default=str) + b"\n" for row in rows))
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        if exc.filename is None:  # a write or fsync: say which file it was
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


def _warn(message: str, *args: Any) -> None:
    run_logger(log).warning(message, *args)


def _jsonl_rows(data: bytes, origin: str, ledger: bool = False) -> tuple[list[dict[str, Any]], int]:
    """The entries of a JSONL object (each a JSON object with a string `action_id`, and for the `ledger` a known
    `state`), and how many lines were not: those are skipped with a warning naming `origin` and the line, never a
    crash."""
    rows, bad = [], 0
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("action_id"), str) and (
                not ledger or row.get("state") in LEDGER_STATES):
            rows.append(row)
            continue
        bad += 1
        _warn("skipped line %d of %s: not an entry (a JSON object with an action_id%s): %.80r", number, origin,
              f" and a state of {', '.join(LEDGER_STATES)}" if ledger else "", line)
    return rows, bad


class Ledger:
    """The action states of one loop's window, beside the snapshots: `_ledger/<loop>/window_start=<ISO>/`.

    Every write is a new segment (one object PUT on S3/GCS; written, fsynced and renamed on a disk), never a
    rewrite, named so segments sort in the order written. Reading replays them: the last entry of an id wins.

    >>> ledger = Ledger(SnapshotStore("/tmp/tracetriage-doc-ledger"), "demo", datetime(2026, 11, 2, tzinfo=UTC))
    >>> ledger.directory
    '_ledger/demo/window_start=2026-11-02T00:00:00Z'
    """

    def __init__(self, store: SnapshotStore, loop: str, window_start: datetime, lease: DispatchLease | None = None):
        self.store, self.lease = store, lease
        self.directory = f"{LEDGER_DIR}/{loop}/{partition_name(window_start)}"
        self.last: dict[str, dict[str, Any]] = {}
        self.segments: list[str] = []  # the segments read or written by this object (what `compact` replaces)
        self.damaged = 0  # unreadable entries: an action among them may have been sent
        for name, data in store.objects(self.directory):
            self.segments.append(name)
            rows, bad = _jsonl_rows(data, f"{store.url}/{self.directory}/{name}", ledger=True)
            if not data.endswith(b"\n"):
                bad += 1  # cut short: entries after the cut are gone, though the last line may parse
                _warn("ledger segment %s/%s/%s is cut short", store.url, self.directory, name)
            self.damaged += bad
            for row in rows:
                if self.state(row["action_id"]) != "sent":  # sent is final, whatever order clocks gave segments
                    self.last[row["action_id"]] = row
        self.written = 0

    def state(self, action_id: str) -> str | None:
        row = self.last.get(action_id)
        return row["state"] if row else None

    def record_many(self, entries: list[dict[str, Any]], state: str) -> None:
        """One durable segment for many entries (each a dict with `action_id` and details)."""
        if not entries:
            return
        at = datetime.now(UTC).isoformat()
        rows = [{**entry, "state": state, "at": at} for entry in entries]
        self._put(rows)
        for row in rows:
            self.last[row["action_id"]] = row

    def _put(self, rows: list[dict[str, Any]]) -> None:
        self.written += 1
        name = f"{time.time_ns():020d}-{os.getpid()}-{self.written:06d}.jsonl"
        self.store.put_bytes(f"{self.directory}/{name}",
                             b"".join(orjson.dumps(row, default=str) + b"\n" for row in rows))
        self.segments.append(name)
        if self.lease:
            self.lease.check()  # written first: what was sent stays on record for the run that took over

    def compact(self) -> None:
        """One segment with the last entry of each id in place of the segments this object read and wrote, so
        the next reader (a rerun, the scheduled run's look for unsent actions) reads one object.

        The new segment is written before the old ones are deleted: a crash in between leaves both, which read
        the same. Segments another writer added meanwhile are not touched."""
        if len(self.segments) <= 1:
            return
        old = list(self.segments)
        self.segments.clear()
        self._put(list(self.last.values()))
        self.store.delete([f"{self.directory}/{name}" for name in old])


def read_ledger(store: SnapshotStore, loop: str) -> list[dict[str, Any]]:
    """Every ledger entry of a loop, window by window, in the order written."""
    rows = []
    for window in store.listing(f"{LEDGER_DIR}/{loop}"):
        for name, data in store.objects(f"{LEDGER_DIR}/{loop}/{window}"):
            rows += _jsonl_rows(data, f"{store.url}/{LEDGER_DIR}/{loop}/{window}/{name}", ledger=True)[0]
    return rows


class ActionLog:
    """The local action log, the `log` sink: one JSON line per action, idempotent by action id."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        data = self.path.read_bytes() if self.path.exists() else b""
        if data and not data.endswith(b"\n"):
            data = self._repair(data)
        self.ids = {row["action_id"] for row in _jsonl_rows(data, str(self.path))[0]}

    def _repair(self, data: bytes) -> bytes:
        """A last line cut short by a crash or a full disk: ended, if it is a whole entry, else cut off (its action
        was never confirmed, so it is logged again), before anything is appended after it."""
        keep = data.rfind(b"\n") + 1
        try:
            orjson.loads(data[keep:])
        except orjson.JSONDecodeError:
            _warn("the last line of %s was cut short (%d bytes); removed, its action is logged again", self.path,
                  len(data) - keep)
            with open(self.path, "r+b") as handle:
                handle.truncate(keep)
                os.fsync(handle.fileno())
            return data[:keep]
        with open(self.path, "ab") as handle:
            handle.write(b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        return data + b"\n"

    def chunk(self, rule: Any, first: Action, total: int) -> int:
        return total  # one local write

    def send(self, rule: Any, actions: list[Action], context: SendContext) -> list[Outcome]:
        return [("sent", "written" if new else "already logged") for new in self.write_many(actions)]

    def write_many(self, records: list[dict[str, Any]]) -> list[bool]:
        """Append the records not logged yet, in one durable write; True where a record was new."""
        new = [r["action_id"] not in self.ids for r in records]
        _append_jsonl(self.path, [r for r, is_new in zip(records, new, strict=True) if is_new])
        self.ids.update(r["action_id"] for r in records)
        return new


def unfinished_windows(store: SnapshotStore, loop: str, since: datetime, before: datetime) -> list[datetime]:
    """Windows in `[since, before)` whose ledger holds actions not sent (failed, or planned when a run died)."""
    found = []
    for name in store.listing(f"{LEDGER_DIR}/{loop}"):
        if name.startswith(PREFIX) and since <= (start := partition_start(name)) < before:
            if any(row["state"] != "sent" for row in Ledger(store, loop, start).last.values()):
                found.append(start)
    return sorted(found)
