"""Benchmark: triage 100,000 generated traces (about 550,000 spans) in one window.

    .venv/bin/python bench/pipeline.py                # 100,000 traces
    .venv/bin/python bench/pipeline.py --traces 20000
    .venv/bin/python bench/pipeline.py --traces 20000 --only-run-evaluator   # the cost of `run.child_runs`
    .venv/bin/python bench/pipeline.py --only-flow --flow-runs 1   # the whole window through the flow alone
    .venv/bin/python bench/pipeline.py --traces 30000 --only-stages   # the stages as plain functions alone

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
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.measure import PeakRSS  # noqa: E402

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def answer_mentions_question(*, inputs: dict, outputs: dict | None) -> dict:
    """A user evaluator as people write them: a plain per-run function of inputs and outputs."""
    question = set(str(inputs.get("question", "")).lower().split())
    answer = set(str((outputs or {}).get("answer", "")).lower().split())
    score = len(question & answer) / len(question) if question else 0.0
    return {"key": "mentions_question", "score": score}


def answer_has_sources(run) -> dict:
    """A root evaluator that takes `run` and reads the retriever among its child_runs (LangSmith's style)."""
    retrieval = next((c for c in run.child_runs or () if c.name == "search_docs"), None)
    documents = (retrieval.outputs or {}).get("documents", []) if retrieval is not None else []
    return {"key": "has_sources", "score": float(bool(documents) and bool((run.outputs or {}).get("answer")))}


def answer_given(run) -> dict:
    """A root evaluator that takes `run` and reads only its outputs (child_runs never grown)."""
    return {"key": "answer_given", "score": float(bool((run.outputs or {}).get("answer")))}


def _line(label: str, seconds: float, traces: int) -> None:
    print(f"  {label:28s} {seconds:7.2f} s  {traces / seconds:10,.0f} traces/s", flush=True)


def stages(source: Path, work: Path, traces: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.analysis.attribution import SPAN_COLUMNS, span_attribution
    from tasks.analysis.failure_modes import failure_patterns, root_cause_shares
    from tasks.analysis.verdicts import score_statuses, scores_for_analysis, trace_verdicts
    from tasks.config import LoopConfig
    from tasks.evaluation.evaluate import evaluate_batch, evaluation_pool, evaluation_workers, shutdown_evaluation_pool
    from tasks.evaluation.scoring import metadata_path
    from tasks.sources.windows import fetch_windows

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

    from flows.local_api import record_task_runs_in_batches

    record_task_runs_in_batches()  # as the CLI's local server records them

    from flows.triage import triage
    from tasks.config import FileSource, LoopConfig
    from tasks.evaluation.evaluate import shutdown_evaluation_pool

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
    from tasks.evaluation.scoring import batch_scores, bind_all

    config = EvaluatorConfig(key="mentions_question", ref="bench.pipeline:answer_mentions_question")
    window = pq.ParquetFile(next(work.glob("window-*.parquet")))
    batch = window.read_row_group(0)
    roots = batch.filter(batch.column("is_root")).num_rows
    start = time.perf_counter()
    batch_scores(batch, bind_all([config]), None)[0]
    seconds = time.perf_counter() - start
    print("\na plain per-run Python user evaluator (one process, one batch):")
    _line(f"{roots:,} root runs", seconds, roots)


def run_evaluator(source: Path, work: Path, traces: int, runs: int) -> None:
    """Root evaluators that take `run`, with the trace's tree in `run.child_runs` and without it (as before trees
    were built): one that reads `child_runs`, one that reads only the run's outputs. Each on one batch alone, and
    the whole window through the flow beside the default evaluators. All evaluate in this process
    (eval_workers: 1), where the tree can be switched off."""
    import statistics

    import pyarrow.parquet as pq
    from prefect import flow

    import tasks.evaluation.scoring
    from flows.triage import triage
    from tasks.config import EvaluatorConfig, FileSource, LoopConfig, default_evaluators
    from tasks.evaluation.scoring import batch_scores, bind_all

    @flow
    def warm_up() -> None:
        return None

    start = time.perf_counter()
    warm_up()  # the first flow run starts Prefect's temporary API server: not to be counted in the first figure
    print(f"Prefect API start (once per process, not counted): {time.perf_counter() - start:.1f} s")
    batch = pq.ParquetFile(next(work.glob("window-*.parquet"))).read_row_group(0)
    roots = batch.filter(batch.column("is_root")).num_rows
    linked = tasks.evaluation.scoring.link_child_runs
    for function in (answer_has_sources, answer_given):
        name = function.__name__
        evaluator = EvaluatorConfig(key=name, ref=f"bench.pipeline:{name}", threshold=0.5)
        config = LoopConfig(source=FileSource(path=str(source)), window={"size": "1h"}, eval_workers=1,
                            evaluators=[*default_evaluators(), evaluator])
        print(f"\n{name}: {function.__doc__} One process:")
        variants = (("without child_runs (before)", lambda rows, built: None), ("with child_runs", linked))
        for label, link in variants:
            tasks.evaluation.scoring.link_child_runs = link
            start = time.perf_counter()
            batch_scores(batch, bind_all([evaluator]), None)[0]
            _line(f"{label}: one batch, {roots:,} roots", time.perf_counter() - start, roots)
        # The whole window, the two alternately (so a change in the machine's speed moves both alike): wall time
        # and this process's CPU time (it evaluates in this process), medians.
        walls: dict[str, list[float]] = {label: [] for label, _ in variants}
        cpus: dict[str, list[float]] = {label: [] for label, _ in variants}
        for run in range(runs):
            for label, link in variants if run % 2 == 0 else variants[::-1]:
                tasks.evaluation.scoring.link_child_runs = link
                start, cpu = time.perf_counter(), time.process_time()
                triage(config=config, out=str(work / f"{name}-{label[:4]}-{run}"))
                walls[label].append(time.perf_counter() - start)
                cpus[label].append(time.process_time() - cpu)
        tasks.evaluation.scoring.link_child_runs = linked
        for label, _ in variants:
            _line(f"{label}: whole window, median", statistics.median(walls[label]), traces)
        before, after = (label for label, _ in variants)
        wall = statistics.median(walls[after]) / statistics.median(walls[before]) - 1
        cpu = statistics.median(cpus[after]) / statistics.median(cpus[before]) - 1
        print(f"  child_runs cost on the whole window ({runs} runs each, alternating): wall {100 * wall:+.1f}%, "
              f"CPU {100 * cpu:+.1f}% (CPU: {statistics.median(cpus[before]):.2f} s -> "
              f"{statistics.median(cpus[after]):.2f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--traces", type=int, default=100_000)
    parser.add_argument("--data", type=Path, default=ROOT / ".bench-data", help="where generated traces are kept")
    parser.add_argument("--flow-runs", type=int, default=3, help="flow runs to time (the median is reported)")
    parser.add_argument("--only-run-evaluator", action="store_true",
                        help="only the run-taking evaluator's figures (with and without child_runs)")
    parser.add_argument("--only-flow", action="store_true",
                        help="only the whole window through the Prefect flow (its peak RSS is the issue's figure)")
    parser.add_argument("--only-stages", action="store_true", help="only the stages as plain functions")
    parser.add_argument("--timeline", type=Path, help="write the RSS of each process, every 50 ms, to this file")
    args = parser.parse_args()

    from tasks.sources.sample import generate_traces, write_sample

    source = args.data / f"pipeline-{args.traces}.jsonl"
    if not source.exists():
        start = time.perf_counter()
        write_sample(source, generate_traces(args.traces, seed=1, hours=1))
        print(f"generated {args.traces:,} traces in {time.perf_counter() - start:.0f} s (not counted)")
    print(f"source: {source} ({source.stat().st_size / 1e6:,.0f} MB), {os.cpu_count()} cores\n")
    with tempfile.TemporaryDirectory() as tmp, PeakRSS(timeline=args.timeline is not None) as memory:
        work = Path(tmp)
        if args.only_flow:
            end_to_end(source, work / "flow", args.traces, args.flow_runs)
        elif args.only_stages:
            stages(source, work / "stages", args.traces)
        elif args.only_run_evaluator:
            from tasks.sources.windows import fetch_windows

            fetch_windows(str(source), timedelta(hours=1), 2000, str(work / "stages"))
        else:
            stages(source, work / "stages", args.traces)
            end_to_end(source, work / "flow", args.traces, args.flow_runs)
            user_evaluator(source, work / "stages", args.traces)
        if not (args.only_flow or args.only_stages):
            run_evaluator(source, work / "stages", args.traces, args.flow_runs)
    print(f"\npeak RSS, this process and its evaluation workers (not the Prefect API server): {memory.breakdown()}")
    print(f"CPU time of the tree (sampled every 50 ms): {memory.cpu_text()}")
    if args.timeline:
        with open(args.timeline, "w") as out:
            for seconds, rss in memory.samples or []:
                out.write(f"{seconds:.2f} " + " ".join(f"{r.replace(' ', ':')}={v >> 20}" for r, v in rss.items())
                          + "\n")


if __name__ == "__main__":
    main()
