"""What production throws at a loop: windows where nothing fails, the smallest windows, and the like."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.sources.sample import DEFAULT_RATES, generate_traces, write_sample
from tasks.store import read_table

HEALTHY = dict.fromkeys(DEFAULT_RATES, 0.0)


def _triage(tmp_path: Path, traces: int, rates: dict[str, float]) -> tuple[dict, Path]:
    from flows.triage import triage
    from tasks.config import FileSource, LoopConfig

    source = tmp_path / "runs.jsonl"
    write_sample(source, generate_traces(traces, seed=3, hours=1, rates=rates))
    out = tmp_path / "out"
    return triage(config=LoopConfig(source=FileSource(path=str(source))), out=str(out)), out


@pytest.mark.parametrize("traces", [40, 1])
def test_a_window_where_every_trace_passes_is_triaged_and_its_rows_are_written(tmp_path, traces):
    result, out = _triage(tmp_path, traces, HEALTHY)
    windows = result["windows"]
    assert sum(w["traces"] for w in windows) == traces
    assert all(w["failing_traces"] == 0 and w["root_causes"] == [] for w in windows)
    snapshots = out / "snapshots"
    assert read_table(snapshots, "windows").num_rows == len(windows)
    assert read_table(snapshots, "scores").num_rows > 0
    for table in ("patterns", "root_causes", "attribution"):  # written empty, so a rerun replaces older rows
        assert read_table(snapshots, table).num_rows == 0, table
        assert len(list((snapshots / table).glob("window_start=*/*.parquet"))) == len(windows), table
