"""Benchmark: a LangSmith window through tracetriage vs the hand-written loop of langsmith-sdk #2907.

    .venv/bin/python bench/langsmith_fetch.py [--traces 2000] [--latency 0.05] [--time-factor 1.0]

Both talk HTTP to the LangSmith-compatible test server (tests/langsmith_server.py), in a
process of its own (LangSmith is remote), which holds `--traces` sample traces in one hour,
adds `--latency` seconds to every request and enforces LangSmith Cloud's rate limits per API key (run queries 15 / 10 s,
feedback 2,000 / 10 s, others 1,000 / 10 s; `--time-factor` < 1 shortens the windows).

- tracetriage: the triage flow with a LangSmith source and `do: feedback` on every
  failing trace (fetch, evaluate, attribute, ..., write-back).
- baseline: root runs via `list_runs`, then the children of each trace with one
  `list_runs(trace_id=...)` each, then `create_feedback` per failing run (the same
  failing runs tracetriage found), serially, as #2907's users write it today.

Prints, for both: requests made by route, wall time, and the run-query requests against
the floor `ceil(spans / page_size)` (page size 1,000 for v2).

The server checks each of its answers against the OpenAPI spec, as in the tests; that check is its own
cost (under 1 ms per page of 1,000 runs with jsonschema-rs; 0.13 s with pure-Python jsonschema), not
LangSmith's. `--no-answer-check` turns it off, to see tracetriage's time against a server whose
speed is not the stand-in's.

With `--feedback-scores`, every root run first gets a `correctness` feedback (as an online
evaluator would have written it) and the loop's only evaluator is
`langsmith:feedback/correctness`: the requests it makes are counted against the same floor
(the scores come with the run query: no feedback listing).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ["LANGSMITH_TRACING"] = "false"

KEY = "bench-key"
PROJECT = "bench-project"


def tracetriage(server, out: Path) -> tuple[float, list[str]]:
    from prefect.settings import temporary_settings

    from flows.triage import triage
    from tasks.config import ActionConfig, LangSmithSource, LoopConfig, When
    from tasks.sources.sample import SAMPLE_START

    config = LoopConfig(name="bench", source=LangSmithSource(project=PROJECT),
                        actions=[ActionConfig(when=When(failing=True), do="feedback", name="feedback")])
    t = time.perf_counter()
    with temporary_settings(updates={"flows.heartbeat_frequency": None}):  # as `tracetriage run` runs flows
        result = triage(config=config, start=SAMPLE_START, end=SAMPLE_START + timedelta(hours=1), out=str(out))
    elapsed = time.perf_counter() - t
    (window,) = result["windows"]
    assert window["actions"]["failed"] == 0, window["actions"]
    failing = sorted({f["run_id"] for f in server.feedback})
    return elapsed, failing


def feedback_scores(server, records: list[dict], out: Path, floor: int) -> None:
    """The loop on scores already in LangSmith: requests against the floor, and the verdicts they gave."""
    from flows.triage import triage
    from tasks.config import EvaluatorConfig, LangSmithSource, LoopConfig
    from tasks.sources.sample import SAMPLE_START

    roots = [r["id"] for r in records if r.get("parent_run_id") is None]
    server.add_feedback([{"id": f"fb-{i}", "run_id": run_id, "key": "correctness", "score": (i % 5) / 4}
                         for i, run_id in enumerate(roots)])
    config = LoopConfig(name="bench-feedback", source=LangSmithSource(project=PROJECT),
                        evaluators=[EvaluatorConfig(key="correctness", ref="langsmith:feedback/correctness")])
    server.reset_log()
    t = time.perf_counter()
    (window,) = triage(config=config, start=SAMPLE_START, end=SAMPLE_START + timedelta(hours=1),
                       out=str(out))["windows"]
    elapsed = time.perf_counter() - t
    counts = server.counts()
    queries = counts["runs_query_v2"] + counts["runs_query_v1"]
    expected = sum((i % 5) / 4 < 0.5 for i in range(len(roots)))
    print(f"feedback as score: {elapsed:.1f} s wall, {counts.total()} requests ({queries} run queries, "
          f"{counts['feedback_list']} feedback listings), run queries / floor = {queries / floor:.2f}; "
          f"{window['failing_traces']} failing of {len(roots)} (the feedback says {expected})")


def baseline(failing: list[str]) -> float:
    """The #2907 script: roots, children per trace, feedback per failing run; one request at a time."""
    from langsmith import Client

    from tasks.sources.sample import SAMPLE_START

    client = Client(api_url=os.environ["LANGSMITH_ENDPOINT"], api_key=KEY, auto_batch_tracing=False)
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        roots = list(client.list_runs(project_name=PROJECT, is_root=True, start_time=SAMPLE_START))
        spans = 0
        for i, root in enumerate(roots):
            spans += len(list(client.list_runs(project_name=PROJECT, trace_id=root.trace_id)))
            if i % 200 == 0:
                print(f"  baseline: children of {i}/{len(roots)} traces, {time.perf_counter() - t:.0f} s", flush=True)
        for run_id in failing:
            client.create_feedback(run_id, key="tracetriage_failure", score=0.0, feedback_source_type="model",
                                   session_id=roots[0].session_id)
    print(f"  baseline read {len(roots)} roots and {spans} spans")
    return time.perf_counter() - t


