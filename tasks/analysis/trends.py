"""Trends: per-window series from the snapshots, and spikes against a trailing baseline.

Series (one row per window and series, `window_series`):
- `failure_rate`: failing traces / traces;
- `failure_rate:<evaluator>`: failing / judged results of that evaluator;
- `error_rate:<evaluator>`: evaluator errors / results;
- `root_cause:<span> (<reason>)` and `pattern:<condition>`: share of the failing traces.

A rate spikes when, against the K windows before it, it passes three tests
(`spike_checks`): at least `min_failing_traces` failures; an overdispersed z-test
whose one-sided p-value is below `max_p_value`; and a rate at least `min_ratio`
times the baseline. The baseline rate is the median of the K rates, and the
variance allows for the window-to-window spread the baseline itself shows (robust:
median absolute deviation), beyond binomial noise, so an ordinary noisy hour does
not alert and one bad hour in the baseline does not mask the next. A failure mode
absent from the baseline (share below `ABSENT_SHARE` in every baseline window)
that now holds `new_mode_share` of the failures, over-represented among them
(lift ≥ 1.2), is a new failure mode.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
from numpy.lib.stride_tricks import sliding_window_view
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.config import SpikeConfig
from tasks.contracts import MIN_LIFT, WindowTriage
from tasks.store import SnapshotStore

RATE_KINDS = ("failure_rate", "evaluator_failure_rate", "evaluator_error_rate")
SHARE_KINDS = ("root_cause", "pattern")
ABSENT_SHARE = 0.05
MIN_NEW_MODE_LIFT = MIN_LIFT
SERIES_COLUMNS = ["window_start", "series", "kind", "count", "total", "rate", "lift"]

# The columns trends read: nothing else of the snapshot is touched.
COLUMNS = {
    "windows": ["window_start", "traces", "failing_traces"],
    "evaluators": ["window_start", "evaluator", "passing", "failing", "errors"],
    "root_causes": ["window_start", "span_name", "reason", "traces"],
    "patterns": ["window_start", "condition", "failing_traces", "lift"],
}


def _frame(window_start: Any, series: Any, kind: str, count: Any, total: Any, lift: Any = np.nan) -> pd.DataFrame:
    frame = pd.DataFrame({"window_start": window_start, "series": series, "kind": kind,
                          "count": np.asarray(count, dtype="int64"), "total": np.asarray(total, dtype="int64"),
                          "lift": lift})
    frame["rate"] = (frame["count"] / frame["total"]).where(frame["total"] > 0)
    return frame


def window_series(
    windows: pd.DataFrame, evaluators: pd.DataFrame, root_causes: pd.DataFrame, patterns: pd.DataFrame
) -> pd.DataFrame:
    """Long-form series, one row per (window, series), from the snapshot tables' `COLUMNS`."""
    failing = windows.set_index("window_start")["failing_traces"]
    parts = [_frame(windows["window_start"], "failure_rate", "failure_rate", windows["failing_traces"],
                    windows["traces"])]
    if len(evaluators):
        judged = evaluators["passing"] + evaluators["failing"]
        parts.append(_frame(evaluators["window_start"], "failure_rate:" + evaluators["evaluator"],
                            "evaluator_failure_rate", evaluators["failing"], judged))
        parts.append(_frame(evaluators["window_start"], "error_rate:" + evaluators["evaluator"],
                            "evaluator_error_rate", evaluators["errors"], judged + evaluators["errors"]))
    if len(root_causes):
        parts.append(_frame(root_causes["window_start"],
                            "root_cause:" + root_causes["span_name"] + " (" + root_causes["reason"] + ")",
                            "root_cause", root_causes["traces"],
                            root_causes["window_start"].map(failing).fillna(0)))
    if len(patterns):
        parts.append(_frame(patterns["window_start"], "pattern:" + patterns["condition"], "pattern",
                            patterns["failing_traces"], patterns["window_start"].map(failing).fillna(0),
                            patterns["lift"].to_numpy()))
    series = pd.concat([p for p in parts if len(p)] or [parts[0]], ignore_index=True)
    return series[SERIES_COLUMNS].sort_values(["window_start", "series"], ignore_index=True)


