"""The local Prefect API of the CLI: started on first use, reused, stopped by `tracetriage server stop`; a
configured PREFECT_API_URL is used instead. Each test has its own data dir and Prefect home, and stops what it
starts."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prefect._internal.analytics.ci_detection import CI_ENV_VARS  # where Prefect's SDK is silent anyway
from prefect.settings import PREFECT_API_URL

from flows.cli import main
from tasks.sources.sample import generate_traces, write_sample

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("local-api") / "runs.jsonl"
    write_sample(path, generate_traces(12, seed=5, hours=1))
    return path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "TRACETRIAGE_"))}
    return {**env, "PYTHONPATH": str(ROOT), "TRACETRIAGE_DATA": str(tmp_path / "data"),
            "PREFECT_HOME": str(tmp_path / "client-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **extra}


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def _api(url: str, path: str, body: dict | None = None):
    request = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())


def _runs_of_out(api_url: str, out: Path) -> list[dict]:
    flow_runs = _api(api_url, "/flow_runs/filter", {"limit": 200})
    return [r for r in flow_runs if r["parameters"].get("out") == str(out)]


def _session_processes(sid: int) -> list[tuple[int, str]]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid and fields[0] != "Z":
                found.append((int(stat.parent.name), (stat.parent / "cmdline").read_bytes().decode(errors="replace")))
        except (OSError, IndexError, ValueError):
            continue
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _server(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], action: str, capsys) -> tuple[int, str]:
    """`tracetriage server ACTION` in this process (no interpreter start), with the run's data dir."""
    monkeypatch.setenv("TRACETRIAGE_DATA", env["TRACETRIAGE_DATA"])
    code = main(["server", action])
    return code, capsys.readouterr().out


def test_the_cli_starts_a_local_server_on_first_use_reuses_it_and_server_stop_stops_it(runs, tmp_path, monkeypatch,
                                                                                       capsys):
    port = _free_port()
    env = _env(tmp_path, TRACETRIAGE_SERVER_PORT=str(port))
    state = tmp_path / "data" / "prefect-server" / "server.json"
    try:
        first = _cli(env, "run", "--source", str(runs), "--out", str(tmp_path / "out-1"))
        assert first.returncode == 0, first.stderr
        assert (f"starting the local Prefect API at http://127.0.0.1:{port} (first run: creating its database)"
                in first.stderr)
        assert "Warning" not in first.stderr  # e.g. runpy's, from each evaluation worker of `python -m flows.cli`
        server = json.loads(state.read_text())
        assert server["port"] == port and _alive(server["pid"])

        second = _cli(env, "run", "--source", str(runs), "--out", str(tmp_path / "out-2"))
        assert second.returncode == 0, second.stderr
        assert "starting the local Prefect API" not in second.stderr
        assert json.loads(state.read_text()) == server
        api_url = f"http://127.0.0.1:{port}/api"
        for out in ("out-1", "out-2"):  # both runs are in that server, with their window subflows
            assert {r["state_type"] for r in _runs_of_out(api_url, tmp_path / out)} == {"COMPLETED"}

        code, status = _server(monkeypatch, env, "status", capsys)
        assert code == 0 and f"pid {server['pid']}" in status and f":{port}" in status

        killed_session_left = _kill_9_during_a_run(env, runs, tmp_path / "out-killed")
        # Nothing of Prefect's outlives the killed CLI in its session (Prefect's temporary server used to);
        # the long-lived server, in its own session, is meant to stay until `tracetriage server stop`.
        assert not [cmd for cmd in killed_session_left if "prefect" in cmd and ("server" in cmd or "uvicorn" in cmd)]
        assert _alive(server["pid"]) and json.loads(state.read_text()) == server

        code, stopped = _server(monkeypatch, env, "stop", capsys)
        assert code == 0 and f"pid {server['pid']}" in stopped
        assert not _alive(server["pid"]) and not state.exists()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        assert _server(monkeypatch, env, "status", capsys)[0] == 1
    finally:
        _server(monkeypatch, env, "stop", capsys)


def _kill_9_during_a_run(env: dict[str, str], runs: Path, out: Path) -> list[str]:
    """Start a run in its own session, kill -9 it once its flow runs; the command lines left in that session
    (then killed too: evaluation workers of the killed run)."""
    cli = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--source", str(runs), "--out", str(out)],
                           cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "work").exists() and cli.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # the flow has started: the API it uses is up
        assert (out / "work").exists()
        os.kill(cli.pid, signal.SIGKILL)
        cli.wait()
        time.sleep(0.5)
        return [cmd for _, cmd in _session_processes(cli.pid)]
    finally:
        for pid, _ in _session_processes(cli.pid):
            os.kill(pid, signal.SIGKILL)


def _cli_on_a_terminal(env: dict[str, str], *args: str) -> tuple[int, str]:
    """Run the CLI with stdout and stderr on a pseudo-terminal, as a user's shell would; its exit code and
    what it printed."""
    main_end, child_end = os.openpty()
    cli = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                           stdout=child_end, stderr=child_end)
    os.close(child_end)
    printed = bytearray()
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:  # read as it prints, or a full terminal buffer would stall it
            if not select.select([main_end], [], [], 1)[0]:
                continue
            try:
                chunk = os.read(main_end, 65536)
            except OSError:  # EIO: every writer has closed the terminal
                break
            if not chunk:
                break
            printed += chunk
        else:
            cli.kill()
            pytest.fail(f"the CLI did not finish within 300 s; it printed: {printed.decode(errors='replace')}")
    finally:
        os.close(main_end)
    return cli.wait(timeout=30), printed.decode(errors="replace")


def test_a_configured_prefect_api_url_is_used_and_no_server_is_started_nor_telemetry_on_a_terminal(runs, tmp_path):
    # On a terminal, on a new Prefect home, and not in CI, Prefect's SDK prints a usage-data notice at import and
    # queues usage events for its analytics service; the CLI sets DO_NOT_TRACK=1 (unless set), which turns both
    # off. (Prefect still keeps its milestone marks and a device id under PREFECT_HOME/.sdk_telemetry.)
    env = {k: v for k, v in _env(tmp_path, PREFECT_API_URL=PREFECT_API_URL.value()).items()
           if k not in CI_ENV_VARS and k != "DO_NOT_TRACK"}
    out = tmp_path / "out"
    code, printed = _cli_on_a_terminal(env, "run", "--source", str(runs), "--out", str(out))
    assert code == 0, printed
    assert "local Prefect" not in printed
    assert not (tmp_path / "data" / "prefect-server" / "server.json").exists()
    assert {r["state_type"] for r in _runs_of_out(PREFECT_API_URL.value(), out)} == {"COMPLETED"}
    assert "usage data" not in printed and "DO_NOT_TRACK" not in printed

