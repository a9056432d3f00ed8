"""The warm runner: `tracetriage run` without waiting for Python's imports.

A run's first ~2 s on two cores are imports: Prefect 1.1 s, pandas and pyarrow 0.5 s, the tasks and their
pydantic models. After a run that used the local Prefect server, the CLI leaves a runner process beside that
server. The runner imports everything a run needs once, then forks a ready copy of itself for each later
`tracetriage run`: the copy runs `flows.cli.main` with the caller's arguments, environment, working directory and
terminal (stdin, stdout and stderr, passed over a Unix socket). The caller waits, forwards its signals (Ctrl-C
stops the run as before) and exits with the run's exit code; if the caller is killed, the run gets a SIGTERM.

A runner serves only callers that would have imported what it imported: the same Python and interpreter flags,
`sys.path`, code (each .py file under flows/, tasks/ and blocks/: path, size, mtime), installed packages (each
`sys.path` directory's mtime), Prefect profiles file, and environment (all of it but PWD, OLDPWD, SHLVL and _).
That is the runner's key, in its socket's name. A caller with another key runs as before, importing, and leaves a
runner for its own key. A runner exits by itself once its code changes on disk, its server is gone, or
after 30 minutes without a run; `tracetriage server stop` stops it with the server. Once a runner has taken a
command the caller never runs it itself. TRACETRIAGE_WARM=0 turns runners off (Linux only).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("flows", "tasks", "blocks")
VOLATILE = frozenset({"PWD", "OLDPWD", "SHLVL", "_"})  # set by shells on every command; nothing imports them
CHECK_EVERY = 5.0  # seconds between a runner's checks that its code and its server are current
IDLE_EXIT = 1800.0  # seconds without a run after which a runner exits (a key per terminal would pile them up)
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGWINCH)

# The caller's key and environment as they were when the CLI started (the run then changes the environment).
_caller: dict[str, Any] = {}
IN_RUNNER = False  # this process is a runner's fork, running a caller's command


def enabled() -> bool:
    return (sys.platform == "linux" and hasattr(socket, "send_fds")
            and os.environ.get("TRACETRIAGE_WARM", "1") != "0")


def _mtime(path: str) -> int:
    try:
        return os.stat(path or ".").st_mtime_ns
    except OSError:
        return 0


def key(env: dict[str, str], path: list[str]) -> str:
    """What a process with this environment and `sys.path` imports, as a short hash (see the module's text)."""
    code = []
    for package in PACKAGES:
        for folder, subfolders, files in os.walk(ROOT / package):
            subfolders[:] = sorted(d for d in subfolders if d != "__pycache__")
            for name in sorted(files):
                if name.endswith(".py"):
                    try:
                        stat = os.stat(os.path.join(folder, name))
                    except OSError:  # removed while walked, or a dangling link (an editor's lock file)
                        code.append((folder, name, -1, -1))
                        continue
                    code.append((folder, name, stat.st_size, stat.st_mtime_ns))
    home = env.get("PREFECT_HOME") or os.path.expanduser("~/.prefect")
    profiles = env.get("PREFECT_PROFILES_PATH") or os.path.join(home, "profiles.toml")
    described = [sys.executable, sys.version, subprocess._args_from_interpreter_flags(),  # type: ignore[attr-defined]
                 [(p, _mtime(p)) for p in path], _mtime(profiles),
                 sorted((k, v) for k, v in env.items() if k not in VOLATILE), code]
    return hashlib.sha256(json.dumps(described).encode()).hexdigest()[:20]


def _paths(home: Path, key_: str) -> tuple[Path, Path]:
    return home / f"runner-{key_}.sock", home / f"runner-{key_}.lock"


def _home() -> Path:
    from flows.local_api import server_home

    return server_home()


# The caller's side.

def run(argv: list[str]) -> int | None:
    """`tracetriage ARGV` in a warm runner's fork, if one serves this caller: its exit code. None when no runner
    took the command (none runs for this key, or warm runs are off): the caller then runs it itself. Once a
    runner has taken it, it is never run here too, whatever happens next."""
    _caller.update(env=dict(os.environ), path=list(sys.path))
    if not enabled():
        return None
    _caller["key"] = key(_caller["env"], _caller["path"])
    sock, _ = _paths(_home(), _caller["key"])
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        for fd in (0, 1, 2):
            os.fstat(fd)  # a closed standard stream cannot be passed on
        conn.connect(str(sock))
        if _peer_uid(conn) != os.getuid():
            raise OSError("the runner's socket is another user's")  # it would get this environment's secrets
        umask = os.umask(0o22)
        os.umask(umask)
        ignored = [number for number in FORWARDED if signal.getsignal(number) == signal.SIG_IGN]  # e.g. nohup
        request = json.dumps({"argv": [sys.argv[0], *argv], "env": _caller["env"], "cwd": os.getcwd(),
                              "umask": umask, "ignored": ignored}).encode()
        socket.send_fds(conn, [struct.pack("!I", len(request))], [0, 1, 2])
        conn.sendall(request)
        answers = conn.makefile("rb")
        if answers.readline() != b"taken\n":
            raise OSError("the runner did not take the command")
    except OSError:
        conn.close()
        return None
    pid, pending = [], []

    def forward(signum: int, frame: Any) -> None:
        if pid:
            _forward(pid[0], signum)
        else:
            pending.append(signum)  # until the run's pid is known

    for number in FORWARDED:
        if number not in ignored:
            signal.signal(number, forward)
    try:
        pid.append(int(answers.readline()))
        for signum in pending:
            _forward(pid[0], signum)
        code = int(answers.readline())
    except (OSError, ValueError):
        print(f"tracetriage: the warm runner ended before the run reported its exit; its log: "
              f"{sock.with_suffix('.log')}", file=sys.stderr)
        return 1
    if code < 0:  # ended by a signal: end so too, as the run's own process would have
        if -code not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        return 128 - code
    return code


def _peer_uid(conn: socket.socket) -> int:
    return struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]


