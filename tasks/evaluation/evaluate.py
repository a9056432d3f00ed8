"""Evaluation of a window: batches of whole traces scored in a pool of worker processes, as Prefect tasks.

The scoring itself is `tasks/evaluation/scoring.py`, which the worker processes import.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task, unmapped
from prefect.tasks import exponential_backoff

from tasks.analysis.attribution import read_spans
from tasks.cache import stable_hash, stage_cache_key
from tasks.config import EvaluatorConfig, LoopConfig
from tasks.contracts import ScoredWindow, WindowSpans
from tasks.evaluation.batch_state import BatchState, read_state, state_path
from tasks.evaluation.calls import STOPPING, EvaluationStopped
from tasks.evaluation.scoring import EvaluationSettings, bind_all, die_with_parent, evaluate_batch_file, metadata_path
from tasks.progress import track_batches

_POOL: ProcessPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


class EvaluationWorkerDied(RuntimeError):
    """Evaluation worker processes kept dying on a batch, before any evaluator could be blamed."""


def _stop_evaluations() -> None:
    """Give up in-flight evaluations at once: on SIGTERM, and at interpreter shutdown (before the thread pools join
    their threads, which would otherwise wait for a hung evaluator)."""
    STOPPING.set()
    if _POOL is not None:
        _kill_workers(_POOL)


@contextlib.contextmanager
def stopped_by_signals() -> Iterator[None]:
    """While the flow waits for its evaluation batches: a SIGTERM or a Ctrl-C (SIGINT) first gives up every
    evaluation in flight (workers killed, in-process calls abandoned), then goes on to the handler that was there
    (Prefect's for SIGTERM, which ends the flow; Python's KeyboardInterrupt for SIGINT).

    Without it, Prefect's handler ends the flow run, whose task runner then waits for its threads, which wait for
    the evaluations: a hung evaluator held the process for good (a Ctrl-C too: the pool started new workers for
    the batch, which hung again). Signals can only be handled in the main thread; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)
                if signal.getsignal(number) != signal.SIG_IGN}  # e.g. SIGINT in a shell's background job

    def stop(signum: int, frame: Any) -> None:
        _stop_evaluations()
        before = previous[signum]
        if callable(before):
            before(signum, frame)
        elif before == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    for number in previous:
        signal.signal(number, stop)
    try:
        yield
    finally:
        for number, before in previous.items():
            if signal.getsignal(number) is stop:
                signal.signal(number, before)


def _kill_workers(pool: ProcessPoolExecutor) -> None:
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        if process.is_alive():
            process.kill()


_STARTERS: list[threading.Thread] = []  # threads starting worker processes (start_evaluation_workers)


def _at_exit() -> None:
    """Let worker starts in flight finish first (a few seconds at most): a worker killed while the forkserver still
    hands it its start data prints a traceback, as a run with nothing to evaluate (an empty source) did."""
    for starter in _STARTERS:
        starter.join(timeout=5)
    pool = _POOL
    _stop_evaluations()
    # The pool's manager thread sees its workers gone and closes its wake-up pipe; concurrent.futures' own exit
    # hook, next, writes to that pipe after checking it is open, unlocked in Python 3.11: a close in between
    # was "Bad file descriptor" and exit code 1 after a run that had succeeded (once in the suite).
    manager = getattr(pool, "_executor_manager_thread", None)
    if manager is not None:
        manager.join(timeout=5)


threading._register_atexit(_at_exit)  # type: ignore[attr-defined]  # what concurrent.futures uses too


def evaluation_workers(configured: int) -> int:
    """Processes that evaluate batches: the config's number, or one per core when it says 0.

    Worker processes import the main module, as `multiprocessing` does; a main script
    without an `if __name__ == "__main__":` guard would run again in each of them, so
    then "one per core" falls back to evaluating in this process.
    """
    if configured:
        return configured
    return (os.cpu_count() or 1) if main_module_is_guarded() else 1


def main_module_is_guarded() -> bool:
    """True when worker processes can import `__main__` without running its work again."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if path is None or getattr(main, "__spec__", None) is not None:
        return True  # an interactive session, or `python -m module`: nothing is re-run
    try:
        source = Path(path).read_text(errors="replace")
    except OSError:
        return False
    return re.search(r"""__name__\s*==\s*['"]__main__['"]""", source) is not None


