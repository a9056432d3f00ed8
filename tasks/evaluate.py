"""Stage 2, evaluate: score batches of whole traces, in a pool of worker processes, as Prefect tasks.

The scoring itself is `tasks/scoring.py`, which the worker processes import.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import sys
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from datetime import datetime
from pathlib import Path

from prefect import task
from prefect.tasks import exponential_backoff

from tasks.cache import stage_cache_key
from tasks.config import EvaluatorConfig
from tasks.scoring import evaluate_batch_file

_POOL: ProcessPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


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
            context.set_forkserver_preload(["__main__", "tasks.scoring"])
            _POOL = ProcessPoolExecutor(max_workers=workers, mp_context=context)
        return _POOL


def start_evaluation_workers(workers: int) -> None:
    """Start the pool's worker processes now, without waiting for them.

    From a thread: the first worker's start waits for the forkserver to import the scoring code (1–2 s)."""
    pool = evaluation_pool(workers)
    if pool is not None:
        def start() -> None:
            with contextlib.suppress(RuntimeError):  # the pool was shut down meanwhile
                for _ in range(workers):
                    pool.submit(os.getpid)

        threading.Thread(target=start, daemon=True).start()


def _in_this_process_only(configs: list[EvaluatorConfig]) -> bool:
    """Evaluators registered in this process (`python:` refs) cannot be imported by a worker."""
    return any(config.ref.startswith("python:") for config in configs)


def evaluate_batch(
    spans_path: str, batch: int, configs: list[EvaluatorConfig], window_start: datetime, out_path: str,
    workers: int = 1,
) -> str:
    """`evaluate_batch_file` in the process pool when there is one and the evaluators allow it."""
    pool = None if _in_this_process_only(configs) else evaluation_pool(workers)
    if pool is None:
        return evaluate_batch_file(spans_path, batch, configs, window_start, out_path)
    try:
        return pool.submit(evaluate_batch_file, spans_path, batch, configs, window_start, out_path).result()
    except BrokenProcessPool:
        _discard_pool(pool)  # a worker died (e.g. killed for memory): the task's retry gets a fresh pool
        raise


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


@task(
    name="evaluate",
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
    cache_key_fn=stage_cache_key,
    persist_result=True,
)
def evaluate_task(
    spans_path: str, batch: int, configs: list[EvaluatorConfig], window_start: datetime, out_path: str,
    cache_token: str | None, workers: int = 1,
) -> str:
    return evaluate_batch(spans_path, batch, configs, window_start, out_path, workers)
