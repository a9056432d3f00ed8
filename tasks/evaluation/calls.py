"""Calling evaluators: concurrency, timeouts, retries with backoff, a rate limit shared by processes, counters.

Sync evaluators run on up to `max_concurrency` threads ("lanes") watched from the calling thread: a call past
its timeout becomes an error row at the timeout, and its lane is given up on (Python cannot kill a thread; the
daemon thread ends whenever the call returns) and replaced by a fresh one. Async evaluators run on one event
loop under a semaphore. Every attempt first takes a slot of the evaluator's rate limit; an error the config
names as transient (a provider's 429, a network timeout) is retried after a backoff.

No Prefect here: evaluation worker processes import this.
"""

from __future__ import annotations

import asyncio
import fcntl
import itertools
import os
import random
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from tasks.config import CallRateLimit, CallRetry
from tasks.contracts import error_text

DEFAULT_ASYNC_CONCURRENCY = 32
DEFAULT_SYNC_CONCURRENCY = 8

T = TypeVar("T")
R = TypeVar("R")

# Set when the process is asked to stop (SIGTERM): lanes take no more work and watchers return at once.
STOPPING = threading.Event()


class EvaluationStopped(RuntimeError):
    """The process is stopping: the batch's evaluations were given up on."""


class EvaluatorExited(Exception):
    """An evaluator called sys.exit(): an error row, never the end of the process."""


@dataclass
class CallCounters:
    """Calls of one batch: finished (with a result or an error row), in flight, retried, and how many in all."""

    total: int = 0
    done: int = 0
    in_flight: int = 0
    retried: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, total: int = 0, done: int = 0, in_flight: int = 0, retried: int = 0) -> None:
        with self._lock:
            self.total += total
            self.done += done
            self.in_flight += in_flight
            self.retried += retried


class CallLimiter:
    """Calls evenly spaced `interval` seconds apart, shared by every thread and process that opens `path`.

    The state is one number, the time of the next free slot, in a file locked with flock
    for the few microseconds of a reservation; a caller reserves its slot and then waits
    for it outside the lock. Without a path the state is this process's only.
    """

    def __init__(self, limit: CallRateLimit, path: str | Path | None = None):
        self.interval = limit.interval
        self._lock = threading.Lock()  # flock does not exclude threads sharing one file descriptor
        self._next_free = 0.0
        self._fd: int | None = None
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)

    def _update(self, change: Callable[[float, float], tuple[float, float]]) -> float:
        with self._lock:
            now = time.time()
            if self._fd is None:
                self._next_free, result = change(self._sane(self._next_free, now), now)
                return result
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                raw = os.pread(self._fd, 8, 0)
                current = struct.unpack("d", raw)[0] if len(raw) == 8 else 0.0
                stored, result = change(self._sane(current, now), now)
                os.pwrite(self._fd, struct.pack("d", stored), 0)
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            return result

    def _sane(self, next_free: float, now: float) -> float:
        # A slot further ahead than any queue of callers could reserve is left over from a clock change: start over.
        return now if next_free != next_free or next_free > now + 3600 + 1000 * self.interval else next_free

    def slot(self) -> float:
        """Take the next free slot: the time (`time.time()`) at which the caller may call."""

        def take(next_free: float, now: float) -> tuple[float, float]:
            slot = max(now, next_free)
            return slot + self.interval, slot

        return self._update(take)

    def reserve(self) -> float:
        """Take the next free slot; returns the seconds to wait for it."""
        return max(self.slot() - time.time(), 0.0)

    def pause(self, seconds: float) -> None:
        """No slot for anybody in the next `seconds` (a provider's Retry-After)."""
        self._update(lambda next_free, now: (max(next_free, now + seconds), 0.0))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def is_retryable(exc: BaseException, names: list[str]) -> bool:
    """Whether a class along `exc`'s hierarchy is named in `names` ('ClassName' or 'package.ClassName')."""
    for cls in type(exc).__mro__:
        package = cls.__module__.split(".")[0]
        for name in names:
            prefix, _, short = name.rpartition(".")
            if short == cls.__name__ and (not prefix or prefix.split(".")[0] == package):
                return True
    return False


