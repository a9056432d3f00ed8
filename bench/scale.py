"""Benchmark: a CPU-bound evaluator on 50,000 traces, the thread runner vs a 2-worker Dask cluster.

    .venv/bin/python bench/scale.py [--traces 50000] [--work 1000]

The evaluator (`cpu_bound_answer_check`, below) hashes the answer `--work` times: pure
Python, so threads share one core (the GIL) while Dask workers are processes. Both runs
are the triage flow on the same generated window with `eval_workers: 1` (evaluation
in the task's own process) and 16 evaluation batches; only `runner` differs. Prints
traces/s for each and the speed-up. Run it from the repository root.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # Dask workers
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

WORK = int(os.environ.get("TRACETRIAGE_BENCH_WORK", "1000"))


def cpu_bound_answer_check(*, outputs: dict | None) -> dict:
    """A stand-in for a heavy local evaluator (a small model, a parser): `WORK` rounds of hashing."""
    digest = str((outputs or {}).get("answer", "")).encode()
    for _ in range(WORK):
        digest = hashlib.blake2b(digest, digest_size=16).digest()
    return {"key": "answer_check", "score": 1.0 if digest[0] < 250 else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--traces", type=int, default=50_000)
    parser.add_argument("--work", type=int, default=WORK)
    args = parser.parse_args()
    os.environ["TRACETRIAGE_BENCH_WORK"] = str(args.work)

    from distributed import LocalCluster
    from prefect.testing.utilities import prefect_test_harness

    from flows.local_api import record_task_runs_in_batches

    record_task_runs_in_batches()  # as the CLI's local server records them

    from flows.triage import triage
    from tasks.config import EvaluatorConfig, FileSource, LoopConfig, RunnerConfig
    from tasks.sources.sample import generate_traces, write_sample

    work = Path(tempfile.mkdtemp(prefix="tracetriage-bench-scale-"))
    source = work / "runs.jsonl"
    t = time.perf_counter()
    write_sample(source, generate_traces(args.traces, seed=5, hours=1))
    print(f"generated {args.traces:,} traces in {time.perf_counter() - t:.1f} s; evaluator: {args.work:,} hashes "
          f"per trace")
    evaluators = [EvaluatorConfig(key="answer_check", ref="bench.scale:cpu_bound_answer_check", threshold=0.5)]
    figures = {}
    with prefect_test_harness(server_startup_timeout=60), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                         dashboard_address=None) as cluster:
        for label, runner in (("thread runner (4 threads, one process)", RunnerConfig(kind="threads")),
                              ("Dask, 2 local worker processes", RunnerConfig(kind="dask",
                                                                              address=cluster.scheduler_address))):
            config = LoopConfig(source=FileSource(path=str(source)), evaluators=evaluators, runner=runner,
                                eval_workers=1, actions=[], batch_size=1)
            t = time.perf_counter()
            triage(config=config, out=str(work / label.split()[0]))
            elapsed = time.perf_counter() - t
            figures[label] = args.traces / elapsed
            print(f"{label}: {elapsed:.1f} s, {figures[label]:,.0f} traces/s (whole flow)")
    threads, dask = figures.values()
    print(f"speed-up of the Dask cluster over the thread runner: {dask / threads:.2f}x")


if __name__ == "__main__":
    main()
