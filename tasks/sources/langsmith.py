"""LangSmith as a source: a window's runs in one paginated stream, paced under the rate limit.

Fetching is bounded by requests, not bytes (LangSmith Cloud allows 15 run queries per
10 s per API key), so a window is one query for every span whose start lies in
`[start, end + grace)`, with the largest page and only the fields the loop reads;
traces are then kept whole when their root starts in `[start, end)`. The v2 API
(`POST /v2/runs/query`, pages of up to 1000) is used when the backend has it, the v1
API (`POST /runs/query`, pages of up to 100) otherwise. A token bucket shared by every
query of the process keeps under the limit; a 429 pauses it for `Retry-After`.
The fetched runs are written as a JSONL file of v2 run records, which the file source
reads like any export.
"""

from __future__ import annotations

import collections
import contextlib
import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from tasks.config import ConfigError, LangSmithSource, parse_duration

V2_SELECTS = ["ID", "NAME", "RUN_TYPE", "STATUS", "START_TIME", "END_TIME", "ERROR", "INPUTS", "OUTPUTS",
              "METADATA", "PARENT_RUN_IDS", "PROJECT_ID", "TRACE_ID", "DOTTED_ORDER", "IS_ROOT", "TOTAL_TOKENS",
              "APP_PATH"]
V1_SELECT = ["id", "name", "run_type", "status", "start_time", "end_time", "error", "inputs", "outputs", "extra",
             "parent_run_id", "session_id", "trace_id", "dotted_order", "total_tokens", "app_path"]
V1_PAGE = 100
ATTEMPTS = 8
RETRYABLE = (429, 500, 502, 503, 504)
MIN_V2_VERSION = (0, 16, 0)

if TYPE_CHECKING:  # the SDK loads only where LangSmith is used (its client, 0.4 s to import)
    from langsmith import Client


class LangSmithSourceError(ConfigError):
    """A LangSmith source that cannot be read: unknown project, rejected key, unreachable endpoint."""


class LangSmithFetchError(RuntimeError):
    """A fetch that kept failing after every retry (the task's own retry may still succeed)."""


class RateLimiter:
    """At most `requests` sends in any `per_seconds` (a sliding window, as LangSmith counts), shared by threads.

    A send holds its slot from `acquire` until `release`, and the window is counted from
    the release: the server saw the request before its answer came back, so however late
    a busy machine delivers a request, the server's window never holds more than ours.
    """

    def __init__(self, requests: int, per_seconds: float):
        self.requests, self.per = requests, per_seconds + 0.01
        self._done: collections.deque[float] = collections.deque()
        self._in_flight = 0
        self._paused_until = 0.0
        self._changed = threading.Condition()

    def acquire(self) -> None:
        with self._changed:
            while True:
                now = time.monotonic()
                while self._done and now - self._done[0] >= self.per:
                    self._done.popleft()
                full = self._in_flight + len(self._done) >= self.requests
                if not full and now >= self._paused_until:
                    self._in_flight += 1
                    return
                # When full, a slot frees as the oldest release leaves the window (or at a release, if none has).
                free_at = self._done[0] + self.per if self._done else now + 1.0
                wake = max(free_at, self._paused_until) if full else self._paused_until
                self._changed.wait(max(wake - now, 0.001))

    def release(self) -> None:
        with self._changed:
            self._in_flight -= 1
            self._done.append(time.monotonic())
            self._changed.notify_all()

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        self.acquire()
        try:
            yield
        finally:
            self.release()

    def pause(self, seconds: float) -> None:
        """Nobody sends for `seconds` (a 429's Retry-After)."""
        with self._changed:
            self._paused_until = max(self._paused_until, time.monotonic() + seconds)


_limiters: dict[tuple[str, int, float], RateLimiter] = {}
_limiters_lock = threading.Lock()


def run_query_limiter(api_url: str, requests: int, per_seconds: float) -> RateLimiter:
    """One bucket per endpoint and limit in this process: the limit is per API key, so every fetch shares it."""
    with _limiters_lock:
        return _limiters.setdefault((api_url, requests, per_seconds), RateLimiter(requests, per_seconds))


