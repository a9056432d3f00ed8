"""Benchmark: the CPU cost of `run.child_runs` on one batch, in this process.

    .venv/bin/python bench/child_runs.py                          # 20,000 traces, 6,250-root batches
    .venv/bin/python bench/child_runs.py --traces 20000 --batch 6250 --repeats 7

Scores one batch with a root evaluator that takes `run` and reads `run.child_runs`
(`bench.pipeline.answer_has_sources`) and with one that takes `run` and reads only its
outputs (`answer_given`), alternately, and prints the median CPU time
(`time.process_time`) of each, with a `gc.collect()` of the batch's garbage, and their
difference: what the trees cost. CPU time, not wall time, so other work on the machine
moves the figures less.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--traces", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=6250, help="traces per batch")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--data", type=Path, default=ROOT / ".bench-data", help="where generated traces are kept")
    args = parser.parse_args()

    import pyarrow.parquet as pq

    import tasks
    from tasks.config import EvaluatorConfig
    from tasks.evaluation.scoring import batch_scores, bind_all
    from tasks.sources.sample import generate_traces, write_sample
    from tasks.sources.windows import fetch_windows

    source = args.data / f"pipeline-{args.traces}.jsonl"
    if not source.exists():
        write_sample(source, generate_traces(args.traces, seed=1, hours=1))
    with tempfile.TemporaryDirectory() as tmp:
        (window,) = fetch_windows(str(source), timedelta(hours=1), args.batch, tmp).windows
        batch = pq.ParquetFile(window.path).read_row_group(0)
        roots = batch.filter(batch.column("is_root")).num_rows
        print(f"code: {Path(tasks.__file__).parent.parent}")
        print(f"one batch: {roots:,} roots, {batch.num_rows:,} spans; CPU s, median of {args.repeats}")
        evaluators = {name: bind_all([EvaluatorConfig(key=name, ref=f"bench.pipeline:{name}")])
                      for name in ("answer_has_sources", "answer_given")}
        times: dict[str, list[float]] = {name: [] for name in evaluators}
        for _ in range(args.repeats + 1):  # the first round warms imports and caches, not counted
            for name, bound in evaluators.items():
                start = time.process_time()
                batch_scores(batch, bound, None)[0]
                gc.collect()  # the batch's garbage, collected now: each batch pays for its own
                times[name].append(time.process_time() - start)
        with_trees, without = (statistics.median(times[name][1:]) for name in evaluators)
        for name in evaluators:
            print(f"  {name:20s} {statistics.median(times[name][1:]):6.3f} s  "
                  f"({', '.join(f'{t:.3f}' for t in times[name][1:])})")
        cost = with_trees - without
        print(f"  child_runs cost      {cost:6.3f} s  ({1e6 * cost / roots:.0f} us a root)")


if __name__ == "__main__":
    main()