def evaluation_pool(workers: int) -> ProcessPoolExecutor | None:
    """One process pool per Python process, started on first use; None when one worker is asked for.

    Processes, because evaluators are mostly Python code and threads would share one
    core. Workers fork from a server that has already imported the main module and
    the scoring code, so each starts in milliseconds.
    """
    global _POOL
    if workers <= 1:
        return None
    with _POOL_LOCK:
        if _POOL is None:
            context = multiprocessing.get_context("forkserver")
            # The server imports the main module and the scoring code once; workers fork from it
            # and so skip their own import of `__main__` (multiprocessing sees it is there).
            context.set_forkserver_preload(["__main__", *_main_module_name(), "tasks.evaluation.scoring"])
            # The initializer lives in tasks.evaluation.scoring: one from this module made every worker import Prefect.
            _POOL = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=die_with_parent,
                                        initargs=(os.getpid(),))
        return _POOL


def _main_module_name() -> list[str]:
    """`python -m flows.cli`'s module, which the forkserver's "__main__" preload skips (it preloads a main script
    by path only): each worker then ran the module again, with its imports, instead of finding them imported."""
    name = getattr(getattr(sys.modules.get("__main__"), "__spec__", None), "name", None)
    return [name] if name and not name.endswith("__main__") else []


def start_evaluation_workers(workers: int) -> None:
    """Start the pool's worker processes now, without waiting for them.

    From a thread: the first worker's start waits for the forkserver to import the scoring code (1–2 s)."""
    pool = evaluation_pool(workers)
    if pool is not None:
        def start() -> None:
            with contextlib.suppress(RuntimeError):  # the pool was shut down meanwhile
                for _ in range(workers):
                    pool.submit(os.getpid)

        starter = threading.Thread(target=start, daemon=True)
        _STARTERS[:] = [t for t in _STARTERS if t.is_alive()] + [starter]
        starter.start()


def _in_this_process_only(configs: list[EvaluatorConfig]) -> bool:
    """Evaluators registered in this process (`python:` refs) cannot be imported by a worker."""
    return any(config.ref.startswith("python:") for config in configs)


def evaluate_batch(
    spans_path: str, batch: int, configs: list[EvaluatorConfig], window_start: datetime, out_path: str,
    workers: int = 1, settings: EvaluationSettings | None = None,
) -> str:
    """`evaluate_batch_file` in the process pool when there is one and the evaluators allow it.

    A worker that dies (killed for memory, a crash in native code, `os._exit`) breaks the pool: the batch is
    submitted again to a fresh one. When it was this batch's worker that died, the evaluator it was running
    is given up on for the batch: its runs not in the judge cache become error rows naming the cause.
    """
    if STOPPING.is_set():  # a retry after a SIGTERM or Ctrl-C: no new workers to hang in the same evaluator
        raise EvaluationStopped("the process is stopping: evaluation given up")
    pool = None if _in_this_process_only(configs) else evaluation_pool(workers)
    if pool is None:
        return evaluate_batch_file(spans_path, batch, configs, window_start, out_path, settings)
    abandoned: dict[str, str] = {}
    state = state_path(out_path)
    unexplained = 0
    while True:
        Path(state).unlink(missing_ok=True)  # a state left by an earlier attempt must not blame this one
        try:
            return pool.submit(evaluate_batch_file, spans_path, batch, configs, window_start, out_path, settings,
                               dict(abandoned), True).result()
        except BrokenProcessPool:
            exit_codes = _exit_codes(pool)
            _discard_pool(pool)
            if STOPPING.is_set():
                raise EvaluationStopped("the process is stopping: evaluation given up") from None
            cause = _death_cause(read_state(state), exit_codes, configs, settings)
            if cause is None or cause[0] in abandoned:
                unexplained += 1
                if unexplained > 2:
                    raise EvaluationWorkerDied(
                        f"evaluation workers died 3 times on batch {batch} before any evaluator ran "
                        f"(exit codes {sorted(set(exit_codes.values()))})") from None
            else:
                key, message = cause
                abandoned[key] = message
            pool = evaluation_pool(workers) or pool


def _exit_codes(pool: ProcessPoolExecutor) -> dict[int, int | None]:
    """Each worker's exit code, once the pool's manager has stopped them all (a broken pool stops every worker)."""
    processes = dict(getattr(pool, "_processes", None) or {})
    for process in processes.values():
        process.join(timeout=5)
    return {pid: process.exitcode for pid, process in processes.items()}


# What a forkserver worker's exit code reads as when the forkserver could not report it (a bystander stopped while
# its pool broke shows it at random): not evidence that this batch's evaluator killed its worker.
_UNKNOWN_EXIT = 255