@dataclass
class FetchStats:
    requests: int = 0
    retries: int = 0
    runs: int = 0
    api: str = ""
    rate_limited: int = 0


def _retry_after(headers: Any) -> float | None:
    value = headers.get("retry-after") if headers is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def backend_version(client: Client) -> tuple[int, ...]:
    version = str(getattr(client.info, "version", "") or "0")
    return tuple(int(part) for part in version.split(".")[:3] if part.isdigit())


def choose_api(client: Client, source: LangSmithSource) -> str:
    """`source.api`, or for 'auto' what `/info` says: v2 where the backend serves run queries from SmithDB
    (`instance_flags.sdb_query_enabled`, LangSmith 0.16 and later), else v1."""
    if source.api != "auto":
        return source.api
    flags = getattr(client.info, "instance_flags", None) or {}
    return "v2" if flags.get("sdb_query_enabled") and backend_version(client) >= MIN_V2_VERSION else "v1"


def project_id(client: Client, project: str) -> str:
    """The project's id; a clear error for a missing project, a rejected key or an unreachable endpoint."""
    return str(source_project(client, project).id)


def trace_url_prefix(client: Client, project: Any) -> str:
    """The LangSmith UI address of a project's traces; append `<trace_id>?trace_id=<trace_id>`."""
    from langsmith import utils as ls_utils

    return f"{ls_utils.get_host_url(None, client.api_url)}/o/{project.tenant_id}/projects/p/{project.id}/r/"


def meta_path(records_path: Path) -> Path:
    return records_path.with_name(records_path.name + ".meta.json")


def source_project(client: Client, project: str) -> Any:
    from langsmith import utils as ls_utils

    try:
        return client.read_project(project_name=project)
    except ls_utils.LangSmithNotFoundError:
        raise LangSmithSourceError(f"LangSmith project {project!r} does not exist at {client.api_url}; "
                                   f"check source.project") from None
    except ls_utils.LangSmithAuthError:
        raise LangSmithSourceError(f"LangSmith at {client.api_url} rejected the API key (401); check "
                                   f"LANGSMITH_API_KEY or the credentials block") from None
    except ls_utils.LangSmithConnectionError as exc:
        # The SDK's message runs over several lines and shows part of the key: keep only the reason.
        reason = re.search(r"\[Errno -?\d+\] ([^'\")\\]+)", str(exc))
        raise LangSmithSourceError(f"cannot reach LangSmith at {client.api_url}: "
                                   f"{reason.group(1) if reason else 'connection failed'}") from None


def _v1_pages(client: Client, limiter: RateLimiter, body: dict[str, Any], stats: FetchStats) -> Iterator[list[dict]]:
    """`POST /runs/query` pages through the SDK's request_with_retries; a 429 pauses the bucket for Retry-After."""

    def on_error(response: Any, attempt: int) -> bool:
        limiter.release()
        stats.retries += 1
        if response.status_code == 429:
            stats.rate_limited += 1
            limiter.pause(_retry_after(response.headers) or 1.0)
        limiter.acquire()
        stats.requests += 1
        return response.status_code in RETRYABLE

    while True:
        limiter.acquire()  # each retry in on_error releases this slot and takes another; the last is released here
        stats.requests += 1
        try:
            response = client.request_with_retries(
                "POST", "/runs/query", request_kwargs={"data": orjson.dumps(body)}, stop_after_attempt=ATTEMPTS,
                handle_response=on_error)
        finally:
            limiter.release()
        page = response.json()
        yield page.get("runs") or []
        cursor = (page.get("cursors") or {}).get("next")
        if not cursor:
            return
        body = {**body, "cursor": cursor}


def _v2_runs(client: Client) -> Any:
    """The SDK's v2 runs resource, sync, with no retries of its own (ours wait for the bucket).

    langsmith 0.15 exposes v2 runs publicly only as an async resource (`Client.runs`)
    whose HTTP client is bound to one event loop; its sync twin is what the SDK itself
    uses (`Client.get_test_results`).
    """
    return client._get_langsmith_api_sync().with_options(max_retries=0).runs


