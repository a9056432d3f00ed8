"""One dispatch of a loop at a time, wherever it runs: a lease object on the snapshot store, beside the ledger.

Two runs that dispatch the same loop at once (the hourly run on one worker, a backfill
or a manual rerun on another) would both read the ledger before either wrote it, and
both send. The lease keeps them apart: `_leases/dispatch-<loop>/<epoch>.json`, created
only if no object has that name (a hard link on a disk, `If-None-Match: *` on S3), so
of two runs taking the next epoch exactly one wins and the other waits. Epochs only
grow: a renewal and a release (a `released` marker) each take the next one, and only
the claimer of a later epoch removes earlier ones.

A lease is held while its holder lives. On the holder's own machine that is asked of
the kernel, so a rerun right after a crash does not wait; elsewhere the lease expires
`ttl` after its last renewal, and the holder renews it every third of `ttl` from a
thread. A holder that finds its lease taken (it stalled for longer than the renewals
allow) stops at its next ledger write.

A lease left behind by this very process (its release failed, say on a full disk,
and Prefect retries the dispatch) is not waited for: the process knows which of its
leases are still held. A lease file that is not a lease (damaged) is skipped with a
warning naming it, and the next epoch is taken.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from datetime import UTC, datetime
from functools import cache
from typing import Any

import orjson
from prefect import get_run_logger
from prefect.exceptions import MissingContextError

from tasks.store import SnapshotStore

LEASE_DIR = "_leases"
TTL_SECONDS = 600.0

log = logging.getLogger("tracetriage.lease")
_HELD: set[str] = set()  # tokens of the leases this process holds now


def run_logger(fallback: logging.Logger = log) -> logging.Logger | logging.LoggerAdapter:
    """The flow or task run's logger when there is one, so a wait or a warning shows in the Prefect UI."""
    try:
        return get_run_logger()
    except MissingContextError:
        return fallback


class LeaseLost(RuntimeError):
    """Another run took this dispatch's lease; it carries on from the ledger."""


@cache
def _machine() -> dict[str, str]:
    """What tells this machine and pid namespace apart, so a pid is only looked up where it means something."""
    def read(path: str) -> str:
        try:
            with open(path) as handle:
                return handle.read().strip()
        except OSError:
            return ""

    namespace = os.readlink("/proc/self/ns/pid") if os.path.exists("/proc/self/ns/pid") else ""
    return {"host": socket.gethostname(), "boot": read("/proc/sys/kernel/random/boot_id"), "pidns": namespace}


def process_started(pid: int) -> str | None:
    """The start time of a live process (so a reused pid is not taken for it), or None if there is none."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]  # field 22 of proc(5), counted after the name
    except OSError:
        return None


def holder_alive(holder: dict[str, Any], now: float, machine: dict[str, str]) -> bool:
    if machine["boot"] and all(holder.get(key) == value for key, value in machine.items()):
        if holder["pid"] == os.getpid() and holder.get("started") == process_started(os.getpid()):
            return holder.get("token") in _HELD  # this process: held only while one of its leases holds it
        return process_started(holder["pid"]) == holder.get("started")
    return holder["expires"] > now


def _holder(data: bytes, where: str) -> dict[str, Any] | None:
    """A lease file's content, or None (with a warning naming the file) when it is not a lease."""
    try:
        holder = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        holder, problem = None, f"not JSON ({exc})"
    else:
        problem = "not a lease"
    if isinstance(holder, dict) and (holder.get("released") is True or (
            isinstance(holder.get("pid"), int) and isinstance(holder.get("expires"), int | float)
            and isinstance(holder.get("host"), str))):
        return holder
    run_logger().warning("lease file %s is %s; it is skipped and the next epoch taken", where, problem)
    return None