def _serve(conn, options: dict) -> None:
    """The child process: a LangSmith test server, its state read and changed through `conn`."""
    from tests.langsmith_server import LangSmithTestServer

    with LangSmithTestServer(**options) as server:
        conn.send(server.url)
        while (message := conn.recv()) is not None:
            name, args = message
            if name == "feedback_extend":
                conn.send(server.feedback.extend(args[0]))
            elif callable(value := getattr(server, name)):
                conn.send(value(*args))
            else:
                conn.send(value)


class RemoteServer:
    """The LangSmith test server in a process of its own, as LangSmith is remote: its request handling (and its
    checks of every answer against the OpenAPI spec) does not share this process's GIL with the loop measured."""

    def __init__(self, **options):
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, options), daemon=True)
        self._process.start()
        self.url = self._conn.recv()

    def _call(self, name: str, *args):
        self._conn.send((name, args))
        return self._conn.recv()

    def __enter__(self) -> RemoteServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self._conn.send(None)
        self._process.join(timeout=10)

    def add_project(self, name: str, records: list[dict]) -> str:
        return self._call("add_project", name, records)

    def counts(self, status="any"):
        return self._call("counts", status)

    def reset_log(self) -> None:
        self._call("reset_log")

    @property
    def feedback(self) -> list[dict]:
        return self._call("feedback")

    @property
    def ingest_parts(self) -> list[int]:
        return self._call("ingest_parts")

    def add_feedback(self, items: list[dict]) -> None:
        self._call("feedback_extend", items)

    @property
    def requests(self) -> list:
        return self._call("requests")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--traces", type=int, default=2000)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--time-factor", type=float, default=1.0)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--no-answer-check", action="store_true",
                        help="the test server does not check its answers against the spec (its own cost, under 1 ms "
                             "per page of 1,000 runs, most of a page's time): LangSmith's speed, not the stand-in's")
    parser.add_argument("--feedback-scores", action="store_true",
                        help="only the loop on scores already in LangSmith (langsmith:feedback/<key>)")
    args = parser.parse_args()

    import tempfile

    from prefect.testing.utilities import prefect_test_harness

    from flows.local_api import record_task_runs_in_batches

    record_task_runs_in_batches()  # as the CLI's local server records them

    from tasks.sources.sample import SAMPLE_START, generate_traces

    records = generate_traces(args.traces, seed=2907, start=SAMPLE_START, hours=1).records
    spans = len(records)
    floor = math.ceil(spans / 1000)
    print(f"{args.traces:,} traces, {spans:,} spans; latency {args.latency * 1000:.0f} ms per request; "
          f"rate limits x{args.time_factor:g} of LangSmith Cloud's; the server "
          f"{'does not check' if args.no_answer_check else 'checks'} its answers against the spec")
    print(f"run-query floor: ceil({spans:,} / 1000) = {floor} queries "
          f"({math.ceil(floor / 15) - 1} rate-limit waits of {10 * args.time_factor:g} s)")
    with prefect_test_harness(server_startup_timeout=60), \
            RemoteServer(api_key=KEY, latency=args.latency, rate_limits=True, time_factor=args.time_factor,
                         check_answers=not args.no_answer_check) as server:
        os.environ["LANGSMITH_ENDPOINT"], os.environ["LANGSMITH_API_KEY"] = server.url, KEY
        server.add_project(PROJECT, records)
        if args.feedback_scores:
            feedback_scores(server, records, Path(tempfile.mkdtemp(prefix="tracetriage-bench-fb-")), floor)
            return
        ours, failing = tracetriage(server, Path(tempfile.mkdtemp(prefix="tracetriage-bench-ls-")))
        counts = server.counts()
        our_requests = counts.total()
        queries = counts["runs_query_v2"] + counts["runs_query_v1"]
        limited = server.counts(429).total()
        writes, parts = counts["runs_multipart"] + counts["feedback_create"], sum(server.ingest_parts)
        print(f"tracetriage: {ours:.2f} s wall (whole flow), {counts.total()} requests "
              f"({queries} run queries, {limited} answered 429), run queries / floor = {queries / floor:.2f}; "
              f"{len(failing)} failing runs got feedback: {parts} multipart parts in {writes} write requests, "
              f"{writes / math.ceil(max(parts, 1) / 100):.2f}x the floor ceil({parts} / 100)")
        print(f"  by route: {', '.join(f'{kind} {n}' for kind, n in sorted(counts.items()))}")
        log = server.requests
        first = min(r.time for r in log)
        spans_by_kind: dict[str, list[float]] = {}
        for r in log:
            spans_by_kind.setdefault(r.kind, []).append(r.time - first)
        print("  when (s after the first request, as the server logged them): " + "; ".join(
            f"{kind} {min(times):.2f}-{max(times):.2f}" for kind, times in sorted(spans_by_kind.items(),
                                                                                 key=lambda kv: min(kv[1]))))
        if args.skip_baseline:
            return
        server.reset_log()
        theirs = baseline(failing)
        counts = server.counts()
        queries = counts["runs_query_v2"] + counts["runs_query_v1"]
        print(f"baseline:    {theirs:.1f} s wall, {counts.total()} requests ({queries} run queries, "
              f"{counts['feedback_create']} feedback, {server.counts(429).total()} answered 429), "
              f"run queries / floor = {queries / floor:.1f}")
        print(f"tracetriage: {theirs / ours:.1f}x less wall time, {counts.total() / our_requests:.1f}x fewer "
              f"requests than the baseline")


if __name__ == "__main__":
    main()
