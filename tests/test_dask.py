"""The same flow on a Dask cluster: evaluation batches run on the cluster's workers."""

from __future__ import annotations

import pytest

from flows.triage import triage
from tasks.config import FileSource, LoopConfig, RunnerConfig
from tasks.sources.sample import generate_traces, write_sample
from tasks.store import SnapshotStore


@pytest.fixture(scope="module")
def cluster():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as local:
        yield local


def test_a_window_evaluated_on_a_dask_cluster_gets_the_scores_of_the_thread_runner(cluster, tmp_path):
    source = tmp_path / "runs.jsonl"
    write_sample(source, generate_traces(600, seed=51, hours=1))
    scores = {}
    for kind in ("threads", "dask"):
        runner = RunnerConfig(kind=kind, address=cluster.scheduler_address if kind == "dask" else None)
        config = LoopConfig(source=FileSource(path=str(source)), runner=runner, batch_size=100, eval_workers=1)
        triage(config=config, out=str(tmp_path / kind))
        table = SnapshotStore(str(tmp_path / kind / "snapshots")).read("scores").to_pandas()
        scores[kind] = table.sort_values(["run_id", "evaluator"], ignore_index=True)
    assert len(scores["dask"]) > 600
    assert scores["dask"].equals(scores["threads"])
    done = {name: sum(prefix.state_counts.values()) for name, prefix in cluster.scheduler.task_prefixes.items()}
    assert done.get("evaluate_task", 0) >= 6  # the six batches ran on the cluster
