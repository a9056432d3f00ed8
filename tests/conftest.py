"""Shared fixtures: a temporary Prefect API for the session, a local S3 (moto), sample traces, one triaged sample
window set."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path
from unittest import mock

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# The test server records task runs in batches, as the CLI's local server does (flows/local_api.py says why).
from flows.local_api import record_task_runs_in_batches  # noqa: E402

record_task_runs_in_batches()
# Credentials for the local S3 only; never let boto look further (instance metadata, profiles).
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

import pytest  # noqa: E402
from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from flows import prefect_schema  # noqa: E402
from tasks.sources.sample import generate_traces, write_sample  # noqa: E402
from tests.moto_s3 import MOTO_KEY, MOTO_SECRET  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def tracetriage_home(tmp_path_factory: pytest.TempPathFactory):
    """A data dir no other run shares: a CLI process started without PREFECT_API_URL starts its local Prefect
    server there, not in the user's, and it is stopped when the session ends."""
    from flows import local_api

    os.environ["TRACETRIAGE_DATA"] = str(tmp_path_factory.mktemp("tracetriage-home"))
    yield
    local_api.stop()


@pytest.fixture(scope="session", autouse=True)
def prefect_api(tmp_path_factory: pytest.TempPathFactory):
    """A temporary Prefect server on a free loopback port, and result storage no other run shares."""
    results = tmp_path_factory.mktemp("prefect-results")
    # No heartbeat thread: it makes every flow run wait ~1 s at its end, and tests do not crash-detect.
    with temporary_settings(updates={PREFECT_RESULTS_LOCAL_STORAGE_PATH: results, "flows.heartbeat_frequency": None}):
        with _harness_database_from_stored_schema(), prefect_test_harness(server_startup_timeout=180):
            yield


def _harness_database_from_stored_schema():
    """The harness's server makes its database in a new `mkdtemp()` directory: create it there from the stored
    schema, as the CLI's local server does, so that each test worker's server skips Prefect's migrations
    (~10 s of CPU each; a loaded machine once took 107 s to start two at once). Should Prefect rename the file,
    its server migrates as before."""
    from prefect.testing import utilities

    def mkdtemp_with_database() -> str:
        path = tempfile.mkdtemp()
        prefect_schema.create(Path(path) / "prefect-test.db")
        return path

    return mock.patch.object(utilities, "mkdtemp", mkdtemp_with_database)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on a free loopback port, with an empty bucket `snapshots-bucket`."""
    import s3fs
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    s3fs.S3FileSystem(key=MOTO_KEY, secret=MOTO_SECRET, endpoint_url=endpoint).mkdir("snapshots-bucket")
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def sample_5k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """5,000 sample traces over 2 hours, with their ground truth beside them."""
    path = tmp_path_factory.mktemp("sample") / "runs.jsonl"
    write_sample(path, generate_traces(5000, seed=11, hours=2))
    return path


@pytest.fixture(scope="session")
def triaged_5k(sample_5k: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The triage flow's result on the 5,000 sample traces, and where it wrote."""
    from flows.triage import triage
    from tasks.config import FileSource, LoopConfig

    out = tmp_path_factory.mktemp("out")
    config = LoopConfig(source=FileSource(path=str(sample_5k)))
    result = triage(config=config, out=str(out))
    return {"result": result, "out": out, "config": config}
