"""Evaluation in worker processes gives the same scores as in-process, and survives a dead worker."""

from __future__ import annotations

import os
from datetime import timedelta

import pyarrow.parquet as pq
import pytest

from tasks.config import LoopConfig
from tasks.evaluation.evaluate import evaluate_batch, evaluation_pool
from tasks.sources.sample import generate_traces, write_sample
from tasks.sources.windows import fetch_windows


@pytest.fixture(scope="module")
def window(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pool")
    write_sample(directory / "runs.jsonl", generate_traces(400, seed=9, hours=1))
    (fetched,) = fetch_windows(str(directory / "runs.jsonl"), timedelta(hours=1), 100, str(directory)).windows
    return fetched


def _scores(path: str):
    return pq.read_table(path).drop_columns(["window_start"]).to_pandas()


def test_worker_processes_score_exactly_as_this_process_does(window, tmp_path):
    config = LoopConfig()
    for batch in range(window.batches):
        here = evaluate_batch(window.path, batch, config.evaluators, window.window_start,
                              str(tmp_path / f"here-{batch}.parquet"), workers=1)
        there = evaluate_batch(window.path, batch, config.evaluators, window.window_start,
                               str(tmp_path / f"there-{batch}.parquet"), workers=2)
        assert _scores(here).equals(_scores(there))


def test_a_worker_killed_between_batches_costs_nothing_the_batch_runs_on_a_fresh_pool(window, tmp_path):
    config = LoopConfig()
    pool = evaluation_pool(2)
    os.kill(pool.submit(os.getpid).result(), 9)  # as the kernel's OOM killer would, while the worker is idle
    files = [evaluate_batch(window.path, batch, config.evaluators, window.window_start,
                            str(tmp_path / f"b-{batch}.parquet"), workers=2) for batch in range(window.batches)]
    assert evaluation_pool(2) is not pool
    here = [evaluate_batch(window.path, batch, config.evaluators, window.window_start,
                           str(tmp_path / f"here-{batch}.parquet"), workers=1) for batch in range(window.batches)]
    for there, expected in zip(files, here, strict=True):
        assert _scores(there).equals(_scores(expected))


def test_a_window_of_more_batches_than_workers_lets_its_workers_go_before_its_analysis(tmp_path, monkeypatch):
    """Workers keep what their batches made: after a large window's evaluation they exit (before the window's
    analysis, the flow process's own peak), and the next window forks new ones. A one-batch window keeps them."""
    import tasks.evaluation.evaluate as evaluate
    from flows.triage import triage
    from tasks.config import FileSource

    write_sample(tmp_path / "runs.jsonl", generate_traces(300, seed=4, hours=2))
    write_sample(tmp_path / "small.jsonl", generate_traces(20, seed=4, hours=1))
    released: list[list[int]] = []
    original = evaluate.shutdown_evaluation_pool

    def releasing() -> None:
        released.append([process.pid for process in (evaluate._POOL._processes or {}).values()])
        original()

    monkeypatch.setattr(evaluate, "shutdown_evaluation_pool", releasing)
    config = LoopConfig(source=FileSource(path=str(tmp_path / "runs.jsonl")), batch_size=50, eval_workers=2)
    windows = triage(config=config, out=str(tmp_path / "out"))["windows"]
    assert len(windows) == 2 and sum(w["traces"] for w in windows) == 300
    assert all(counts["error"] == 0 for w in windows for counts in w["evaluators"].values())
    assert len(released) == 2 and all(len(pids) == 2 for pids in released)
    assert not set(released[0]) & set(released[1])  # the second window's workers were new
    for pid in released[0]:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    released.clear()
    small = LoopConfig(source=FileSource(path=str(tmp_path / "small.jsonl")), eval_workers=2)
    assert triage(config=small, out=str(tmp_path / "small"))["windows"][0]["traces"] == 20
    assert released == []
