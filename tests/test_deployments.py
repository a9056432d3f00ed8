"""Deployments for real: `prefect server start`, a process work pool, `prefect deploy --all`, a worker,
and the backfill run twice through the API with parameters, as the UI's Run form does it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from flows import prefect_schema
from tasks.dispatch.ledger import read_ledger
from tasks.sources.sample import SAMPLE_START, generate_traces, write_sample
from tasks.store import SnapshotStore

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(process: subprocess.Popen, signals: tuple[int, ...] = (signal.SIGTERM,)) -> None:
    """Signal the process group (a worker wants two), then kill whatever is left."""
    for sig in signals:
        if process.poll() is None:
            os.killpg(process.pid, sig)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                continue
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@contextlib.contextmanager
def running_prefect_server(root: Path) -> Iterator[dict]:
    """A real `prefect server start` on a free loopback port, with its own PREFECT_HOME; and a client env."""
    port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    base["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    api = f"http://127.0.0.1:{port}/api"
    server_env = {**base, "PREFECT_HOME": str(root / "server-home"), "PREFECT_UI_API_URL": api}  # for a browser
    prefect_schema.create(root / "server-home" / "prefect.db")  # as the CLI's local server starts (no migrating)
    log = open(root / "server.log", "wb")
    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=server_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 90
    try:
        while True:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"prefect server did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        client_env = {**base, "PREFECT_HOME": str(root / "client-home"), "PREFECT_API_URL": api,
                      "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "5",
                      "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(root / "results"), "TRACETRIAGE_HOME": str(REPO),
                      "PREFECT_LOGGING_LEVEL": "WARNING"}
        yield {"api": api, "ui": f"http://127.0.0.1:{port}", "env": client_env, "root": root}
    finally:
        stop(server)
        log.close()


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory):
    with running_prefect_server(tmp_path_factory.mktemp("prefect")) as server:
        yield server


@contextlib.contextmanager
def deployed_with_worker(server: dict, cwd: Path) -> Iterator[None]:
    """Blocks registered, the work pool, `prefect deploy --all`, and a worker, stopped on exit."""
    env = server["env"]
    registered = prefect_cli(env, "block", "register", "-m", "blocks")
    assert "Successfully registered 3 blocks" in registered, registered
    prefect_cli(env, "work-pool", "create", "tracetriage", "--type", "process")
    deployed = prefect_cli(env, "--no-prompt", "deploy", "--all")
    assert "triage-backfill" in deployed and "triage-hourly" in deployed and "trend-report" in deployed
    worker_log = open(cwd / "worker.log", "wb")
    worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "tracetriage"], env=env, cwd=cwd,
                              stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield
    finally:
        stop(worker, (signal.SIGINT, signal.SIGINT, signal.SIGTERM))
        worker_log.close()


def prefect_cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([PREFECT, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def api_call(method: str, url: str, **kwargs) -> dict:
    """One API request, retried while the server is busy (a loaded SQLite-backed server answers 503 at times)."""
    for attempt in range(6):
        response = httpx.request(method, url, timeout=30, **kwargs)
        if response.status_code < 500:
            return response.raise_for_status().json()
        time.sleep(0.5 * 2**attempt)
    return response.raise_for_status().json()


def run_deployment(api: str, name: str, parameters: dict, key: str, timeout: float = 240) -> dict:
    """What the UI's Run form does: create a flow run of the deployment with these parameters; wait for it.

    The idempotency key makes a retried create return the run the first attempt may have made.
    """
    deployment = api_call("GET", f"{api}/deployments/name/{name}")
    run = api_call("POST", f"{api}/deployments/{deployment['id']}/create_flow_run",
                   json={"parameters": parameters, "idempotency_key": key})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = api_call("GET", f"{api}/flow_runs/{run['id']}")["state"]
        if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return state
        time.sleep(1)
    raise AssertionError(f"flow run {run['id']} of {name} did not finish in {timeout} s (state {state['type']})")


def backfill_parameters(tmp_path: Path, name: str = "deployed") -> dict:
    """A backfill of three sample windows from a file, as the Run form sends it."""
    source = tmp_path / "runs.jsonl"
    write_sample(source, generate_traces(300, seed=41, hours=3))
    return {"start": SAMPLE_START.isoformat(), "end": SAMPLE_START.replace(hour=12).isoformat(),
            "out": str(tmp_path / "out"),
            "config": {"name": name, "source": {"kind": "file", "path": str(source)}, "eval_workers": 1}}


@pytest.fixture(scope="module")
def deployed(prefect_server: dict, tmp_path_factory: pytest.TempPathFactory):
    """The project deployed to the server, with a worker."""
    cwd = tmp_path_factory.mktemp("worker")
    with deployed_with_worker(prefect_server, cwd):
        yield {**prefect_server, "worker_log": cwd / "worker.log"}


def test_the_backfill_deployment_runs_on_a_worker_and_a_second_run_sends_nothing_twice(deployed, tmp_path):
    api = deployed["api"]
    parameters = backfill_parameters(tmp_path)
    out = Path(parameters["out"])
    first = run_deployment(api, "triage-backfill/triage-backfill", parameters, key="backfill-1")
    assert first["type"] == "COMPLETED", deployed["worker_log"].read_text()[-4000:]
    store = SnapshotStore(str(out / "snapshots"))
    windows = store.read("windows", ["window_start", "failing_traces"]).to_pandas()
    assert len(windows) == 3
    logged = (out / "actions.jsonl").read_text().splitlines()
    assert len(logged) == windows["failing_traces"].sum() > 0
    assert_rollup_on_the_run(api, first, "deployed", windows=3)

    second = run_deployment(api, "triage-backfill/triage-backfill", parameters, key="backfill-2")
    assert second["type"] == "COMPLETED", deployed["worker_log"].read_text()[-4000:]
    assert (out / "actions.jsonl").read_text().splitlines() == logged
    sent = Counter(e["action_id"] for e in read_ledger(store, "deployed") if e["state"] == "sent")
    assert len(sent) == len(logged) and set(sent.values()) == {1}
    hourly = api_call("GET", f"{api}/deployments/name/triage-latest/triage-hourly")
    assert hourly["paused"], "triage-hourly is deployed paused until it has a config_block"


def assert_rollup_on_the_run(api: str, run: dict, loop: str, windows: int) -> None:
    """The run a person started holds the answer: the roll-up table, one row per window, each linking the window's
    run, which is named by its window."""
    (artifact,) = api_call("POST", f"{api}/artifacts/filter",
                           json={"artifacts": {"flow_run_id": {"any_": [run["state_details"]["flow_run_id"]]},
                                               "key": {"any_": [f"{loop}-rollup"]}}})
    rows = artifact["data"] if isinstance(artifact["data"], list) else json.loads(artifact["data"])
    assert len(rows) == windows and all(row["failing"].endswith("%") for row in rows)
    children = api_call("POST", f"{api}/flow_runs/filter", json={"flow_runs": {"parent_flow_run_id": {
        "any_": [run["state_details"]["flow_run_id"]]}}})
    children = [c for c in children if c["name"].startswith("window ")]
    assert sorted(c["name"] for c in children) == [f"window {row['window']}" for row in rows]
    assert {re.fullmatch(r"http://.+/runs/flow-run/([0-9a-f-]+)", row["run"])[1] for row in rows} == \
        {c["id"] for c in children}


def test_the_deployments_parameter_forms_render_with_their_defaults(deployed):
    """What Prefect's Run form gets: every parameter described, `source` a flat object (no oneOf/anyOf to pick by
    hand), the default evaluators and actions, and durations that refuse "1 hour"."""
    import jsonschema

    api = deployed["api"]
    for name in ("triage-backfill/triage-backfill", "triage-latest/triage-hourly", "triage/triage"):
        schema = api_call("GET", f"{api}/deployments/name/{name}")["parameter_openapi_schema"]
        assert all(p.get("description") and "<" not in p["description"] for p in schema["properties"].values())
        loop = schema["definitions"]["LoopConfig"]
        source = loop["properties"]["source"]
        assert "oneOf" not in source and "anyOf" not in source and source["properties"]["kind"]["default"] == "sample"
        assert [e["key"] for e in loop["properties"]["evaluators"]["default"]][:2] == ["answer_grounded",
                                                                                     "answer_relevant"]
        assert loop["properties"]["actions"]["default"] == [{"when": {"failing": True}, "do": "log",
                                                             "name": "log-failures"}]
        default = schema["properties"]["config"]["default"]
        assert default["source"]["kind"] == "sample" and len(default["evaluators"]) == 7
        window = schema["definitions"]["WindowConfig"]
        validator = jsonschema.Draft202012Validator(window)
        assert validator.is_valid({"size": "15m"}) and not validator.is_valid({"size": "1 hour"})
