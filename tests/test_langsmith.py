"""LangSmith for real: the flow fetches a window through the SDK and writes feedback, queue items and examples.

Every test talks HTTP to the LangSmith-compatible server in `tests/langsmith_server.py`,
which checks each request and response against the official OpenAPI spec.
"""

from __future__ import annotations

import socket
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest

from flows.cli import main
from flows.triage import triage
from tasks.config import ActionConfig, LangSmithSource, LoopConfig, When
from tasks.sources.sample import SAMPLE_START, generate_traces
from tests.langsmith_server import LangSmithTestServer

KEY = "ls-test-key-canary-5d1e"
PROJECT = "support-bot"
START, END = SAMPLE_START, SAMPLE_START + timedelta(hours=1)


@pytest.fixture(scope="module")
def records() -> list[dict]:
    """300 sample traces in the first hour, and 40 in the next (which a one-hour window must not take)."""
    first = generate_traces(300, seed=31, start=START, hours=1).records
    later = generate_traces(40, seed=32, start=END, hours=1).records
    return first + later


@pytest.fixture
def langsmith_env(monkeypatch: pytest.MonkeyPatch):
    def point_at(server: LangSmithTestServer, key: str = KEY) -> None:
        monkeypatch.setenv("LANGSMITH_ENDPOINT", server.url)
        monkeypatch.setenv("LANGSMITH_API_KEY", key)
        monkeypatch.setenv("LANGSMITH_TRACING", "false")
    return point_at


def loop(api: str = "auto", project: str = PROJECT, **source) -> LoopConfig:
    return LoopConfig(
        name="ls-loop", eval_workers=1,
        source=LangSmithSource(project=project, api=api, rate_limit={"requests": 15, "per": "1s"}, **source),
        actions=[
            ActionConfig(when=When(failing=True), do="feedback", on_culprit=True, name="feedback"),
            ActionConfig(when=When(evaluator="answer_grounded", below=0.5), do="annotation_queue",
                         queue="grounding-review", rubric="Is the answer supported by the documents?", name="queue"),
            ActionConfig(when=When(evaluator="answer_relevant", below=0.3), do="dataset", dataset="hard-cases",
                         name="dataset"),
        ],
    )


def external_state(server: LangSmithTestServer) -> dict[str, set]:
    return {
        "feedback": {(f["id"], f["run_id"], f["key"]) for f in server.feedback},
        "queue": {(q, r) for q, runs in server.queue_runs.items() for r in runs},
        "examples": set(server.examples),
    }


def run(config: LoopConfig, out: Path) -> dict:
    return triage(config=config, start=START, end=END, out=str(out))


@pytest.fixture(scope="module")
def clean(records, tmp_path_factory) -> dict:
    """The reference: one clean run against a well-behaved server, and what it left there."""
    with LangSmithTestServer(api_key=KEY) as server, pytest.MonkeyPatch.context() as patch:
        patch.setenv("LANGSMITH_ENDPOINT", server.url)
        patch.setenv("LANGSMITH_API_KEY", KEY)
        server.add_project(PROJECT, records)
        result = run(loop(), tmp_path_factory.mktemp("clean"))
        return {"result": result, "state": external_state(server), "violations": list(server.violations),
                "counts": server.counts()}


def test_a_window_is_fetched_whole_and_its_failures_land_in_langsmith(clean):
    (window,) = clean["result"]["windows"]
    assert window["traces"] == 300  # the later hour's traces stay out; every span of these is in
    failing = window["failing_traces"]
    state = clean["state"]
    assert failing > 0
    assert len(state["feedback"]) == 2 * failing  # on each failing run and on its culprit span
    grounded = window["evaluators"]["answer_grounded"]["fail"]
    relevant = window["evaluators"]["answer_relevant"]["fail"]
    assert len(state["queue"]) == grounded and len(state["examples"]) == relevant
    assert window["actions"]["failed"] == 0
    assert clean["violations"] == []


def test_failing_traces_link_to_langsmith(clean):
    (window,) = clean["result"]["windows"]
    cause = window["root_causes"][0]
    assert cause["example_trace_urls"][0].endswith(f"/r/{cause['example_trace_ids'][0]}"
                                                   f"?trace_id={cause['example_trace_ids'][0]}")


