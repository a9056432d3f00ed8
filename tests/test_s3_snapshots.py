"""Snapshots on S3: a local moto server, reached through fsspec (s3fs) and a SnapshotStorage block."""

from __future__ import annotations

import pandas as pd

from blocks.storage import SnapshotStorage
from flows.triage import triage
from tasks.analysis.trends import new_failure_modes, read_series, spike_checks
from tasks.config import FileSource, LoopConfig, SnapshotConfig, SpikeConfig
from tasks.dispatch.ledger import read_ledger
from tasks.sources.sample import DEFAULT_RATES, generate_windows, write_sample
from tasks.store import SnapshotStore
from tests.moto_s3 import MOTO_KEY as KEY
from tests.moto_s3 import MOTO_SECRET as SECRET


def test_s3_snapshots_give_the_same_trends_as_local_ones(s3_endpoint, tmp_path):
    rates = [DEFAULT_RATES] * 3 + [{**DEFAULT_RATES, "tool_error": 0.3}]
    source = tmp_path / "runs.jsonl"
    write_sample(source, generate_windows(200, rates, seed=21))
    SnapshotStorage(url="s3://snapshots-bucket/loop", storage_options={"endpoint_url": s3_endpoint},
                    secret_options={"key": KEY, "secret": SECRET}).save("moto-snapshots", overwrite=True)
    results, spikes = {}, SpikeConfig(min_baseline_windows=3)
    for where, snapshots in {"local": SnapshotConfig(), "s3": SnapshotConfig(block="moto-snapshots")}.items():
        config = LoopConfig(source=FileSource(path=str(source)), eval_workers=1, snapshots=snapshots, spikes=spikes)
        results[where] = triage(config=config, out=str(tmp_path / where))

    s3 = SnapshotStorage.load("moto-snapshots").get_store()
    local = SnapshotStore(str(tmp_path / "local" / "snapshots"))
    assert s3.windows("scores") == local.windows("scores") and len(s3.windows("scores")) == 4
    s3_series, local_series = read_series(s3), read_series(local)
    pd.testing.assert_frame_equal(s3_series, local_series)
    pd.testing.assert_frame_equal(spike_checks(s3_series, spikes), spike_checks(local_series, spikes))
    pd.testing.assert_frame_equal(new_failure_modes(s3_series, spikes), new_failure_modes(local_series, spikes))
    assert [w["spike"] is not None for w in results["s3"]["windows"]] == [False] * 3 + [True]
    assert results["s3"]["windows"][-1]["snapshot_uri"] == "s3://snapshots-bucket/loop"
    # The ledger lies beside the snapshots, on S3 too: one compacted segment per window, every action sent.
    ledger = read_ledger(s3, "tracetriage")
    assert len(ledger) == sum(w["actions"]["sent"] for w in results["s3"]["windows"]) > 0
    assert [len(s3.listing(f"_ledger/tracetriage/{w}")) for w in s3.listing("_ledger/tracetriage")] == [1] * 4
    # The block's secret stays in the block: not in summaries (nor, through them, in artifacts or snapshots).
    windows = s3.read("windows", ["summary_json", "spike_json"]).to_pandas()
    assert SECRET not in str(results["s3"]) and not windows.apply(lambda c: c.str.contains(SECRET)).any().any()