def _v2_pages(client: Client, limiter: RateLimiter, query: dict[str, Any], stats: FetchStats,
              stop: Callable[[], bool] = lambda: False) -> Iterator[tuple[list[dict], bool]]:
    """`POST /v2/runs/query` pages, each with whether another follows, until the last one or until `stop()` says
    so before a request; 429 (pausing for Retry-After), 5xx and dropped connections are retried."""
    from langsmith._exceptions import APIConnectionError, APIStatusError

    runs, cursor = _v2_runs(client), None
    while not stop():
        for attempt in range(ATTEMPTS):
            stats.requests += 1
            try:
                with limiter.slot():
                    answer = runs.with_raw_response.query_v2(**query, **({"cursor": cursor} if cursor else {}))
                break
            except APIStatusError as exc:
                if exc.status_code not in RETRYABLE or attempt + 1 == ATTEMPTS:
                    raise
                if exc.status_code == 429:
                    stats.rate_limited += 1
                    limiter.pause(_retry_after(exc.response.headers) or 1.0)
            except APIConnectionError:
                if attempt + 1 == ATTEMPTS:
                    raise
            stats.retries += 1
            time.sleep(min(0.05 * 2**attempt, 2.0))
        # The page as JSON, not as the SDK's models: building 1,000 of them and dumping them again cost 0.14 s of
        # CPU per page; the records are the same (the models' dump leaves out what is null).
        page = orjson.loads(answer.http_response.content)
        cursor = page.get("next_cursor")
        yield [{k: v for k, v in run.items() if v is not None} for run in page["items"]], bool(cursor)
        if not cursor:
            return


def _from_both_ends(client: Client, limiter: RateLimiter, query: dict[str, Any], bounds: tuple[datetime, datetime],
                    end: datetime, stats: tuple[FetchStats, FetchStats], on_page: Callable[[list[dict]], None]) -> None:
    """One window's runs (roots starting before `end`, their children up to `bounds[1]`) by two cursors at once,
    newest first and oldest first, until they meet.

    Cursors chain each page to the one before, so one cursor reads a window a page at a time. A second cursor,
    oldest first, starts once the newest-first pages say more follow, and only when the pages the window seems to
    hold (from how densely the runs read so far fill the window's time) fit in the rate limit's window: beyond
    that the limit sets the pace, and a request more could cost a whole window of it. The newest-first cursor has
    every run newer than the lowest start it has reached, the oldest-first one every run older than the highest
    it has reached: once the second passes the first, together they have them all and both stop. The price is
    the request in flight when they met: at most one more than the floor.
    """
    low, high = bounds
    lock = threading.Lock()
    frontier: dict[str, datetime | None] = {"DESC": None, "ASC": None}
    finished = threading.Event()
    upward: list[Any] = []
    judged = {"pages": 0, "in_window": 0, "done": False}

    def met() -> bool:
        down, up = frontier["DESC"], frontier["ASC"]
        return finished.is_set() or (down is not None and up is not None and up > down)

    def follow(order: str) -> None:
        try:
            # The SDK's query_v2 has no sort_order argument (the spec has): it goes as an extra body field.
            ordered = {**query, "extra_body": {"sort_order": order}} if order == "ASC" else query
            for page, more in _v2_pages(client, limiter, ordered, stats[1 if order == "ASC" else 0], stop=met):
                with lock:
                    if page:
                        frontier[order] = _start(page[-1])
                    on_page(page)
                if order == "DESC" and more and page and not judged["done"]:
                    judge(page)
        finally:
            finished.set()  # this end reached the other end of the range, or failed: the other stops too

    def judge(page: list[dict]) -> None:
        """Whether to start the oldest-first cursor, once the pages read reach half a page into the window."""
        reached = _start(page[-1])
        judged["pages"] += 1
        judged["in_window"] += sum(_start(run) < end for run in page)
        if judged["in_window"] < query["page_size"] / 2 or reached <= low:
            return  # still in the grace period after the window (or a sparse start): too little to judge by
        judged["done"] = True
        density = judged["in_window"] / max((end - reached).total_seconds(), 1e-3)
        pages = judged["pages"] + density * (reached - low).total_seconds() / query["page_size"]
        if pages <= limiter.requests:
            upward.append(pool.submit(follow, "ASC"))

    with ThreadPoolExecutor(1) as pool:
        follow("DESC")
        for future in upward:
            future.result()