def _forward(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def leave_runner() -> None:
    """After a run on the local server: start a runner for this caller's key unless one is up (it imports in the
    background, in its own session, and serves the next run)."""
    if IN_RUNNER or not enabled() or not _caller.get("local_server"):
        return
    home = _home()
    _, lock = _paths(home, _caller["key"])
    if _held(lock):
        return
    # The runner's log, this user's alone (it names commands and directories), begun anew for each runner.
    log = os.fdopen(os.open(home / f"runner-{_caller['key']}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
                    "wb")
    with log:
        subprocess.Popen([sys.executable, *subprocess._args_from_interpreter_flags(),  # type: ignore[attr-defined]
                          "-c", "import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
                                "from flows.warm import serve; serve()", json.dumps(_caller["path"])],
                         env=_caller["env"], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                         start_new_session=True)


def used_local_server() -> None:
    """This run uses the local Prefect server: it leaves a runner when it ends."""
    _caller["local_server"] = "key" in _caller


def _held(lock: Path) -> bool:
    """Whether a live runner holds this lock file. (A shared lock for the probe: a runner starting at that
    moment, which takes it exclusively, retries; lock files are never removed, so each names one inode.)"""
    try:
        with open(lock) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
    except FileNotFoundError:
        pass
    return False


def stop_runners(home: Path) -> None:
    """Stop every runner of this server home (`tracetriage server stop`); runs they forked finish."""
    for lock in home.glob("runner-*.lock"):
        if _held(lock):
            with contextlib.suppress(ValueError, OSError):
                os.kill(int(lock.read_text()), signal.SIGTERM)


def runners(home: Path) -> list[int]:
    pids = []
    for lock in home.glob("runner-*.lock"):
        if _held(lock):
            with contextlib.suppress(ValueError, OSError):
                pids.append(int(lock.read_text()))
    return pids


# The runner's side.

# Imported by a run after its start (measured: what a 20-trace run added to sys.modules), so a fork finds them too.
_RUN_IMPORTS = ["prefect.flow_engine", "prefect.task_engine", "prefect.engine", "prefect.utilities.visualization",
                "anyio._backends._asyncio", "pandas.core.reshape.reshape", "pandas.io.formats.string",
                "pyarrow.acero", "rich._emoji_codes", "rich.progress"]


def _import_run_path() -> None:
    """What `tracetriage run` imports before and during a run, and the first-call costs a run would pay."""
    from fastapi.encoders import jsonable_encoder  # noqa: F401 - Prefect's, on a flow run's first parameters

    import flows.cli  # noqa: F401
    import flows.triage  # noqa: F401
    import tasks.evaluation.evaluate  # noqa: F401
    import tasks.sinks.connections  # noqa: F401
    import tasks.summary  # noqa: F401

    for name in _RUN_IMPORTS:
        with contextlib.suppress(ImportError):  # another version of a package may not have it
            importlib.import_module(name)


def serve() -> None:
    """The runner's loop: fork a run for each caller, send the caller its run's pid then its exit code."""
    env, path = dict(os.environ), list(sys.path)
    own = key(env, path)
    home = _home()
    sock_path, lock_path = _paths(home, own)
    lock = open(lock_path, "a+")  # noqa: SIM115 - held for the runner's life
    for _attempt in range(20):  # a probe (`_held`) holds it for microseconds; another runner, for good
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            time.sleep(0.05)
    else:
        return  # another runner serves this key
    _import_run_path()
    if threading.active_count() > 1:
        print("tracetriage warm runner: threads started while importing; a fork would not be safe", file=sys.stderr)
        return
    sock_path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    umask = os.umask(0o177)  # the socket is this user's alone: a caller runs code (its config's evaluators)
    try:
        listener.bind(str(sock_path))
    finally:
        os.umask(umask)
    listener.listen(16)
    bound = sock_path.stat().st_ino
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    _log(f"runner {os.getpid()} serving key {own} at {sock_path}")
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # wakes the select through the pipe
    stopping = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    owner, runs, last_used = os.getpid(), {}, time.monotonic()
    try:
        while not stopping:
            ready, _, _ = select.select([listener, wake_read], [], [], CHECK_EVERY)
            if wake_read in ready:
                os.read(wake_read, 4096)
            _reap(runs)
            if runs:
                last_used = time.monotonic()
            if listener in ready:
                conn, _ = listener.accept()
                pid = _fork(conn, runs, [listener.fileno(), wake_read, wake_write, lock.fileno()])
                if pid:
                    runs[pid] = conn
            elif time.monotonic() - last_used > IDLE_EXIT:
                _log(f"no run for {IDLE_EXIT / 60:.0f} minutes: exiting (the next run imports anew)")
                break
            elif key(env, path) != own:
                _log("the code or packages changed on disk: exiting (the next run imports anew)")
                break
            elif not _server_up():
                _log("the local Prefect server is gone: exiting")
                break
    finally:
        if os.getpid() == owner:
            with contextlib.suppress(OSError):
                if sock_path.stat().st_ino == bound:  # not a later runner's
                    sock_path.unlink()
            listener.close()
            while runs:  # forked runs finish; their callers get their exit codes
                time.sleep(0.1)
                _reap(runs)


def _server_up() -> bool:
    from flows.local_api import recorded

    return recorded() is not None


def _reap(runs: dict[int, socket.socket]) -> None:
    while runs:
        try:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = runs.pop(pid, None)
        _log(f"run {pid} ended: exit code {os.waitstatus_to_exitcode(status)}, CPU {usage.ru_utime:.2f} s user "
             f"{usage.ru_stime:.2f} s system (its own and its waited-for children's), peak RSS "
             f"{usage.ru_maxrss / 1024:.0f} MB")
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
            conn.close()


def _fork(conn: socket.socket, runs: dict[int, socket.socket], close: list[int]) -> int | None:
    """Read a caller's request and fork its run; the run's pid (None: a request that could not be read)."""
    conn.settimeout(5)
    fds: list[int] = []
    try:
        uid = _peer_uid(conn)
        if uid != os.getuid():
            raise ValueError(f"a caller of another user (uid {uid})")
        header, fds, _, _ = socket.recv_fds(conn, 4, 3)
        (length,) = struct.unpack("!I", header)
        body = b""
        while len(body) < length:
            chunk = conn.recv(length - len(body))
            if not chunk:
                raise ValueError("the caller left")
            body += chunk
        request = json.loads(body)
        if len(fds) != 3:
            raise ValueError("the caller's stdin, stdout and stderr were not passed")
        conn.sendall(b"taken\n")  # from here the caller never runs the command itself
    except (OSError, ValueError, struct.error):
        for fd in fds:
            os.close(fd)
        conn.close()
        return None
    conn.settimeout(None)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        for fd in close + [other.fileno() for other in runs.values()]:
            os.close(fd)
        _run(conn, fds, request)  # never returns
    for fd in fds:
        os.close(fd)
    with contextlib.suppress(OSError):
        conn.sendall(f"{pid}\n".encode())
    _log(f"run {pid}: {' '.join(request['argv'][1:])} in {request['cwd']}")
    return pid


def _log(line: str) -> None:
    with contextlib.suppress(OSError):  # a full disk must not end the runner, nor keep a caller waiting
        print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}", flush=True)


def _run(conn: socket.socket, fds: list[int], request: dict[str, Any]) -> None:
    """In the fork: become the caller's `tracetriage` process, run its command, exit with its code."""
    global IN_RUNNER
    IN_RUNNER = True
    signal.set_wakeup_fd(-1)
    for number in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(number, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for number in request.get("ignored", []):  # as the caller had them, e.g. SIGHUP under nohup
        signal.signal(number, signal.SIG_IGN)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    sys.stdout.reconfigure(line_buffering=os.isatty(1))  # as Python sets it up for a terminal
    os.chdir(request["cwd"])
    os.umask(request["umask"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = request["argv"]
    import prefect.context
    from prefect.logging.configuration import setup_logging

    prefect.context.refresh_global_settings_context()
    setup_logging(incremental=False)  # its console handler, made anew for this terminal (colours, width)
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()  # each run its own legacy NumPy seed, as a new process has

    def hang_up() -> None:  # the caller is gone (killed): stop the run as a SIGTERM would
        with contextlib.suppress(OSError):
            conn.recv(1)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=hang_up, name="warm-caller", daemon=True).start()
    from flows.cli import finish, main

    try:
        code = main(sys.argv[1:])
    except SystemExit as exc:  # argparse's usage errors and --help
        code = exc.code if isinstance(exc.code, int) or exc.code is None else 1
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    except KeyboardInterrupt:  # as Python ends on one: the traceback, then killed by SIGINT
        traceback.print_exc()
        code = -signal.SIGINT
    except BaseException:
        traceback.print_exc()
        code = 1
    finish(code)
