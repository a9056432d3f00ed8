"""Benchmark: triage 100,000 generated traces (about 550,000 spans) in one window.

    .venv/bin/python bench/pipeline.py                # 100,000 traces
    .venv/bin/python bench/pipeline.py --traces 20000

Prints traces/s for each stage (run as plain functions, evaluation in the process pool
as the flow runs it), the whole window end to end through the Prefect flow (with the
Prefect API already up, as it is for a deployment; the one-time API start is printed
apart), a user evaluator written as a plain per-run Python function, and the peak RSS
of the whole process tree (this process and its evaluation workers), sampled from /proc.

Targets on the 2-core machine: the whole window at >= 5,000 traces/s end to end, peak
RSS under 3 GB, a plain per-run user evaluator at >= 1,000 traces/s.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def answer_mentions_question(*, inputs: dict, outputs: dict | None) -> dict:
    """A user evaluator as people write them: a plain per-run function of inputs and outputs."""
    question = set(str(inputs.get("question", "")).lower().split())
    answer = set(str((outputs or {}).get("answer", "")).lower().split())
    score = len(question & answer) / len(question) if question else 0.0
    return {"key": "mentions_question", "score": score}


class PeakRSS:
    """Peak resident memory of this process and all its descendants, sampled every 50 ms."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def _tree(pid: int) -> list[int]:
        pids, queue = [], [pid]
        while queue:
            current = queue.pop()
            pids.append(current)
            for task in Path(f"/proc/{current}/task").glob("*"):
                try:
                    queue.extend(int(c) for c in (task / "children").read_text().split())
                except OSError:
                    continue
        return pids

    @staticmethod
    def _rss(pid: int) -> int:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    @staticmethod
    def _is_prefect_api(pid: int) -> bool:
        """A Prefect API server may be a child too (the temporary one, or the CLI's local server on the run that
        starts it), but it is Prefect's, not the pipeline's."""
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            return False
        return b"uvicorn" in command or b"prefect.server" in command or b"prefect server start" in command

    def _sample(self) -> None:
        while not self._stop.is_set():
            pids = [p for p in self._tree(os.getpid()) if not self._is_prefect_api(p)]
            self.peak = max(self.peak, sum(self._rss(p) for p in pids))
            time.sleep(0.05)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _line(label: str, seconds: float, traces: int) -> None:
    print(f"  {label:28s} {seconds:7.2f} s  {traces / seconds:10,.0f} traces/s", flush=True)


