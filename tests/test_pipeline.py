"""The whole loop on 5,000 sample traces, checked against the failures the generator planted."""

from __future__ import annotations

import pandas as pd
import pytest

from tasks.sources.sample import FAILURE_MODES, truth_path_for
from tasks.store import SNAPSHOT_TABLES, read_table

TOLERANCE = 0.02  # ±2 percentage points


@pytest.fixture(scope="module")
def truth(sample_5k) -> pd.DataFrame:
    return pd.read_json(truth_path_for(sample_5k), lines=True)


@pytest.fixture(scope="module")
def snapshots(triaged_5k) -> dict[str, pd.DataFrame]:
    root = triaged_5k["out"] / "snapshots"
    return {name: read_table(root, name).to_pandas() for name in SNAPSHOT_TABLES}


def test_every_trace_of_the_sample_is_triaged_in_aligned_hourly_windows(triaged_5k, truth):
    windows = triaged_5k["result"]["windows"]
    assert [w["window_start"][11:16] for w in windows] == ["09:00", "10:00"]
    assert sum(w["traces"] for w in windows) == len(truth) == 5000
    assert all(w["skipped_records"] == 0 for w in windows)


def test_failing_traces_are_exactly_the_planted_failures(snapshots, truth):
    culprits = snapshots["attribution"].query("is_culprit")
    planted = truth[truth["failure_mode"].notna()]
    assert set(culprits["trace_id"]) == set(planted["trace_id"])


def test_each_failing_trace_is_attributed_to_the_planted_culprit_span(snapshots, truth):
    culprits = snapshots["attribution"].query("is_culprit").set_index("trace_id")
    planted = truth[truth["failure_mode"].notna()].set_index("trace_id")
    joined = planted.join(culprits, how="inner")
    assert (joined["run_id"] == joined["culprit_run_id"]).mean() >= 1 - TOLERANCE
    assert (joined["reason"] == joined["culprit_reason"]).mean() >= 1 - TOLERANCE


def test_root_cause_shares_match_the_planted_shares_within_two_points(triaged_5k, truth):
    planted = truth[truth["failure_mode"].notna()]
    expected = planted["culprit_span_name"].value_counts(normalize=True)
    for window in triaged_5k["result"]["windows"]:
        in_window = planted[planted["trace_id"].isin(_window_traces(triaged_5k, window))]
        want = in_window["culprit_span_name"].value_counts(normalize=True)
        got = {c["span_name"]: c["share"] for c in window["root_causes"]}
        assert set(got) == set(want.index)
        for span, share in want.items():
            assert got[span] == pytest.approx(share, abs=TOLERANCE), span
    assert set(expected.index) == {span for span, _ in FAILURE_MODES.values()}


def test_the_retrieval_failure_mode_has_the_share_of_irrelevant_retrieval(triaged_5k, truth):
    """'N% of failures have retrieval span score < 0.3', against the planted irrelevant retrievals."""
    for window in triaged_5k["result"]["windows"]:
        traces = _window_traces(triaged_5k, window)
        failing = truth[truth["trace_id"].isin(traces) & truth["failure_mode"].notna()]
        expected = (failing["failure_mode"] == "irrelevant_retrieval").mean()
        pattern = _pattern(window, "search_docs: retrieval_relevance < 0.3")
        assert pattern["fail_share"] == pytest.approx(expected, abs=TOLERANCE)
        assert pattern["pass_share"] == 0
        assert pattern["lift"] is None


def test_metadata_patterns_find_the_model_that_hallucinates_more(triaged_5k, truth):
    for window in triaged_5k["result"]["windows"]:
        traces = truth[truth["trace_id"].isin(_window_traces(triaged_5k, window))]
        failing, passing = traces[traces["failure_mode"].notna()], traces[traces["failure_mode"].isna()]
        pattern = _pattern(window, "metadata.model = gpt-4o-mini")
        fail_share = (failing["model"] == "gpt-4o-mini").mean()
        pass_share = (passing["model"] == "gpt-4o-mini").mean()
        assert pattern["fail_share"] == pytest.approx(fail_share, abs=TOLERANCE)
        assert pattern["pass_share"] == pytest.approx(pass_share, abs=TOLERANCE)
        assert pattern["lift"] > 1.1


def test_recovered_tool_errors_in_passing_traces_lower_the_lift_of_the_error_pattern(triaged_5k, truth):
    window = triaged_5k["result"]["windows"][0]
    pattern = _pattern(window, "lookup_order: error")
    assert 0 < pattern["pass_share"] < 0.05
    assert pattern["lift"] > 1


def test_the_slow_reranker_is_a_latency_outlier(triaged_5k):
    window = triaged_5k["result"]["windows"][0]
    outliers = [p for p in window["patterns"] if p["kind"] == "span_latency_outlier"]
    assert [p["span_name"] for p in outliers] == ["rerank"]


def test_lists_are_sorted_by_share_largest_first_and_shares_are_fractions(triaged_5k):
    for window in triaged_5k["result"]["windows"]:
        shares = [p["fail_share"] for p in window["patterns"]]
        assert shares == sorted(shares, reverse=True)
        causes = [c["share"] for c in window["root_causes"]]
        assert causes == sorted(causes, reverse=True)
        assert all(0 <= p["fail_share"] <= 1 and 0 <= p["pass_share"] <= 1 for p in window["patterns"])
        assert sum(causes) == pytest.approx(1.0)


def test_the_summary_counts_agree_with_the_snapshot_tables(triaged_5k, snapshots):
    windows = snapshots["windows"].set_index(snapshots["windows"]["window_start"].map(lambda t: t.isoformat()))
    for window in triaged_5k["result"]["windows"]:
        row = windows.loc[window["window_start"]]
        assert row["failing_traces"] == window["failing_traces"]
        assert row["traces"] == window["traces"]
        assert window["actions"]["planned"] == window["failing_traces"]  # the default rule logs each failure


def _window_traces(triaged, window) -> set[str]:
    scores = read_table(triaged["out"] / "snapshots", "scores").to_pandas()
    in_window = scores["window_start"].map(lambda t: t.isoformat()) == window["window_start"]
    return set(scores.loc[in_window & scores["is_root"], "trace_id"])


def _pattern(window, condition) -> dict:
    matches = [p for p in window["patterns"] if p["condition"] == condition]
    assert matches, f"no pattern {condition!r} among {[p['condition'] for p in window['patterns']]}"
    return matches[0]
