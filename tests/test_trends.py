"""Trends and spikes: series from snapshots, spike detection against a trailing baseline, the report."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.cli import main
from flows.triage import triage
from tasks.analysis.trends import new_failure_modes, read_series, spike_checks, window_series
from tasks.config import ActionConfig, FileSource, LoopConfig, SpikeConfig, When
from tasks.schemas import PATTERNS, SCHEMA_VERSION, WINDOWS
from tasks.sources.sample import DEFAULT_RATES, SAMPLE_START, generate_windows, write_sample
from tasks.store import PART, SnapshotStore

SPIKE_WINDOW = 24  # window 25 of 30


def noisy_rates(windows: int, seed: int, base: dict[str, float] | None = None) -> list[dict[str, float]]:
    """Each window's failure rates jittered by ±25%: noise beyond the binomial, as real traffic has."""
    rng = random.Random(seed)
    return [{mode: rate * rng.uniform(0.75, 1.25) for mode, rate in (base or DEFAULT_RATES).items()}
            for _ in range(windows)]


def run_loop(tmp: Path, rates: list[dict[str, float]], traces: int, seed: int, **config) -> tuple[dict, LoopConfig]:
    source = tmp / "runs.jsonl"
    write_sample(source, generate_windows(traces, rates, seed=seed))
    loop = LoopConfig(source=FileSource(path=str(source)), eval_workers=1, **config)
    return triage(config=loop, out=str(tmp / "out")), loop


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """30 hourly windows of 300 noisy traces; window 25 has four times the tool errors."""
    rates = noisy_rates(30, seed=5)
    rates[SPIKE_WINDOW] = {**rates[SPIKE_WINDOW], "tool_error": 0.25}
    tmp = tmp_path_factory.mktemp("history")
    actions = [ActionConfig(when=When(failing=True), do="log", name="log-failures"),
               ActionConfig(when=When(spike=True), do="log", name="spike-alert")]
    result, config = run_loop(tmp, rates, 300, seed=5, actions=actions, name="history")
    store = SnapshotStore(str(tmp / "out" / "snapshots"))
    return {"result": result, "config": config, "out": tmp / "out", "store": store}


def test_a_spike_planted_in_window_25_of_30_is_flagged_and_no_other_window_is(history):
    flagged = [i for i, window in enumerate(history["result"]["windows"]) if window["spike"]]
    assert flagged == [SPIKE_WINDOW]
    windows = history["store"].read("windows", ["window_start", "spike"]).to_pandas()
    assert windows["spike"].tolist() == [i == SPIKE_WINDOW for i in range(30)]


def test_the_spike_says_which_series_by_how_much_and_against_what_baseline(history):
    spike = history["result"]["windows"][SPIKE_WINDOW]["spike"]
    assert spike["baseline"] == {"windows": 24, "from": "2026-11-02T09:00:00+00:00", "to": "2026-11-03T08:00:00+00:00"}
    by_series = {s["series"]: s for s in spike["series"]}
    assert "failure_rate:no_error" in by_series  # the tool errors fail the error-free evaluator
    tool = by_series["failure_rate:no_error"]
    assert tool["ratio"] >= 2 and tool["p_value"] < 1e-6 and tool["rate"] > tool["baseline_rate"]
    assert tool["failing"] >= 20 and tool["total"] == 300


def test_trends_flag_the_same_window_when_read_back_from_the_snapshots(history):
    series = read_series(history["store"])
    checks = spike_checks(series, history["config"].spikes)
    spiking = sorted(checks.loc[checks["spike"], "window_start"].unique())
    assert spiking == [pd.Timestamp(history["result"]["windows"][SPIKE_WINDOW]["window_start"])]