def read_series(store: SnapshotStore, windows: list[datetime] | None = None) -> pd.DataFrame:
    """`window_series` of some windows (all when None), reading only the columns trends need."""
    tables = {name: store.read(name, columns, windows).to_pandas() for name, columns in COLUMNS.items()}
    return window_series(**tables)


def baseline_windows(store: SnapshotStore, window_start: datetime, spikes: SpikeConfig) -> list[datetime]:
    """The K windows with a snapshot before `window_start`: the current window's baseline."""
    return [w for w in store.windows("windows") if w < window_start][-spikes.baseline_windows:]


@contextlib.contextmanager
def _quiet_nan_warnings() -> Iterator[None]:
    """All-NaN slices (windows without a baseline) are expected; numpy's warnings about them are noise."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _trailing(matrix: np.ndarray, k: int) -> np.ndarray:
    """For each row i, the k rows before it (NaN where there are fewer): shape (rows, columns, k)."""
    padded = np.vstack([np.full((k, matrix.shape[1]), np.nan), matrix])
    return sliding_window_view(padded, k, axis=0)[: matrix.shape[0]]


def _normal_tail(z: np.ndarray) -> np.ndarray:
    return 0.5 * np.vectorize(math.erfc)(z / math.sqrt(2))


def spike_checks(series: pd.DataFrame, spikes: SpikeConfig) -> pd.DataFrame:
    """Every rate series of every window tested against its trailing baseline; `spike` marks departures."""
    rates = series[series["kind"].isin(RATE_KINDS)]
    if rates.empty:
        return pd.DataFrame(columns=["window_start", "series", "kind", "count", "total", "rate", "baseline_rate",
                                     "ratio", "z", "p_value", "baseline_windows", "spike"])
    count = rates.pivot(index="window_start", columns="series", values="count")
    total = rates.pivot(index="window_start", columns="series", values="total")
    rate = (count / total.where(total > 0)).to_numpy(dtype=float)
    k = spikes.baseline_windows
    past = _trailing(rate, k)
    past_n = _trailing(total.to_numpy(dtype=float), k)
    with np.errstate(all="ignore"), _quiet_nan_warnings():
        n_past = (~np.isnan(past)).sum(axis=2)
        base = np.nanmedian(past, axis=2)
        spread = 1.4826 * np.nanmedian(np.abs(past - base[..., None]), axis=2)
        binomial = np.nanmedian(past * (1 - past) / np.where(past_n > 0, past_n, np.nan), axis=2)
        # A rate that never moved from zero still has some chance: half a failure per typical window.
        floor = 0.5 / np.nanmedian(np.where(past_n > 0, past_n, np.nan), axis=2)
        p0 = np.maximum(base, floor)
        extra = np.maximum(spread**2 - binomial, 0.0)
        n = total.to_numpy(dtype=float)
        z = (rate - p0) / np.sqrt(p0 * (1 - p0) / n + extra)
    z = np.where(np.isnan(z), -np.inf, z)
    p_value = _normal_tail(z)
    checks = pd.DataFrame({
        "window_start": np.repeat(count.index.to_numpy(), count.shape[1]),
        "series": np.tile(count.columns.to_numpy(), count.shape[0]),
        "count": count.to_numpy().ravel(),
        "total": total.to_numpy().ravel(),
        "rate": rate.ravel(),
        "baseline_rate": base.ravel(),
        "ratio": (rate / p0).ravel(),
        "z": z.ravel(),
        "p_value": p_value.ravel(),
        "baseline_windows": n_past.ravel(),
    }).dropna(subset=["rate"])
    checks["kind"] = checks["series"].map(rates.drop_duplicates("series").set_index("series")["kind"])
    checks["spike"] = (
        (checks["baseline_windows"] >= spikes.min_baseline_windows)
        & (checks["count"] >= spikes.min_failing_traces)
        & (checks["p_value"] < spikes.max_p_value)
        & (checks["ratio"] >= spikes.min_ratio)
    )
    return checks.reset_index(drop=True)


def new_failure_modes(series: pd.DataFrame, spikes: SpikeConfig) -> pd.DataFrame:
    """Failure modes (patterns, root causes) absent from each window's baseline that now hold a large share."""
    shares = series[series["kind"].isin(SHARE_KINDS)]
    windows = np.sort(series["window_start"].unique())
    if shares.empty:
        return pd.DataFrame(columns=["window_start", "series", "kind", "count", "rate", "baseline_max_share"])
    share = shares.pivot(index="window_start", columns="series", values="rate").reindex(windows).fillna(0.0)
    # A window with no failures says nothing about which modes are absent.
    failures = series[series["kind"] == "failure_rate"].set_index("window_start")["count"].reindex(windows)
    values = share.to_numpy(dtype=float, copy=True)
    values[~(failures.fillna(0) > 0).to_numpy()] = np.nan
    past = _trailing(values, spikes.baseline_windows)
    with _quiet_nan_warnings():
        n_past = (~np.isnan(past)).sum(axis=2)
        baseline_max = np.nanmax(np.where(np.isnan(past), -np.inf, past), axis=2)
    frame = pd.DataFrame({
        "window_start": np.repeat(share.index.to_numpy(), share.shape[1]),
        "series": np.tile(share.columns.to_numpy(), share.shape[0]),
        "baseline_max_share": baseline_max.ravel(),
        "baseline_windows": n_past.ravel(),
    })
    frame = frame.merge(shares[["window_start", "series", "kind", "count", "rate", "lift"]],
                        on=["window_start", "series"])
    new = (
        (frame["baseline_windows"] >= spikes.min_baseline_windows)
        & (frame["baseline_max_share"] < ABSENT_SHARE)
        & (frame["rate"] >= spikes.new_mode_share)
        & (frame["count"] >= spikes.min_failing_traces)
        & ((frame["kind"] == "root_cause") | (frame["lift"].isna()) | (frame["lift"] >= MIN_NEW_MODE_LIFT))
    )
    return frame[new].reset_index(drop=True)


