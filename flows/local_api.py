"""The local Prefect API the CLI runs its flows against: started on first use, reused by later runs.

Prefect's own default, a temporary server per process, costs every `tracetriage run` its start-up (6–13 s here,
more on a fresh Prefect home, which migrates its database first) and fails the run when that exceeds Prefect's
20 s allowance. Instead the CLI starts one `prefect server start` on 127.0.0.1 in its own session (so it outlives
the CLI, and a kill -9 of the CLI leaves nothing temporary behind), records it in `server.json` beside its own
PREFECT_HOME under the tracetriage data dir, and later runs find it by that record and a health check. Its UI
shows the local flow runs and their artifacts. `tracetriage server stop` stops it.

When a Prefect API is configured (`PREFECT_API_URL`, in the environment or the active Prefect profile), the CLI
uses that one and starts nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from flows import prefect_schema

STARTUP_ALLOWANCE = 300.0  # seconds; a fresh home on a busy 2-core machine took 38 s, so be generous
STOP_ALLOWANCE = 15.0
KILL_ALLOWANCE = 5.0  # for a SIGKILLed process to be gone


class LocalServerError(RuntimeError):
    """The local Prefect API did not come up (its log says why)."""


def data_dir() -> Path:
    """Where tracetriage keeps per-user state: `$TRACETRIAGE_DATA`, else `$XDG_DATA_HOME/tracetriage`, else
    `~/.local/share/tracetriage`."""
    if home := os.environ.get("TRACETRIAGE_DATA"):
        return Path(home).expanduser()
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "tracetriage"


@dataclass(frozen=True)
class LocalServer:
    """One local Prefect server, as its `server.json` records it."""

    pid: int
    port: int
    home: Path
    first_run: str = ""  # started on a home without a database: what it does first (e.g. "migrating its database")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    @property
    def log(self) -> Path:
        return self.home / "server.log"

    def healthy(self, timeout: float = 2.0) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=timeout) as answer:
                return answer.status == 200
        except OSError:
            return False

    def alive(self) -> bool:
        """The recorded process still runs and is a Prefect server (not another process that got its pid)."""
        try:
            cmdline = Path(f"/proc/{self.pid}/cmdline").read_bytes()
        except OSError:
            return False
        return b"prefect" in cmdline and b"server" in cmdline and str(self.port).encode() in cmdline

    def wait_until_healthy(self, allowance: float) -> None:
        deadline = time.monotonic() + allowance
        while not self.healthy():
            if not self.alive():
                raise LocalServerError(f"the local Prefect API stopped while starting; its log, {self.log}, ends:\n"
                                       f"{_tail(self.log)}")
            if time.monotonic() > deadline:
                raise LocalServerError(
                    f"the local Prefect API (pid {self.pid}, {self.url}) did not answer within {allowance:.0f} s; "
                    f"see {self.log}, or allow longer with TRACETRIAGE_SERVER_STARTUP_TIMEOUT=<seconds>")
            time.sleep(0.2)


def server_home() -> Path:
    return data_dir() / "prefect-server"


def recorded() -> LocalServer | None:
    """The server `server.json` records, if its process still runs."""
    home = server_home()
    try:
        state = json.loads((home / "server.json").read_text())
        server = LocalServer(pid=int(state["pid"]), port=int(state["port"]), home=home)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return server if server.alive() else None


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    """One CLI at a time decides whether to start the server, so two first runs start one server, not two."""
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "server.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _free_port(preferred: int | None) -> int:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", preferred or 0))
        except OSError:
            probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# The server records task runs from the client's events. Prefect's default writes each event in its own SQLite
# transaction as it arrives; one that commits while an API request (e.g. creating a window's flow run) is between
# its read and its write makes that request fail with SQLITE_BUSY, which the server answers with 503 and the client
# retries 2 s later. That was up to 2 s per window of a 20-trace run, and 1.3 s of server CPU. Written in batches,
# at most 1 s apart (the UI shows a task's state up to 1 s later), no such conflict was seen in 20 runs
# (docs/benchmarks.md, "The local server's 503s").
RECORDER_BATCHES = {"PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "1000",
                    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1"}


def _server_env(home: Path) -> dict[str, str]:
    """The user's environment without their Prefect settings (a database URL, an API URL, a profile must not
    leak into this server), with this server's own home; offline: no telemetry."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return {**env, "PREFECT_HOME": str(home / "home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_LOGGING_LEVEL": "WARNING", **RECORDER_BATCHES}


def record_task_runs_in_batches() -> None:
    """Have a Prefect server this process starts (Prefect's temporary one, the test harness's) record task runs
    in batches too, unless the environment sets it: they inherit the environment."""
    for name, value in RECORDER_BATCHES.items():
        os.environ.setdefault(name, value)


def ensure_started() -> tuple[LocalServer, bool]:
    """The running local server, or a new one starting (not yet answering): `(server, started_now)`.

    Returns at once: the caller imports and validates while the server starts, then calls
    `wait_until_healthy`."""
    home = server_home()
    with _locked(home):
        if (server := recorded()) is not None:
            return server, False
        state = home / "server.json"
        previous = None
        with contextlib.suppress(OSError, ValueError, KeyError):
            previous = int(json.loads(state.read_text())["port"])
        port = _free_port(int(os.environ.get("TRACETRIAGE_SERVER_PORT") or 0) or previous)
        database, first_run = home / "home" / "prefect.db", ""
        if not database.exists():
            first_run = ("creating its database" if prefect_schema.create(database)
                         else "migrating its database")
        with open(home / "server.log", "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                env=_server_env(home), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=home)
        state.write_text(json.dumps({"pid": process.pid, "port": port}))
        return LocalServer(pid=process.pid, port=port, home=home, first_run=first_run), True


def stop() -> LocalServer | None:
    """Stop the recorded server and everything in its session (SIGTERM, then SIGKILL after STOP_ALLOWANCE);
    returns what was stopped, None if nothing ran."""
    home = server_home()
    with _locked(home):
        server = recorded()
        (home / "server.json").unlink(missing_ok=True)
        from flows import warm

        warm.stop_runners(home)  # they would exit on their own within seconds of the server
        if server is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_ALLOWANCE
        while server.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)  # whatever of its session is left
        deadline = time.monotonic() + KILL_ALLOWANCE
        while _running(server.pid) and time.monotonic() < deadline:  # a kill is delivered, not done, on return
            time.sleep(0.05)
        return server


def _running(pid: int) -> bool:
    """The process exists and has not exited (a zombie, waiting to be reaped, has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def configured_api_url() -> str | None:
    """The Prefect API the user configured (env or active profile), if any."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url


def startup_allowance() -> float:
    return float(os.environ.get("TRACETRIAGE_SERVER_STARTUP_TIMEOUT") or STARTUP_ALLOWANCE)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