def sub_ranges(
    start: datetime, end: datetime, upper: datetime, size: timedelta | None
) -> list[tuple[datetime, datetime]]:
    """`[start, upper)` cut at window boundaries: one stream per window, the last one carrying the grace period.

    Streams in parallel lower wall time (pages follow cursors one by one) and cost at most
    one partial page per extra window, so a single window is never cut.
    """
    if size is None or end - start <= size:
        return [(start, upper)]
    cuts = [start + i * size for i in range(1, math.ceil((end - start) / size))]
    return list(zip([start, *cuts], [*cuts, upper], strict=True))


def _stream(client: Client, source: LangSmithSource, limiter: RateLimiter, pid: str, api: str,
            bounds: tuple[datetime, datetime], stats: tuple[FetchStats, FetchStats],
            on_page: Callable[[], None], end: datetime | None = None) -> list[dict[str, Any]]:
    """The runs starting in `bounds` (a run may come twice); with the `end` of the window's roots (v2 only), by
    two cursors at once (`_from_both_ends`), `stats[1]` counting the second's requests."""
    low, high = bounds
    runs: list[dict[str, Any]] = []
    seen: set[str] = set()

    def keep(page: list[dict[str, Any]]) -> None:
        runs.extend(page)
        seen.update(run["id"] for run in page)
        stats[0].runs = len(seen)
        on_page()

    extra = [field for field, wanted in (("feedback_stats", source.feedback_stats),
                                         ("reference_example_id", source.experiment)) if wanted]
    if api == "v2":
        query = {"project_ids": [pid], "min_start_time": _iso(low), "max_start_time": _iso(high),
                 "selects": V2_SELECTS + [f.upper() for f in extra], "page_size": source.page_size}
        query.update({k: v for k, v in (("filter", source.filter), ("trace_filter", source.trace_filter)) if v})
        if end is not None:
            _from_both_ends(client, limiter, query, bounds, end, stats, keep)
            return runs
        pages = (page for page, _ in _v2_pages(client, limiter, query, stats[0]))
    else:
        # v1's start_time / end_time bound the runs' start times.
        body = {"session": [pid], "start_time": _iso(low), "end_time": _iso(high), "select": V1_SELECT + extra,
                "limit": V1_PAGE}
        body.update({k: v for k, v in (("filter", source.filter), ("trace_filter", source.trace_filter)) if v})
        pages = _v1_pages(client, limiter, body, stats[0])
    for page in pages:
        keep(page)
    return runs


def fetch_runs(
    client: Client, source: LangSmithSource, start: datetime, end: datetime, out: Path,
    limiter: RateLimiter | None = None, on_page: Callable[[FetchStats], None] | None = None,
    window: timedelta | None = None, parallel: int = 4,
) -> FetchStats:
    """Every run of the traces whose root starts in `[start, end)`, as run records (JSONL) in `out`.

    With `window` and a range of several windows, up to `parallel` windows are fetched at
    once, all under the one rate limiter.
    """
    limiter = limiter or run_query_limiter(client.api_url, source.rate_limit.requests, source.rate_limit.per_seconds)
    project = source_project(client, source.project)
    pid, api = str(project.id), choose_api(client, source)
    ranges = sub_ranges(start, end, end + parse_duration(source.grace), window)
    streams = [(FetchStats(api=api), FetchStats(api=api)) for _ in ranges]
    counted = [s for pair in streams for s in pair]

    def total() -> FetchStats:
        return FetchStats(requests=sum(s.requests for s in counted), retries=sum(s.retries for s in counted),
                          runs=sum(s.runs for s in counted), api=api,
                          rate_limited=sum(s.rate_limited for s in counted))

    def report_page() -> None:
        if on_page:
            on_page(total())

    try:
        with ThreadPoolExecutor(max(1, min(parallel, len(ranges)))) as pool:
            # One window's range (a scheduled run's) is fetched from both ends; several windows, in parallel.
            parts = list(pool.map(lambda i: _stream(client, source, limiter, pid, api, ranges[i], streams[i],
                                                    report_page, end if len(ranges) == 1 else None),
                                  range(len(ranges))))
    except Exception as exc:
        raise LangSmithFetchError(f"fetching runs of {source.project!r} from {client.api_url} failed after "
                                   f"{total().requests} requests: {type(exc).__name__}: {exc}") from exc
    # Once each (v1 bounds are inclusive, and two cursors may both bring the runs where they met), newest first
    # however the range was cut: the same runs make the same file.
    unique = {run["id"]: run for part in parts for run in part}.values()
    runs = sorted(unique, key=lambda run: (_start(run), str(run["id"])), reverse=True)
    if source.experiment:
        attach_examples(client, runs, project.reference_dataset_id, stats=streams[0][0])
    stats = total()
    stats.runs = len(runs)
    write_complete_traces(runs, start, end, out)
    meta_path(out).write_bytes(orjson.dumps({"trace_url": trace_url_prefix(client, project), "project_id": pid}))
    return stats


