"""Benchmark: trend query and spike check over 30 days of hourly snapshots (720 partitions, 10,000 traces each).

    .venv/bin/python bench/trends.py [--days 30] [--traces 10000] [--distinct 24] [--dir DIR]

1. Triage `--distinct` hourly windows of `--traces` sample traces with the real flow
   (noisy failure rates), writing their snapshots.
2. Write the 720 partitions of every snapshot table: window i is distinct window
   i % distinct with its window_start moved (real tables, real sizes; the history
   repeats daily, which costs the query the same).
3. In a fresh process (so peak RSS is the query's own): the 30-day trend series
   (windows, evaluators, root causes, patterns; only the columns trends read), all
   spike checks over it, and the spike check of the latest window against its
   baseline, as the flow runs it. Prints seconds and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

QUERY = r"""
import json, sys, time

def peak_rss_mb():  # VmHWM: this process image's own high-water mark (ru_maxrss keeps the forking parent's)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

t0 = time.perf_counter()
import pandas as pd
from tasks.config import SpikeConfig
from tasks.store import SnapshotStore
from tasks.analysis.trends import baseline_windows, read_series, spike_checks, window_spike
imported = time.perf_counter() - t0
store, spikes = SnapshotStore(sys.argv[1]), SpikeConfig()
rss_before = peak_rss_mb()

t = time.perf_counter()
series = read_series(store)
checks = spike_checks(series, spikes)
month = time.perf_counter() - t

t = time.perf_counter()
latest = store.windows("windows")[-1]
window = baseline_windows(store, latest, spikes) + [latest]
spike = window_spike(read_series(store, window), latest, spikes)
check = time.perf_counter() - t
print(json.dumps({"import_s": imported, "month_query_s": month, "latest_check_s": check,
                  "series_rows": len(series), "checks": len(checks), "spiking": int(checks["spike"].sum()),
                  "latest_spike": spike is not None, "rss_after_import_mb": rss_before,
                  "peak_rss_mb": peak_rss_mb()}))
"""


def triage_distinct(work: Path, traces: int, distinct: int) -> Path:
    from flows.triage import triage
    from tasks.config import FileSource, LoopConfig
    from tasks.evaluation.evaluate import shutdown_evaluation_pool
    from tasks.sources.sample import DEFAULT_RATES, generate_windows, write_sample

    rng = random.Random(1)
    rates = [{m: r * rng.uniform(0.75, 1.25) for m, r in DEFAULT_RATES.items()} for _ in range(distinct)]
    source = work / "runs.jsonl"
    t = time.perf_counter()
    write_sample(source, generate_windows(traces, rates, seed=1))
    print(f"generated {distinct} windows x {traces:,} traces in {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    triage(config=LoopConfig(source=FileSource(path=str(source))), out=str(work / "out"))
    shutdown_evaluation_pool()
    print(f"triaged them with the flow in {time.perf_counter() - t:.1f} s")
    return work / "out" / "snapshots"


def write_history(distinct_root: Path, root: Path, days: int) -> None:
    import pyarrow as pa

    from tasks.schemas import SNAPSHOT_TABLES
    from tasks.store import SnapshotStore

    source, store = SnapshotStore(str(distinct_root)), SnapshotStore(str(root))
    starts = source.windows("windows")
    tables = {name: [source.read(name, windows=[w]) for w in starts] for name in SNAPSHOT_TABLES if name != "spans"}
    total, size = time.perf_counter(), 0
    for i in range(days * 24):
        at = starts[0] + timedelta(hours=i)
        for name, per_window in tables.items():
            table = per_window[i % len(starts)]
            column = table.schema.get_field_index("window_start")
            table = table.set_column(column, "window_start", pa.array([at] * table.num_rows, table.schema[column].type))
            size += os.path.getsize(store.write_partition(name, at, table))
    elapsed = time.perf_counter() - total
    rows = sum(t.num_rows for t in tables["scores"]) / len(starts)
    print(f"wrote {days * 24} windows x {len(tables)} tables ({rows:,.0f} score rows per window), "
          f"{size / 2**20:,.0f} MiB, in {elapsed:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--traces", type=int, default=10_000)
    parser.add_argument("--distinct", type=int, default=24)
    parser.add_argument("--dir", type=Path, help="work directory (default: a temporary one)")
    args = parser.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="tracetriage-bench-trends-"))
    work.mkdir(parents=True, exist_ok=True)
    history = work / "history"
    if not (history / "windows").is_dir():
        write_history(triage_distinct(work, args.traces, args.distinct), history, args.days)
    runs = []
    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", QUERY, str(history)], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1], check=True)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    best = min(runs, key=lambda r: r["month_query_s"])
    month = ", ".join(f"{r['month_query_s']:.2f}" for r in runs)
    latest = ", ".join(f"{r['latest_check_s']:.3f}" for r in runs)
    print(f"trend query, {args.days} days ({best['series_rows']:,} series rows, {best['checks']:,} checks): "
          f"{month} s (3 fresh processes)")
    print(f"spike check of the latest window against its baseline: {latest} s; spiked: {best['latest_spike']}")
    print(f"peak RSS of the query process: {max(r['peak_rss_mb'] for r in runs):.0f} MB "
          f"(after imports: {best['rss_after_import_mb']:.0f} MB; imports took {best['import_s']:.1f} s)")


if __name__ == "__main__":
    main()