def test_a_rerun_of_the_same_window_adds_nothing(records, langsmith_env, tmp_path):
    with LangSmithTestServer(api_key=KEY) as server:
        langsmith_env(server)
        server.add_project(PROJECT, records)
        run(loop(), tmp_path)
        first = external_state(server)
        adds = len(server.queue_adds)
        again = run(loop(), tmp_path)
        assert external_state(server) == first and len(server.queue_adds) == adds
        assert again["windows"][0]["actions"]["sent"] == 0
        assert server.violations == []


def test_a_rerun_after_a_crash_between_the_sends_and_their_ledger_entries_adds_nothing_twice(records, langsmith_env,
                                                                                              tmp_path):
    """The run died after its sends, before any `sent` reached the ledger: feedback and examples come back as
    409 (same ids), and the queue, whose adds carry no id, is asked which runs it already holds."""
    with LangSmithTestServer(api_key=KEY) as server:
        langsmith_env(server)
        server.add_project(PROJECT, records)
        run(loop(), tmp_path)
        first, adds = external_state(server), len(server.queue_adds)
        for segment in (tmp_path / "snapshots" / "_ledger").rglob("*.jsonl"):  # as the crash left it
            segment.write_text(segment.read_text().replace('"state":"sent"', '"state":"planned"'))
        again = run(loop(), tmp_path)
        assert external_state(server) == first and len(server.queue_adds) == adds > 0
        assert again["windows"][0]["actions"]["sent"] == again["windows"][0]["actions"]["planned"] > 0
        assert server.counts()["queue_list_runs"] == 1 and server.violations == []


@pytest.mark.parametrize("api", ["v2", "v1"])
def test_with_a_fifth_of_requests_failing_the_result_is_the_same_as_a_clean_run(records, langsmith_env, tmp_path,
                                                                                  clean, api):
    with LangSmithTestServer(api_key=KEY, fault_rate=0.3, seed=18, v2=api == "v2", time_factor=0.1) as server:
        langsmith_env(server)
        server.add_project(PROJECT, records)
        result = run(loop(api="auto"), tmp_path)
        assert result["windows"][0]["failing_traces"] == clean["result"]["windows"][0]["failing_traces"]
        assert external_state(server) == clean["state"]  # nothing lost
        assert len(server.queue_adds) == len(clean["state"]["queue"])  # nothing twice
        faulted = Counter(r.kind for r in server.requests if r.fault)
        assert faulted.total() >= 5 and faulted["runs_multipart"] > 0  # the writes too: retried, none twice
        assert server.violations == []


def test_v1_and_v2_fetch_the_same_runs(records, langsmith_env, tmp_path, clean):
    with LangSmithTestServer(api_key=KEY, v2=False) as server:
        langsmith_env(server)
        server.add_project(PROJECT, records)
        result = run(loop(api="auto"), tmp_path)
        assert server.counts()["runs_query_v2"] == 0 and server.counts()["runs_query_v1"] > 0
        assert result["windows"][0]["traces"] == 300
        assert external_state(server) == clean["state"]


def cli(out: Path, *extra: str) -> list[str]:
    return ["run", "--source", f"langsmith:{PROJECT}", "--start", START.isoformat(), "--end", END.isoformat(),
            "--out", str(out), *extra]