def _death_cause(state: BatchState, exit_codes: dict[int, int | None], configs: list[EvaluatorConfig],
                 settings: EvaluationSettings | None) -> tuple[str, str] | None:
    """(evaluator key, error message) when this batch's own worker died running an evaluator; else None.

    The pool's manager ends the other workers with SIGTERM when one dies: a worker that ended so (or whose end
    could not be read) was a bystander, and its batch is simply submitted again; three such rounds fail the batch.
    """
    if not state.pid or state.evaluator < 0 or state.evaluator >= len(configs):
        return None
    code = exit_codes.get(state.pid)
    if code in (-signal.SIGTERM, _UNKNOWN_EXIT) and not state.memory_over:
        return None
    key = configs[state.evaluator].key
    if state.memory_over and settings and settings.max_worker_memory:
        return key, (f"the evaluation worker used {state.memory_over / 2**20:,.0f} MB, over max_worker_memory "
                     f"{settings.max_worker_memory / 2**20:,.0f} MB, while running evaluator {key!r}: it was "
                     f"replaced and the runs it had not scored are errors")
    how = f"was killed by signal {signal.Signals(-code).name}" if code is not None and code < 0 else \
        f"exited with code {code}"
    return key, f"the evaluation worker {how} while running evaluator {key!r}; its runs not yet scored are errors"


def shutdown_evaluation_pool() -> None:
    """Stop this process's evaluation workers (the next evaluation starts new ones)."""
    if _POOL is not None:
        _discard_pool(_POOL)


def _discard_pool(pool: ProcessPoolExecutor) -> None:
    global _POOL
    with _POOL_LOCK:
        if _POOL is pool:
            _POOL = None
    pool.shutdown(wait=False, cancel_futures=True)


def _not_stopping(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a failed batch unless the process is stopping (a SIGTERM or Ctrl-C gave its evaluations up)."""
    return not STOPPING.is_set()


@task(
    name="evaluate",
    retries=2,
    retry_condition_fn=_not_stopping,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
    cache_key_fn=stage_cache_key,
    persist_result=True,
)
def evaluate_task(
    spans_path: str, batch: int, configs: list[EvaluatorConfig], window_start: datetime, out_path: str,
    cache_token: str | None, workers: int = 1, settings: EvaluationSettings | None = None,
) -> str:
    return evaluate_batch(spans_path, batch, configs, window_start, out_path, workers, settings)


def prepare_evaluation(config: LoopConfig) -> None:
    """Start the evaluation workers (they import while the source loads); on Dask, its workers evaluate."""
    if not config.runner.dask_address:
        start_evaluation_workers(evaluation_workers(config.eval_workers))


def evaluate_window(*, config: LoopConfig, window: WindowSpans, source_token: str, out: str) -> ScoredWindow:
    """A window scored in batches, each an `evaluate` task (cached once the window is final, retried), while the
    spans later stages read are loaded. A SIGTERM or Ctrl-C gives up the evaluations in flight (never waits for a
    hung evaluator)."""
    window_start = window.window_start
    window_end = window_start + config.window.size_delta
    eval_token = stable_hash(source_token, window_start, [e.model_dump() for e in config.evaluators],
                             [e.source_hash for e in bind_all(config.evaluators)]) \
        if config.window.is_final(window_end) else None
    scores_dir = Path(window.path).parent
    batches = list(range(window.batches))
    score_paths = [str(scores_dir / f"scores-{window_start:%Y%m%dT%H%M%SZ}-{eval_token or 'open'}-{b}.parquet")
                   for b in batches]
    workers = 1 if config.runner.dask_address else evaluation_workers(config.eval_workers)
    settings = EvaluationSettings(str(Path(out) / "work"), config.max_worker_memory_bytes)
    with stopped_by_signals():  # from the first submitted batch
        futures = evaluate_task.map(unmapped(window.path), batches, unmapped(config.evaluators),
                                    unmapped(window_start), score_paths, unmapped(eval_token), unmapped(workers),
                                    unmapped(settings))
        spans = read_spans(window.path)  # while workers score
        score_files = [f.result() for f in track_batches(futures, window_start, score_paths)]
    if len(batches) > workers:
        # A worker keeps 100-200 MB of what its batches made (Python's heap does not shrink): a large window's
        # workers would hold it through the window's analysis, the flow process's own peak. The next window
        # forks new ones from the forkserver (milliseconds each).
        shutdown_evaluation_pool()
    return ScoredWindow(
        window=window, window_end=window_end, spans=spans,
        scores=pa.concat_tables([pq.read_table(path) for path in score_files]),
        root_metadata=pa.concat_tables([pq.read_table(metadata_path(path)) for path in score_files]).to_pandas())