def test_a_spike_rule_acts_once_when_the_episode_starts_and_once_when_it_recovers_also_on_rerun(history):
    def spike_records() -> list[dict]:
        lines = (history["out"] / "actions.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["action"] == "spike-alert"]

    alert, recovery = spike_records()
    windows = history["result"]["windows"]
    assert (alert["event"], alert["window_start"]) == ("spike", windows[SPIKE_WINDOW]["window_start"])
    assert alert["spike"]["series"]
    assert (recovery["event"], recovery["window_start"]) == ("recovered", windows[SPIKE_WINDOW + 1]["window_start"])
    assert recovery["episode"]["last_spike_window"] == alert["window_start"]
    start = pd.Timestamp(alert["window_start"]).to_pydatetime()
    again = triage(config=history["config"], start=start, end=start + timedelta(hours=2), out=str(history["out"]))
    assert again["windows"][0]["spike"] is not None
    assert [w["actions"]["sent"] for w in again["windows"]] == [0, 0]
    assert len(spike_records()) == 2


def test_a_new_failure_mode_is_flagged(tmp_path):
    """Tool errors, absent for four windows, become a quarter of the failures; the failure rate stays flat."""
    base = {**DEFAULT_RATES, "tool_error": 0.0, "irrelevant_retrieval": 0.13}
    rates = [base] * 4 + [{**DEFAULT_RATES, "tool_error": 0.10, "irrelevant_retrieval": 0.03}]
    result, _ = run_loop(tmp_path, rates, 300, seed=8, spikes=SpikeConfig(min_baseline_windows=4))
    spikes = [w["spike"] for w in result["windows"]]
    assert spikes[:4] == [None] * 4
    modes = {m["series"]: m for m in spikes[4]["new_failure_modes"]}
    assert "root_cause:lookup_order (error)" in modes
    assert modes["root_cause:lookup_order (error)"]["share"] >= 0.25
    assert all(s["series"] != "failure_rate" for s in spikes[4]["series"])


def test_noise_only_windows_over_a_month_give_no_alert_at_the_default_sensitivity():
    """720 hourly windows, traffic and rates varying ±25% from hour to hour, nothing else going on."""
    rng = np.random.default_rng(3)
    hours = pd.date_range(SAMPLE_START, periods=720, freq="h")
    traffic = rng.integers(200, 2000, size=720)
    windows, evaluators, causes = [], [], []
    evaluator_rates = {"answer_grounded": 0.12, "answer_relevant": 0.08, "no_error": 0.05, "latency_ok": 0.02}
    cause_shares = {"search_docs (below_threshold)": 0.4, "answer_llm (below_threshold)": 0.35,
                    "lookup_order (error)": 0.2, "rerank (below_threshold)": 0.05}
    for at, n in zip(hours, traffic, strict=True):
        failing = rng.binomial(n, 0.25 * rng.uniform(0.75, 1.25))
        windows.append({"window_start": at, "traces": n, "failing_traces": failing})
        for key, rate in evaluator_rates.items():
            fail, errors = rng.binomial(n, rate * rng.uniform(0.75, 1.25)), rng.binomial(n, 0.002)
            evaluators.append({"window_start": at, "evaluator": key, "passing": n - fail - errors, "failing": fail,
                               "errors": errors})
        for cause, count in zip(cause_shares, rng.multinomial(failing, list(cause_shares.values())), strict=True):
            span, reason = cause.rstrip(")").split(" (")
            causes.append({"window_start": at, "span_name": span, "reason": reason, "traces": count})
    series = window_series(pd.DataFrame(windows), pd.DataFrame(evaluators), pd.DataFrame(causes),
                           pd.DataFrame(columns=["window_start", "condition", "failing_traces", "lift"]))
    checks = spike_checks(series, SpikeConfig())
    assert len(checks) == 720 * 9 and not checks["spike"].any()
    assert new_failure_modes(series, SpikeConfig()).empty
    # The same detector, made ten thousand times more sensitive, does see the noise: the test can fail.
    assert spike_checks(series, SpikeConfig(max_p_value=0.01, min_ratio=1.0))["spike"].any()


def test_snapshots_from_the_previous_schema_still_read(history, tmp_path):
    """Version-1 partitions (no spike columns, no evaluators table) read beside version-2 ones."""
    store = SnapshotStore(str(tmp_path / "snapshots"))
    source = history["store"]
    old, new = source.windows("windows")[:3], source.windows("windows")[3:6]
    v1 = {"windows": pa.schema([f for f in WINDOWS if f.name not in ("spike", "spike_json")]),
          "patterns": pa.schema([f for f in PATTERNS if f.name != "detail"])}
    for name in ("windows", "patterns", "root_causes"):
        for window in old:
            table = source.read(name, windows=[window])
            if name in v1:
                table = table.select(v1[name].names).cast(v1[name])
            table = table.set_column(table.schema.get_field_index("schema_version"), "schema_version",
                                     pa.array([1] * table.num_rows, pa.int32()))
            directory = Path(store._dir(name, window))
            directory.mkdir(parents=True)
            pq.write_table(table, directory / PART)
    for name in ("windows", "patterns", "root_causes", "evaluators"):
        for window in new:
            store.write_partition(name, window, source.read(name, windows=[window]))
    windows = store.read("windows").to_pandas()
    assert windows["schema_version"].tolist() == [1, 1, 1, SCHEMA_VERSION, SCHEMA_VERSION, SCHEMA_VERSION]
    assert windows["spike"].isna().tolist() == [True] * 3 + [False] * 3
    series = read_series(store)
    overall = series[series["series"] == "failure_rate"]
    assert len(overall) == 6 and overall["rate"].notna().all()
    assert series.loc[series["kind"] == "evaluator_failure_rate", "window_start"].nunique() == 3  # v2 only


WRITER = """
import sys, time
from datetime import datetime, UTC
import pyarrow as pa
from tasks.store import SnapshotStore
store = SnapshotStore(sys.argv[1])
at = datetime(2026, 11, 2, 9, tzinfo=UTC)
def scores(n):
    return pa.table({"window_start": pa.array([at] * n, pa.timestamp("us", tz="UTC")),
                     "trace_id": pa.array([f"trace-{i}-{'x' * 40}" for i in range(n)]),
                     "evaluator": pa.array(["answer"] * n), "score": pa.array([0.5] * n)})
from tasks.schemas import SCORES
def full(n):
    t = scores(n)
    return pa.table({f.name: (t.column(f.name) if f.name in t.column_names else pa.nulls(n, f.type))
                     for f in SCORES}, schema=SCORES)
store.write_partition("scores", at, full(1000))
print("old written", flush=True)
store.write_partition("scores", at, full(int(sys.argv[2])))
print("new written", flush=True)
"""


def test_a_killed_write_leaves_the_partition_whole(tmp_path):
    root = tmp_path / "snapshots"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    writer = subprocess.Popen([sys.executable, str(script), str(root), "6000000"], env=env, stdout=subprocess.PIPE,
                              text=True)
    assert writer.stdout.readline().strip() == "old written"
    partition = root / "scores" / "window_start=2026-11-02T09:00:00Z"
    deadline = time.monotonic() + 60
    while not list(partition.glob(".*.tmp")) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert list(partition.glob(".*.tmp")), "the writer never started its second write"
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    assert writer.returncode == -signal.SIGKILL
    assert SnapshotStore(str(root)).read("scores").num_rows == 1000  # the old partition, whole
    assert [p.name for p in partition.iterdir() if not p.name.startswith(".")] == [PART]


def test_report_prints_the_series_and_writes_a_chart_with_the_spike(history, tmp_path, capsys):
    assert main(["report", "--snapshots", str(history["out"] / "snapshots"), "--since", "30h",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("2026-11-")]
    assert len(rows) == 30
    assert [i for i, row in enumerate(rows) if "failure_rate" in row.split("%")[-1]] == [SPIKE_WINDOW]
    assert "1 of 30 windows spiked" in out
    assert (tmp_path / "trend.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_on_an_empty_store_says_what_to_do(tmp_path, capsys):
    assert main(["report", "--snapshots", str(tmp_path / "none")]) == 2
    assert "run `tracetriage run` first" in capsys.readouterr().err


def test_trend_report_flow_publishes_the_table_and_chart(history, tmp_path):
    from prefect.client.orchestration import get_client

    from flows.report import trend_report_flow

    result = trend_report_flow(config=history["config"].model_copy(
        update={"snapshots": history["config"].snapshots.model_copy(update={"url": str(history["store"].root)})}),
        since="30h", out=str(tmp_path))
    assert result["windows"] == 30 and result["spiking_windows"] == 1
    assert Path(result["chart"]).read_bytes()[:4] == b"\x89PNG"
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    wanted = ["history-trend-table", "history-trend-report"]  # keyed by the loop, so loops never overwrite
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=wanted)))
    keys = {a.key for a in found}
    assert keys == set(wanted)


