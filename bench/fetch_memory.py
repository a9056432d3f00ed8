"""Benchmark: peak memory of the fetch stage alone (read, window, batch) on a generated source.

    /usr/bin/time -f "%e s %M KB" .venv/bin/python bench/fetch_memory.py [--traces 100000] [--code DIR]

`--code` runs another checkout's `tasks` (a "before") with this venv. The source is the one
`bench/pipeline.py` generates (`.bench-data/pipeline-N.jsonl`; generated here if missing). The fetch runs in
this process alone, so the process's peak RSS (`/usr/bin/time`'s `%M`, or the figure printed) is the stage's
plus the imports.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--traces", type=int, default=100_000)
    parser.add_argument("--code", type=Path, default=ROOT)
    args = parser.parse_args()
    sys.path.insert(0, str(args.code.resolve()))
    from tasks.sources.sample import generate_traces, write_sample
    from tasks.sources.windows import fetch_windows

    source = ROOT / ".bench-data" / f"pipeline-{args.traces}.jsonl"
    if not source.exists():
        write_sample(source, generate_traces(args.traces, seed=1, hours=1))
    imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tracetriage-bench-fetch-") as work:
        (window,) = fetch_windows(str(source), timedelta(hours=1), 6250, work).windows
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{args.code.resolve()}: {window.traces:,} traces, {window.spans:,} spans in "
          f"{time.perf_counter() - start:.1f} s; peak RSS {peak:,.0f} MB ({imported:,.0f} MB after imports)")


if __name__ == "__main__":
    main()
