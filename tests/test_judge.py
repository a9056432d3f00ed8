"""LLM-as-judge evaluators at a provider's limit: concurrent by default, rate-limited across processes,
retried on rate-limit errors, never paid for twice. The model is a local fake chat-completions API."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import openai
import pyarrow.parquet as pq
import pytest

from tasks.config import CallRateLimit, EvaluatorConfig, FileSource, LoopConfig
from tasks.evaluation.batch_state import read_state, state_path
from tasks.evaluation.calls import DEFAULT_ASYNC_CONCURRENCY, DEFAULT_SYNC_CONCURRENCY, CallLimiter
from tasks.evaluation.evaluate import evaluate_batch, evaluation_pool
from tasks.evaluation.evaluators import bind_evaluator, evaluate_items, register
from tasks.evaluation.scoring import EvaluationSettings, evaluate_batch_file
from tasks.sources.sample import generate_traces, write_sample
from tasks.sources.windows import fetch_windows
from tests.fake_model_server import FakeModelServer

JUDGE_PROMPT = "Does the answer address the question?\n<question>{inputs}</question>\n<answer>{outputs}</answer>"
FAST_RETRY = {"attempts": 4, "backoff": 0.01, "max_backoff": 0.05}


def correctness_judge(base_url: str) -> Any:
    """The docs' openevals example, with the judge's OpenAI client pointed at `base_url`."""
    from openevals.llm import create_llm_as_judge

    return create_llm_as_judge(prompt=JUDGE_PROMPT, feedback_key="helpful", model="gpt-4o-mini",
                               judge=openai.OpenAI(base_url=base_url, api_key="test-key", max_retries=0))


class InFlight:
    """Counts calls in flight; each call waits until `expected` are in flight (or a second passes), so the
    concurrency reached does not depend on how fast the machine is."""

    def __init__(self, expected: int):
        self.expected, self.now, self.most = expected, 0, 0
        self.lock = threading.Lock()
        self.reached = threading.Event()

    def enter(self) -> None:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
            if self.now >= self.expected:
                self.reached.set()

    def leave(self) -> None:
        with self.lock:
            self.now -= 1


def _items(n: int) -> list[tuple[dict[str, Any], None]]:
    return [({"inputs": {"question": f"q{i}"}, "outputs": {"answer": "a"}, "metadata": None}, None) for i in range(n)]


@pytest.mark.parametrize(("kind", "max_concurrency", "expected"), [
    ("async", None, DEFAULT_ASYNC_CONCURRENCY), ("sync", None, DEFAULT_SYNC_CONCURRENCY),
    ("async", 5, 5), ("sync", 3, 3), ("sync", 1, 1),
])
def test_concurrency_reaches_the_default_and_never_exceeds_max_concurrency(kind, max_concurrency, expected):
    flight = InFlight(expected)

    async def async_judge(*, inputs):
        flight.enter()
        for _ in range(100):
            if flight.reached.is_set():
                break
            await asyncio.sleep(0.01)
        flight.leave()
        return 1.0

    def sync_judge(*, inputs):
        flight.enter()
        flight.reached.wait(1)
        flight.leave()
        return 1.0

    bound = bind_evaluator(EvaluatorConfig(key="judge", ref=register(async_judge if kind == "async" else sync_judge),
                                           max_concurrency=max_concurrency))
    results = evaluate_items(bound, _items(3 * expected))
    assert [r[0].score for r in results] == [1.0] * (3 * expected)
    assert flight.most == expected


def _reserve_slots(path: str, count: int, queue: Any) -> None:
    limiter = CallLimiter(CallRateLimit(requests=50, per="1s"), path)
    for _ in range(count):
        queue.put(limiter.slot())


def test_the_rate_limit_holds_across_two_processes(tmp_path):
    context = multiprocessing.get_context("forkserver")
    queue = context.Queue()
    path = str(tmp_path / "judge.slot")
    workers = [context.Process(target=_reserve_slots, args=(path, 20, queue)) for _ in range(2)]
    for worker in workers:
        worker.start()
    slots = sorted(queue.get(timeout=30) for _ in range(40))
    for worker in workers:
        worker.join(timeout=10)
    gaps = [later - earlier for earlier, later in zip(slots, slots[1:], strict=False)]
    assert min(gaps) >= 1 / 50 - 1e-6  # 50 a second, evenly spaced, whichever process asked (1e-6: float time)


@pytest.fixture(scope="module")
def window(tmp_path_factory):
    directory = tmp_path_factory.mktemp("judge")
    write_sample(directory / "runs.jsonl", generate_traces(12, seed=4, hours=1, rates={"tool_error": 0.0}))
    (fetched,) = fetch_windows(str(directory / "runs.jsonl"), timedelta(hours=1), 6, str(directory)).windows
    return fetched


def call_log_judge(log: str) -> Any:
    """A judge that notes when each call starts (and in which process) in the file `log`."""

    def judge(*, inputs: dict) -> float:
        with open(log, "a") as file:
            file.write(f"{os.getpid()} {time.time()}\n")
        for _ in range(200):  # hold this worker until the other one calls too, so both batches run at once
            if len({line.split()[0] for line in Path(log).read_text().splitlines()}) > 1:
                break
            time.sleep(0.1)
        return 1.0

    return judge


def test_calls_in_two_worker_processes_keep_to_the_shared_rate_limit(window, tmp_path):
    log = tmp_path / "calls.log"
    judge = EvaluatorConfig(key="judge", ref="tests.test_judge:call_log_judge", params={"log": str(log)},
                            rate_limit={"requests": 5, "per": "1s"})
    settings = EvaluationSettings(str(tmp_path / "work"))
    list(evaluation_pool(2).map(time.sleep, [0.5, 0.5]))  # two workers up and idle: one batch each
    with ThreadPoolExecutor(2) as threads:
        list(threads.map(lambda b: evaluate_batch(window.path, b, [judge], window.window_start,
                                                  str(tmp_path / f"s{b}.parquet"), 2, settings), [0, 1]))
    calls = [line.split() for line in log.read_text().splitlines()]
    starts = sorted(float(moment) for _, moment in calls)
    assert len(starts) == window.traces == 12 and len({pid for pid, _ in calls}) == 2
    # 5 a second for both workers together (each alone would allow itself 5): never more than 5 calls starting
    # within one second, give or take one woken late.
    most = max(sum(1 for later in starts if start <= later < start + 1) for start in starts)
    assert most <= 6


def test_a_judge_that_draws_two_rate_limit_errors_then_answers_gives_a_score(window, tmp_path):
    with FakeModelServer(fail_first=2) as server:
        judge = EvaluatorConfig(key="helpful", ref="tests.test_judge:correctness_judge",
                                params={"base_url": server.base_url}, max_concurrency=1, retry=FAST_RETRY)
        out = str(tmp_path / "scores.parquet")
        evaluate_batch_file(window.path, 0, [judge], window.window_start, out)
        scores = pq.read_table(out).to_pandas()
    assert scores["error"].isna().all()
    assert scores["score"].tolist() == [1.0] * len(scores)
    assert server.rejected == 2 and server.requests == len(scores)
    state = read_state(state_path(out))  # what the progress bar shows: calls done, in flight, retried
    assert (state.done, state.total, state.in_flight, state.retried) == (len(scores), len(scores), 0, 2)


def test_a_judge_that_stays_rate_limited_gives_error_rows_after_its_retries(window, tmp_path):
    with FakeModelServer(fail_first=1000) as server:
        judge = EvaluatorConfig(key="helpful", ref="tests.test_judge:correctness_judge",
                                params={"base_url": server.base_url}, retry=FAST_RETRY)
        out = str(tmp_path / "scores.parquet")
        evaluate_batch_file(window.path, 0, [judge], window.window_start, out)
        scores = pq.read_table(out).to_pandas()
    assert scores["error"].str.startswith("RateLimitError: ").all()
    assert server.rejected == 4 * len(scores)  # each run tried `attempts` times


def _triage(source, out, server: FakeModelServer, *extra: EvaluatorConfig) -> dict:
    from flows.triage import triage

    judge = EvaluatorConfig(key="helpful", ref="tests.test_judge:correctness_judge",
                            params={"base_url": server.base_url})
    config = LoopConfig(source=FileSource(path=str(source)), evaluators=[judge, *extra], eval_workers=1)
    return triage(config=config, out=str(out))


def test_a_rerun_makes_no_model_calls_even_when_other_evaluators_changed(tmp_path):
    source = tmp_path / "runs.jsonl"
    write_sample(source, generate_traces(8, seed=6, hours=1, rates={"tool_error": 0.0}))
    with FakeModelServer() as server:
        first = _triage(source, tmp_path / "out", server)
        assert server.requests == 8
        again = _triage(source, tmp_path / "out", server)
        changed = _triage(source, tmp_path / "out", server,
                          EvaluatorConfig(key="no_error", ref="builtin:error_free", threshold=1.0))
        assert server.requests == 8  # neither rerun called the model
    for result in (first, again, changed):
        assert sum(w["evaluators"]["helpful"]["pass"] for w in result["windows"]) == 8
    assert sum(w["evaluators"]["no_error"]["pass"] for w in changed["windows"]) == 8


def test_the_openevals_llm_as_judge_example_scores_runs_against_a_local_chat_completions_api(window, tmp_path):
    with FakeModelServer() as server:
        judge = EvaluatorConfig(key="helpful", ref="tests.test_judge:correctness_judge",
                                params={"base_url": server.base_url})
        out = str(tmp_path / "scores.parquet")
        evaluate_batch_file(window.path, 0, [judge], window.window_start, out)
        scores = pq.read_table(out).to_pandas()
        prompts = list(server.prompts)
    assert scores["feedback_key"].tolist() == ["helpful"] * len(scores)
    assert scores["score"].tolist() == [1.0] * len(scores)
    assert scores["comment"].tolist() == ["The answer addresses the question."] * len(scores)
    assert len(prompts) == len(scores) and all("<question>" in p for p in prompts)


def test_evaluation_workers_opening_a_new_judge_cache_at_once_keep_every_result(tmp_path):
    """Setting WAL mode and creating the table take locks SQLite may refuse at once ("database is locked"), which
    was once taken for a damaged file: renamed away under the other openers, their results lost or their batch
    failed ("no such table", "disk I/O error"). Threads open their own connections as processes do; 40 tries
    caught the old code nearly every time (3 of 40 tries failed)."""
    from tasks.evaluation.evaluators import Result
    from tasks.evaluation.judge_cache import JudgeCache

    for trial in range(40):
        path = tmp_path / f"t{trial}" / "judge-cache.sqlite"
        start, errors = threading.Event(), []

        def open_and_put(opener: int, path: Path = path, start: threading.Event = start,
                         errors: list[Exception] = errors) -> None:
            start.wait(30)  # every opener at the same moment, as the workers' first batches
            try:
                cache = JudgeCache(path)
                cache.put("v1", f"run-{opener}", [Result("helpful", 1.0, None, None, None)])
                cache.close()
            except Exception as exc:  # noqa: BLE001 - collected, asserted below
                errors.append(exc)

        openers = [threading.Thread(target=open_and_put, args=(n,)) for n in range(8)]
        for opener in openers:
            opener.start()
        start.set()
        for opener in openers:
            opener.join(timeout=60)
        assert errors == []
        assert _cache_files(path.parent) == [path.name]
        cache = JudgeCache(path)
        assert len(cache.get_many("v1", [f"run-{n}" for n in range(8)])) == 8
        cache.close()


def _cache_files(directory: Path) -> list[str]:
    """The files of a directory but SQLite's WAL and shared memory and the cache's setup lock."""
    return sorted(p.name for p in directory.iterdir() if not p.name.endswith(("-wal", "-shm", ".lock")))


def test_a_damaged_judge_cache_is_set_aside_and_a_new_one_started(tmp_path, caplog):
    from tasks.evaluation.evaluators import Result
    from tasks.evaluation.judge_cache import JudgeCache

    path = tmp_path / "judge-cache.sqlite"
    path.write_bytes(b"not a database, " * 512)  # e.g. overwritten by a crash or by hand
    cache = JudgeCache(path)
    cache.put("v1", "run-1", [Result("helpful", 1.0, None, None, None)])
    cache.close()
    assert "is unreadable" in caplog.text
    [aside] = [name for name in _cache_files(tmp_path) if name != path.name]  # kept, not deleted
    assert aside.startswith("judge-cache.damaged-")
    assert list(JudgeCache(path).get_many("v1", ["run-1"])) == ["run-1"]


def test_a_judge_cache_left_half_made_by_a_killed_worker_is_made_anew(tmp_path):
    from tasks.evaluation.evaluators import Result
    from tasks.evaluation.judge_cache import JudgeCache

    path = tmp_path / "judge-cache.sqlite"
    (tmp_path / ".judge-cache.sqlite.new").write_bytes(b"half")  # the worker was killed while making it
    cache = JudgeCache(path)
    cache.put("v1", "run-1", [Result("helpful", 1.0, None, None, None)])
    cache.close()
    assert _cache_files(tmp_path) == [path.name]
    assert list(JudgeCache(path).get_many("v1", ["run-1"])) == ["run-1"]