def test_duckdb_and_polars_read_the_snapshots_as_the_readme_shows(history):
    """The README's queries, run against mixed snapshot versions."""
    import duckdb
    import polars as pl

    root = history["out"] / "snapshots"
    rates = duckdb.sql(f"""
        SELECT window_start, failing_traces / traces AS failure_rate
        FROM read_parquet('{root}/windows/*/*.parquet', union_by_name = true)
        ORDER BY window_start""").fetchall()
    assert len(rates) == 30 and rates[SPIKE_WINDOW][1] == max(r[1] for r in rates)
    modes = (pl.scan_parquet(f"{root}/patterns/*/*.parquet", missing_columns="insert")
             .group_by("condition").agg(pl.col("fail_share").mean()).sort("fail_share", descending=True).collect())
    assert modes.height > 0 and modes["fail_share"][0] <= 1


def test_spikes_and_windows_are_prefect_events_for_automations(history):
    """What an Automation that pages on a spike triggers on: one `tracetriage.spike.detected`, for window 25."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    def events(name: str) -> list[dict]:
        body = {"filter": {"event": {"name": [name]}, "occurred": {"since": "2000-01-01T00:00:00Z"},
                           "resource": {"id_prefix": ["tracetriage.window.history."]}}, "limit": 50}
        response = httpx.post(f"{PREFECT_API_URL.value()}/events/filter", json=body, timeout=10)
        return response.raise_for_status().json()["events"]

    deadline = time.monotonic() + 20
    while len(events("tracetriage.window.triaged")) < 30 and time.monotonic() < deadline:
        time.sleep(0.5)  # the server writes events in the background
    (spike,) = events("tracetriage.spike.detected")
    assert spike["resource"]["tracetriage.window_start"] == history["result"]["windows"][SPIKE_WINDOW]["window_start"]
    assert spike["payload"]["series"] and any(r["prefect.resource.role"] == "evaluator" for r in spike["related"])
    triaged = events("tracetriage.window.triaged")
    assert len({e["resource"]["tracetriage.window_start"] for e in triaged}) == 30