def test_a_project_that_does_not_exist_is_one_clear_error_and_no_writes(records, langsmith_env, tmp_path, capsys):
    with LangSmithTestServer(api_key=KEY) as server:
        langsmith_env(server)
        server.add_project("another-project", records)
        assert main(["run", "--source", "langsmith:no-such-project", "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"tracetriage: LangSmith project 'no-such-project' does not exist at {server.url}; "
                       f"check source.project"]
        assert server.feedback == [] and server.queue_adds == [] and server.examples == {}


def test_a_rejected_api_key_is_one_clear_error_and_no_writes(records, langsmith_env, tmp_path, capsys):
    with LangSmithTestServer(api_key=KEY) as server:
        langsmith_env(server, key="wrong-key")
        server.add_project(PROJECT, records)
        assert main(cli(tmp_path)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "rejected the API key (401)" in err[0] and "wrong-key" not in err[0]
        assert server.feedback == [] and server.queue_adds == [] and server.examples == {}


def test_an_unreachable_endpoint_is_one_clear_error(langsmith_env, monkeypatch, tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    monkeypatch.setenv("LANGSMITH_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("LANGSMITH_API_KEY", KEY)
    assert main(cli(tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"tracetriage: cannot reach LangSmith at http://127.0.0.1:{port}")


def test_the_fetch_stays_under_the_cloud_rate_limit_at_the_request_floor(records, tmp_path):
    """With the Cloud limit enforced (windows scaled to a tenth), more pages than the limit allows at once:
    no 429, and one query per page of runs (and at most one more, when the window looked small enough for two
    cursors)."""
    import math

    from langsmith import Client

    from tasks.sources.langsmith import fetch_runs

    with LangSmithTestServer(api_key=KEY, rate_limits=True, time_factor=0.1) as server:
        server.add_project(PROJECT, records)
        client = Client(api_url=server.url, api_key=KEY, auto_batch_tracing=False)
        source = LangSmithSource(project=PROJECT, page_size=100, rate_limit={"requests": 15, "per": "1s"})
        stats = fetch_runs(client, source, START, END, tmp_path / "runs.jsonl")
        assert stats.runs > 15 * 100  # more pages than one window of the limit
        assert server.counts(429).total() == 0
        assert server.counts()["runs_query_v2"] == stats.requests <= math.ceil(stats.runs / 100) + 1
        in_window = {r["trace_id"] for r in records if not r.get("parent_run_id") and r["start_time"] < END.isoformat()}
        kept = (tmp_path / "runs.jsonl").read_text().count("\n")
        assert kept == sum(r["trace_id"] in in_window for r in records)  # whole traces of this window only


def test_the_rate_limiter_holds_however_late_requests_arrive():
    """Requests reach the server up to 0.3 s after they were let go (a busy machine): no window may overflow."""
    import random
    import threading
    import time

    from tasks.sources.langsmith import RateLimiter

    limit, per = 10, 0.3
    limiter, arrivals, lock = RateLimiter(limit, per), [], threading.Lock()

    def send(seed: int) -> None:
        delays = random.Random(seed)
        for _ in range(5):
            with limiter.slot():
                time.sleep(delays.uniform(0, 0.3))  # on its way
                with lock:
                    arrivals.append(time.monotonic())
                time.sleep(delays.uniform(0, 0.02))  # the answer coming back

    threads = [threading.Thread(target=send, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    arrivals.sort()
    busiest = max(sum(t - per < u <= t for u in arrivals) for t in arrivals)
    assert len(arrivals) == 60 and busiest <= limit


@pytest.mark.parametrize("api", ["v2", "v1"])
def test_windows_fetched_in_parallel_are_the_runs_of_one_stream_at_one_extra_page_per_window(tmp_path, api):
    import math

    from langsmith import Client

    from tasks.sources.langsmith import fetch_runs

    three_hours = generate_traces(300, seed=33, start=START, hours=3).records
    end = START + timedelta(hours=3)
    with LangSmithTestServer(api_key=KEY, rate_limits=True, time_factor=0.1, v2=api == "v2") as server:
        server.add_project(PROJECT, three_hours)
        client = Client(api_url=server.url, api_key=KEY, auto_batch_tracing=False)
        source = LangSmithSource(project=PROJECT, page_size=100, rate_limit={"requests": 15, "per": "1s"})
        one = fetch_runs(client, source, START, end, tmp_path / "one.jsonl")
        server.reset_log()
        parallel = fetch_runs(client, source, START, end, tmp_path / "three.jsonl", window=timedelta(hours=1))
        assert (tmp_path / "one.jsonl").read_bytes().count(b"\n") == len(three_hours)
        assert sorted((tmp_path / "one.jsonl").read_text().splitlines()) == \
            sorted((tmp_path / "three.jsonl").read_text().splitlines())
        floor = math.ceil(one.runs / 100)
        assert parallel.requests <= floor + 2 and one.requests <= floor + 1  # one range: perhaps two cursors
        assert server.counts(429).total() == 0 and server.violations == []


@pytest.mark.parametrize("ties", [False, True], ids=["distinct-starts", "runs-sharing-three-starts"])
def test_one_window_is_read_from_both_ends_at_most_one_request_over_the_floor(records, tmp_path, ties):
    """A window of many pages: a newest-first and an oldest-first cursor meet in the middle, each run comes once,
    the file is the one cursor's byte for byte, and it took at most one request more. Also where hundreds of runs
    share the start time at which the cursors meet (they then read on until one passes that time). A one-page
    window takes one request."""
    import math

    from langsmith import Client

    from tasks.sources.langsmith import RateLimiter, _start, fetch_runs

    if ties:  # every run moved back to the start of its 20 minutes: three start times in the window
        records = [{**r, "start_time": (START + timedelta(minutes=(_start(r) - START) // timedelta(minutes=20) * 20))
                    .isoformat()} for r in records]
    with LangSmithTestServer(api_key=KEY) as server:
        server.add_project(PROJECT, records)
        client = Client(api_url=server.url, api_key=KEY, auto_batch_tracing=False)
        source = LangSmithSource(project=PROJECT, page_size=100)
        one = fetch_runs(client, source, START, END, tmp_path / "one.jsonl", limiter=RateLimiter(1, 0.001))
        assert server.counts()["runs_query_v2"] == math.ceil(one.runs / 100) == one.requests  # one cursor: the
        server.reset_log()                                                                       # limit is too low
        both = fetch_runs(client, source, START, END, tmp_path / "both.jsonl", limiter=RateLimiter(100, 1))
        queries = [r for r in server.requests if r.kind == "runs_query_v2"]
        assert (tmp_path / "both.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
        assert both.runs == one.runs and len(queries) == both.requests
        assert 0 < sum(r.sort_order == "ASC" for r in queries) < len(queries)  # two cursors, one oldest first
        if not ties:
            assert both.requests <= one.requests + 1
        assert server.violations == []
        later = fetch_runs(client, LangSmithSource(project=PROJECT, page_size=1000), END, END + timedelta(hours=1),
                           tmp_path / "later.jsonl", limiter=RateLimiter(100, 1))
        assert later.requests == 1 and 0 < later.runs < 1000


def test_feedback_sends_overlap_and_under_faults_each_feedback_lands_once(langsmith_env, tmp_path, monkeypatch):
    """A window's feedback goes in several sends of 100 actions, up to four at once (each with its own ledger
    entries as it ends); with a third of the requests failing, every feedback is there once."""
    import threading

    from tasks.sinks.langsmith import LangSmithWriter

    records = generate_traces(450, seed=33, start=START, hours=1).records
    in_flight, most, lock = [0], [0], threading.Lock()
    send = LangSmithWriter.send

    def counting(self, rule, actions, context):
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        try:
            return send(self, rule, actions, context)
        finally:
            with lock:
                in_flight[0] -= 1

    monkeypatch.setattr(LangSmithWriter, "send", counting)
    config = loop().model_copy(update={"actions": loop().actions[:1]})  # feedback only
    with LangSmithTestServer(api_key=KEY, fault_rate=0.3, seed=0, latency=0.1, time_factor=0.1) as server:
        langsmith_env(server)
        server.add_project(PROJECT, records)
        (window,) = run(config, tmp_path)["windows"]
        failing = window["failing_traces"]
        assert failing > 100  # two sends or more
        assert window["actions"]["sent"] == failing and window["actions"]["failed"] == 0
        ids = [f["id"] for f in server.feedback]
        assert len(ids) == len(set(ids)) == 2 * failing  # each failing run and its culprit span, once
        assert Counter(r.kind for r in server.requests if r.fault)["runs_multipart"] > 0
        assert most[0] >= 2
        again = run(config, tmp_path)["windows"][0]
        assert again["actions"]["sent"] == 0 and len(server.feedback) == 2 * failing
        assert server.violations == []