def stages(source: Path, work: Path, traces: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.aggregate import failure_patterns, root_cause_shares
    from tasks.attribute import SPAN_COLUMNS, span_attribution
    from tasks.config import LoopConfig
    from tasks.evaluate import evaluate_batch, evaluation_pool, evaluation_workers, shutdown_evaluation_pool
    from tasks.fetch import fetch_windows
    from tasks.partition import score_statuses, scores_for_analysis, trace_verdicts
    from tasks.scoring import metadata_path

    config = LoopConfig()
    workers = evaluation_workers(config.eval_workers)
    pool = evaluation_pool(workers)
    if pool is not None:
        list(pool.map(abs, range(workers)))  # start the workers before the clock, as the flow's first window does
    print(f"stages as plain functions ({workers} evaluation processes):")
    began = time.perf_counter()
    start = time.perf_counter()
    (window,) = fetch_windows(str(source), timedelta(hours=1), config.batch_size, str(work)).windows
    window_start = window.window_start
    _line("fetch (read, window, batch)", time.perf_counter() - start, traces)
    start = time.perf_counter()
    with __import__("concurrent.futures").futures.ThreadPoolExecutor(max_workers=4) as threads:
        files = list(threads.map(
            lambda b: evaluate_batch(window.path, b, config.evaluators, window_start, str(work / f"s{b}.parquet"),
                                     workers),
            range(window.batches)))
    _line(f"evaluate ({window.batches} batches)", time.perf_counter() - start, traces)
    start = time.perf_counter()
    raw = pa.concat_tables([pq.read_table(f) for f in files])
    root_metadata = pa.concat_tables([pq.read_table(metadata_path(f)) for f in files]).to_pandas()
    spans = pq.read_table(window.path, columns=SPAN_COLUMNS + ["latency_s"]).to_pandas()
    judged = score_statuses(raw, config.evaluators)
    verdicts = trace_verdicts(judged, pa.array(spans.loc[spans["is_root"], "trace_id"]))
    scores = scores_for_analysis(judged, [])
    _line("partition", time.perf_counter() - start, traces)
    start = time.perf_counter()
    attribution = span_attribution(spans, scores, verdicts, window_start)
    _line("attribute", time.perf_counter() - start, traces)
    start = time.perf_counter()
    failure_patterns(spans, scores, verdicts, config.evaluators, window_start, root_metadata)
    root_cause_shares(attribution, verdicts, window_start)
    _line("aggregate", time.perf_counter() - start, traces)
    _line("all stages", time.perf_counter() - began, traces)
    shutdown_evaluation_pool()  # the flow below starts its own workers, and is timed with their start


def end_to_end(source: Path, out: Path, traces: int, runs: int) -> None:
    import statistics

    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    from flows.triage import triage
    from tasks.config import FileSource, LoopConfig
    from tasks.evaluate import shutdown_evaluation_pool

    @flow
    def warm_up() -> None:
        return None

    # Prefect's own temporary server allows 20 s to start, which a busy machine exceeds: allow 300 s.
    with prefect_test_harness(server_startup_timeout=300):
        start = time.perf_counter()
        warm_up()
        print(f"\nPrefect API start (once per process, not counted): {time.perf_counter() - start:.1f} s")
        print("whole window through the Prefect flow (start workers, fetch, evaluate, partition, attribute, aggregate, "
              "snapshot, dispatch, artifacts), each run from scratch:")
        config = LoopConfig(source=FileSource(path=str(source)), window={"size": "1h"})
        timings = []
        for run in range(runs):
            start = time.perf_counter()
            result = triage(config=config, out=str(out / f"run-{run}"))
            timings.append(time.perf_counter() - start)
            shutdown_evaluation_pool()  # the next run starts its own workers, as a new flow-run process would
            window = result["windows"][0]
            _line(f"run {run + 1}: {window['traces']:,} traces, {window['spans']:,} spans", timings[-1], traces)
        _line(f"median of {runs} runs", statistics.median(timings), traces)
        print(f"  failing traces {window['failing_traces']:,}; actions sent per run {window['actions']['sent']:,}")


def user_evaluator(source: Path, work: Path, traces: int) -> None:
    import pyarrow.parquet as pq

    from tasks.config import EvaluatorConfig
    from tasks.scoring import bind_all, span_scores

    config = EvaluatorConfig(key="mentions_question", ref="bench.pipeline:answer_mentions_question")
    window = pq.ParquetFile(next(work.glob("window-*.parquet")))
    batch = window.read_row_group(0)
    roots = batch.filter(batch.column("is_root")).num_rows
    start = time.perf_counter()
    span_scores(batch, bind_all([config]), None)
    seconds = time.perf_counter() - start
    print("\na plain per-run Python user evaluator (one process, one batch):")
    _line(f"{roots:,} root runs", seconds, roots)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--traces", type=int, default=100_000)
    parser.add_argument("--data", type=Path, default=ROOT / ".bench-data", help="where generated traces are kept")
    parser.add_argument("--flow-runs", type=int, default=3, help="flow runs to time (the median is reported)")
    args = parser.parse_args()

    from tasks.sample import generate_traces, write_sample

    source = args.data / f"pipeline-{args.traces}.jsonl"
    if not source.exists():
        start = time.perf_counter()
        write_sample(source, generate_traces(args.traces, seed=1, hours=1))
        print(f"generated {args.traces:,} traces in {time.perf_counter() - start:.0f} s (not counted)")
    print(f"source: {source} ({source.stat().st_size / 1e6:,.0f} MB), {os.cpu_count()} cores\n")
    with tempfile.TemporaryDirectory() as tmp, PeakRSS() as memory:
        work = Path(tmp)
        stages(source, work / "stages", args.traces)
        end_to_end(source, work / "flow", args.traces, args.flow_runs)
        user_evaluator(source, work / "stages", args.traces)
    print(f"\npeak RSS, this process and its evaluation workers (not the Prefect API server): "
          f"{memory.peak / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