class DispatchLease:
    """Held from `with` to its end; waits, logging who holds it, while another live run does.

    >>> store = SnapshotStore("/tmp/tracetriage-doc-lease")
    >>> with DispatchLease(store, "demo") as lease:
    ...     lease.check()
    """

    def __init__(self, store: SnapshotStore, loop: str, ttl: float = TTL_SECONDS, poll: float = 0.2,
                 machine: dict[str, str] | None = None):
        self.store, self.loop, self.ttl, self.poll = store, loop, ttl, poll
        self.machine = machine or _machine()
        self.directory = f"{LEASE_DIR}/dispatch-{loop}"
        self.token = uuid.uuid4().hex
        self.epoch = 0
        self.lost = False
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _name(self, epoch: int) -> str:
        return f"{self.directory}/{epoch:012d}.json"

    def _epochs(self) -> list[int]:
        return sorted(int(name.removesuffix(".json")) for name in self.store.listing(self.directory)
                      if name.endswith(".json") and name.removesuffix(".json").isdigit())  # not stray files

    def _claim(self, epoch: int, released: bool = False) -> bool:
        if released:
            content = {"released": True, "token": self.token, "at": datetime.now(UTC).isoformat()}
        else:
            content = {**self.machine, "pid": os.getpid(), "started": process_started(os.getpid()),
                       "token": self.token, "expires": time.time() + self.ttl,
                       "renewed_at": datetime.now(UTC).isoformat()}
        return self.store.put_bytes(self._name(epoch), orjson.dumps(content), exclusive=True)

    def acquire(self) -> None:
        told = False
        while True:
            epochs = self._epochs()
            latest = epochs[-1] if epochs else 0
            if latest:
                data = self.store.get_bytes(self._name(latest))
                if data is None:  # removed by a run that claimed a later epoch
                    continue
                holder = _holder(data, f"{self.store.url}/{self._name(latest)}")
                if holder is not None and not holder.get("released") and holder_alive(holder, time.time(),
                                                                                       self.machine):
                    if not told:
                        until = datetime.fromtimestamp(holder["expires"], UTC).isoformat(timespec="seconds")
                        run_logger().info("dispatch of loop %r waits for the run holding it (host %s, pid %s) to end, "
                                       "or its lease to expire (%s unless renewed)", self.loop, holder["host"],
                                       holder["pid"], until)
                        told = True
                    time.sleep(self.poll)
                    continue
            # Held before the claim is written: another thread of this process that reads the claim at once
            # must see it held (it took the lease over when this thread was descheduled in between).
            _HELD.add(self.token)
            if self._claim(latest + 1):
                self.epoch = latest + 1
                break
            _HELD.discard(self.token)
        # Only the claimer of a later epoch removes earlier ones, so the latest epoch is always there to see.
        self.store.delete([self._name(epoch) for epoch in epochs])
        self._renewer = threading.Thread(target=self._renew_until_released, daemon=True,
                                         name=f"lease-{self.loop}")
        self._renewer.start()

    def _renew_until_released(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            # A later epoch than ours, even one whose number we could claim again after it was cleaned up,
            # means another run took over.
            claimed = self._claim(self.epoch + 1)
            if not claimed or self._epochs()[-1] != self.epoch + 1:
                if claimed:
                    self.store.delete([self._name(self.epoch + 1)])
                log.error("the dispatch lease of loop %r was taken by another run; this one stops", self.loop)
                self.lost = True
                return
            self.store.delete([self._name(self.epoch)])
            self.epoch += 1

    def check(self) -> None:
        if self.lost:
            raise LeaseLost(f"another run took over the dispatch of loop {self.loop!r}; it carries on "
                            f"from the ledger")

    def release(self) -> None:
        """A `released` marker as the next epoch: fails, harmlessly, if another run took over meanwhile."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        _HELD.discard(self.token)  # whatever happens to the marker, this process no longer holds the lease
        if not self.lost:
            self._claim(self.epoch + 1, released=True)

    def __enter__(self) -> DispatchLease:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        try:
            self.release()
        except OSError as error:
            if exc_type is None:
                raise
            # The error that ended the dispatch (often the same full disk) is the one to report.
            log.warning("releasing the dispatch lease of loop %r failed: %s", self.loop, error)