EXAMPLES_PAGE = 100  # example ids per `GET /examples` (they go in the query string)


def attach_examples(client: Client, runs: list[dict[str, Any]], dataset_id: Any, stats: FetchStats) -> int:
    """Each root run of an experiment gets the dataset example it was made from, as `reference_example`
    (what evaluators taking `example` or `reference_outputs` are given); fetched by id, a page of ids per
    request, never one request per run. Returns how many runs got one."""
    wanted = sorted({str(r["reference_example_id"]) for r in runs if r.get("reference_example_id") and _is_root(r)})
    examples: dict[str, dict[str, Any]] = {}
    for begin in range(0, len(wanted), EXAMPLES_PAGE):
        stats.requests += 1
        page = client.list_examples(dataset_id=dataset_id, example_ids=wanted[begin:begin + EXAMPLES_PAGE],
                                    limit=EXAMPLES_PAGE)
        examples.update({str(e.id): e.model_dump(mode="json") for e in page})
    found = 0
    for run in runs:
        example = examples.get(str(run.get("reference_example_id")))
        if example is not None and _is_root(run):
            run["reference_example"] = example
            found += 1
    return found


def source_range(client: Client, source: LangSmithSource, start: datetime | None, end: datetime | None,
                 size: timedelta, lag: timedelta) -> tuple[datetime, datetime]:
    """The windows a LangSmith run triages: `[start, end)` aligned; by default the last closed window, or for
    an experiment every window its runs started in."""
    if source.experiment and start is None:
        project = source_project(client, source.project)
        first = project.start_time
        last = getattr(project, "last_run_start_time", None) or project.end_time or datetime.now(UTC)
        return window_range(_aware(first), _aware(last) + timedelta(microseconds=1), size, lag)
    return window_range(start, end, size, lag)


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _start(run: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(str(run["start_time"]).replace("Z", "+00:00")).astimezone(UTC)


def _is_root(run: dict[str, Any]) -> bool:
    if "is_root" in run:
        return bool(run["is_root"])
    return not run.get("parent_run_id") and not run.get("parent_run_ids")


def write_complete_traces(runs: list[dict[str, Any]], start: datetime, end: datetime, out: Path) -> int:
    """Runs of traces whose root starts in `[start, end)`, one JSON line each; returns how many."""
    roots = {str(r["trace_id"]) for r in runs if _is_root(r) and start <= _start(r) < end}
    keep = [r for r in runs if str(r.get("trace_id")) in roots]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as handle:
        for run in keep:
            handle.write(orjson.dumps(run) + b"\n")
    tmp.replace(out)
    return len(keep)


def window_range(start: datetime | None, end: datetime | None, size: timedelta, lag: timedelta,
                 now: datetime | None = None) -> tuple[datetime, datetime]:
    """The windows a LangSmith run triages: `[start, end)` aligned, or by default the last closed window."""
    step = size.total_seconds()

    def align(moment: datetime) -> datetime:
        return datetime.fromtimestamp(moment.timestamp() // step * step, UTC)

    if start is None:
        closed = align((now or datetime.now(UTC)) - lag) - size
        return closed, closed + size
    first = align(start)
    last = align(end - timedelta(microseconds=1)) + size if end else first + size
    return first, last