def _number(value: Any) -> Any:
    value = float(value)
    return None if math.isnan(value) or math.isinf(value) else value


def window_spike(series: pd.DataFrame, window_start: datetime, spikes: SpikeConfig) -> dict[str, Any] | None:
    """The summary's `spike`: which series of this window spiked, by how much, against what baseline.

    `series` holds the window and its baseline (the windows before it); None when nothing spiked.
    """
    at = pd.Timestamp(window_start)
    checks = spike_checks(series, spikes)
    spiked = checks[(checks["window_start"] == at) & checks["spike"]].sort_values("z", ascending=False)
    modes = new_failure_modes(series, spikes)
    modes = modes[modes["window_start"] == at].sort_values("rate", ascending=False)
    if spiked.empty and modes.empty:
        return None
    baseline = sorted(series.loc[series["window_start"] < at, "window_start"].unique())[-spikes.baseline_windows:]
    return {
        "window_start": at.isoformat(),
        "baseline": {"windows": len(baseline),
                     "from": pd.Timestamp(baseline[0]).isoformat() if baseline else None,
                     "to": pd.Timestamp(baseline[-1]).isoformat() if baseline else None},
        "series": [
            {"series": row.series, "kind": row.kind, "rate": _number(row.rate),
             "baseline_rate": _number(row.baseline_rate), "ratio": _number(row.ratio), "z": _number(row.z),
             "p_value": _number(row.p_value), "failing": int(row.count), "total": int(row.total)}
            for row in spiked.itertuples()
        ],
        "new_failure_modes": [
            {"series": row.series, "kind": row.kind, "share": _number(row.rate), "failing": int(row.count),
             "baseline_max_share": _number(max(row.baseline_max_share, 0.0))}
            for row in modes.itertuples()
        ],
    }


def triage_series(triage: WindowTriage) -> pd.DataFrame:
    """The series of a window not yet written to the snapshots."""
    window = pd.DataFrame({"window_start": [pd.Timestamp(triage.window_start)],
                           "traces": [triage.scored.window.traces], "failing_traces": [triage.verdicts.count("fail")]})
    return window_series(window, triage.verdicts.evaluators.to_pandas(), triage.modes.root_causes,
                         triage.modes.patterns)


@task(name="spike-check", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def spike_task(*, store: SnapshotStore, triage: WindowTriage, spikes: SpikeConfig) -> dict[str, Any] | None:
    """The window's series against the baseline in the snapshots: the spike, or None."""
    past = read_series(store, baseline_windows(store, triage.window_start, spikes))
    return window_spike(pd.concat([past, triage_series(triage)], ignore_index=True), triage.window_start, spikes)