def retry_after(exc: BaseException) -> float | None:
    """The Retry-After seconds of an HTTP error that carries its response (openai, anthropic, httpx)."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    try:
        return max(float(headers.get("retry-after")), 0.0)
    except (TypeError, ValueError):
        return None


def backoff(retry: CallRetry, attempt: int, exc: BaseException) -> float:
    """Seconds before try `attempt + 1`: the error's Retry-After, else exponential with full jitter."""
    told = retry_after(exc)
    if told is not None:
        return min(told, retry.max_backoff)
    return min(retry.max_backoff, retry.backoff * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


@dataclass
class CallPolicy:
    """How one evaluator's calls are made: concurrency, timeout, retries and rate limit."""

    concurrency: int
    timeout: float
    retry: CallRetry
    limiter: CallLimiter | None
    counters: CallCounters

    def retry_wait(self, attempt: int, exc: BaseException) -> float | None:
        """Seconds to wait before trying again, or None when `exc` is final."""
        if attempt >= self.retry.attempts or not is_retryable(exc, self.retry.on):
            return None
        wait = backoff(self.retry, attempt, exc)
        if self.limiter is not None and retry_after(exc) is not None:
            self.limiter.pause(wait)  # the provider said so for every caller, not only this one
        self.counters.add(retried=1)
        return wait


def _settled(returned: Any, settle: Callable[[Any], R], failed: Callable[[str], R]) -> R:
    """What the evaluator returned, read as results; a result that cannot be read is an error row."""
    try:
        return settle(returned)
    except Exception as exc:
        return failed(error_text(exc))


# --- sync evaluators: lanes ------------------------------------------------------------------------------

class _Lane:
    """One worker thread's state: the item and deadline of its current attempt, and whether it was given up on."""

    __slots__ = ("current", "abandoned")

    def __init__(self) -> None:
        self.current: tuple[int, float] | None = None
        self.abandoned = False


@dataclass
class Outcomes(Generic[R]):
    """What becomes of calls: `settle(returned)` reads a result, `failed(message)` makes an error row,
    `on_result(i, result)` hears each item as it settles, `publish()` runs about every 0.2 s (progress)."""

    settle: Callable[[Any], R]
    failed: Callable[[str], R]
    on_result: Callable[[int, R], None] | None = None
    publish: Callable[[], None] | None = None


def call_in_lanes(items: list[T], call: Callable[[T], Any], outcomes: Outcomes[R], policy: CallPolicy) -> list[R]:
    """`settle(call(item))` for each item on up to `policy.concurrency` threads, in item order.

    A call that raises (anything, SystemExit included) or runs past the timeout gives `failed(message)`. The
    watching thread keeps `policy.counters`' done and in-flight counts, each time it publishes: a locked update
    per call, three times, was a tenth of a built-in evaluator's cost.
    """
    settle, failed, on_result, publish = outcomes.settle, outcomes.failed, outcomes.on_result, outcomes.publish
    n = len(items)
    results: list[R | None] = [None] * n
    if not n:
        return []
    lock = threading.Lock()
    remaining = [n]
    finished = threading.Event()
    next_index = itertools.count()
    timeout, clock, counters = policy.timeout, time.monotonic, policy.counters
    lanes: list[_Lane] = []

    def commit(lane: _Lane | None, i: int, result: R) -> None:
        with lock:
            if (lane is not None and lane.abandoned) or results[i] is not None:
                return
            results[i] = result
            remaining[0] -= 1
            if not remaining[0]:
                finished.set()
        if on_result is not None:
            on_result(i, result)

    def attempts(lane: _Lane, i: int) -> R:
        for attempt in itertools.count(1):
            if policy.limiter is not None:
                time.sleep(policy.limiter.reserve())
            if lane.abandoned or STOPPING.is_set():
                return failed("not called: the evaluation was stopped")
            deadline = clock() + timeout
            lane.current = (i, deadline)
            try:
                returned = call(items[i])
            except SystemExit as exc:
                return failed(error_text(EvaluatorExited(f"the evaluator called sys.exit({exc.code!r})")))
            except BaseException as exc:  # noqa: BLE001 - whatever an evaluator raises is its error row
                wait = policy.retry_wait(attempt, exc)
                if wait is None:
                    return failed(error_text(exc))
                time.sleep(wait)
                continue
            finally:
                lane.current = None
            if clock() > deadline:
                return failed(f"timed out after {timeout}s")
            return _settled(returned, settle, failed)
        raise AssertionError("unreachable")

    def work(lane: _Lane) -> None:
        while not lane.abandoned and not STOPPING.is_set():
            i = next(next_index)
            if i >= n:
                return
            commit(lane, i, attempts(lane, i))

    def start_lane() -> None:
        lane = _Lane()
        lanes.append(lane)
        threading.Thread(target=work, args=(lane,), name="evaluator-lane", daemon=True).start()

    counted = [0, 0]  # calls done and in flight, as the counters have them

    def count() -> None:
        done = n - remaining[0]
        in_flight = sum(1 for lane in lanes if lane.current is not None and not lane.abandoned)
        counters.add(done=done - counted[0], in_flight=in_flight - counted[1])
        counted[:] = [done, in_flight]

    for _ in range(min(policy.concurrency, n)):
        start_lane()
    poll = min(0.05, timeout / 10)
    last_publish = 0.0
    while not finished.wait(poll):
        now = clock()
        if STOPPING.is_set():
            raise EvaluationStopped("the process is stopping: evaluation given up")
        for lane in list(lanes):
            current = lane.current
            if lane.abandoned or current is None or now <= current[1]:
                continue
            with lock:
                if lane.current is not current or results[current[0]] is not None:
                    continue
                lane.abandoned = True
            commit(None, current[0], failed(f"timed out after {timeout}s"))
            if not finished.is_set():
                start_lane()
        if now - last_publish >= 0.2:
            count()
            if publish is not None:
                publish()
            last_publish = now
    count()
    if publish is not None:
        publish()
    return results  # type: ignore[return-value]  # every slot is filled once `finished` is set


# --- async evaluators -------------------------------------------------------------------------------------

async def _guarded(awaitable: Awaitable[Any]) -> Any:
    # asyncio lets SystemExit out of the event loop whoever awaits the task: catch it inside the call itself.
    try:
        return await awaitable
    except SystemExit as exc:
        raise EvaluatorExited(f"the evaluator called sys.exit({exc.code!r})") from None


def call_async(items: list[T], call: Callable[[T], Awaitable[Any]], outcomes: Outcomes[R],
               policy: CallPolicy) -> list[R]:
    """`settle(await call(item))` for each item, at most `policy.concurrency` at once, in item order."""
    return asyncio.run(_call_async(items, call, outcomes, policy))


async def _call_async(items: list[T], call: Callable[[T], Awaitable[Any]], outcomes: Outcomes[R],
                      policy: CallPolicy) -> list[R]:
    settle, failed, on_result, publish = outcomes.settle, outcomes.failed, outcomes.on_result, outcomes.publish
    bound = asyncio.Semaphore(policy.concurrency)
    timeout, counters = policy.timeout, policy.counters

    async def attempts(item: T) -> R:
        for attempt in itertools.count(1):
            if policy.limiter is not None:
                await asyncio.sleep(policy.limiter.reserve())
            counters.add(in_flight=1)
            try:
                returned = await asyncio.wait_for(_guarded(call(item)), timeout)
            except TimeoutError:
                return failed(f"timed out after {timeout}s")
            except Exception as exc:
                wait = policy.retry_wait(attempt, exc)
                if wait is None:
                    return failed(error_text(exc))
                await asyncio.sleep(wait)
                continue
            finally:
                counters.add(in_flight=-1)
            return _settled(returned, settle, failed)
        raise AssertionError("unreachable")

    async def one(i: int, item: T) -> R:
        async with bound:
            result = await attempts(item)
        counters.add(done=1)
        if on_result is not None:
            on_result(i, result)
        return result

    async def watch() -> None:
        while True:
            if STOPPING.is_set():
                raise EvaluationStopped("the process is stopping: evaluation given up")
            if publish is not None:
                publish()
            await asyncio.sleep(0.2)

    watcher = asyncio.ensure_future(watch())
    work = asyncio.ensure_future(asyncio.gather(*(one(i, item) for i, item in enumerate(items))))
    done, _ = await asyncio.wait({watcher, work}, return_when=asyncio.FIRST_COMPLETED)
    if watcher in done:
        work.cancel()
        watcher.result()  # raises EvaluationStopped
    watcher.cancel()
    if publish is not None:
        publish()
    return work.result()
