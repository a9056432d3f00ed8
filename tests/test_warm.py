"""The warm runner (flows/warm.py): after a run on the local server, later runs with the same code and environment
fork from a process that has imported everything, with the caller's arguments, terminal, environment and exit
code; a caller with another environment runs as before; signals reach the run; `server stop` stops the runner.
One local server and runner for the module, in its own data dir."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows import warm
from tests.test_local_api import ROOT, _alive, _cli, _cli_on_a_terminal, _env, _free_port


@pytest.fixture(scope="module")
def home(tmp_path_factory, runs_12) -> tuple[dict[str, str], Path]:
    """A data dir whose local server ran one (cold) run, which left a runner; stopped afterwards."""
    tmp = tmp_path_factory.mktemp("warm")
    env = _env(tmp, TRACETRIAGE_SERVER_PORT=str(_free_port()))
    try:
        cold = _cli(env, "run", "--source", str(runs_12), "--out", str(tmp / "out-cold"), "--json")
        assert cold.returncode == 0, cold.stderr
        (tmp / "cold.json").write_text(cold.stdout)
        _wait(lambda: _runners(env), 180, "the cold run left no runner")
        yield env, tmp
    finally:
        _cli(env, "server", "stop")


@pytest.fixture(scope="module")
def runs_12(tmp_path_factory) -> Path:
    from tasks.sources.sample import generate_traces, write_sample

    path = tmp_path_factory.mktemp("warm-runs") / "runs.jsonl"
    write_sample(path, generate_traces(12, seed=5, hours=2))
    return path


def _server_home(env: dict[str, str]) -> Path:
    return Path(env["TRACETRIAGE_DATA"]) / "prefect-server"


def _runners(env: dict[str, str]) -> list[int]:
    return warm.runners(_server_home(env))


def _served(env: dict[str, str]) -> list[str]:
    """The runs the module's runners forked, as their logs name them."""
    return [line for log in sorted(_server_home(env).glob("runner-*.log"))
            for line in log.read_text().splitlines() if re.search(r" run \d+: ", line)]


def _wait(condition, seconds: float, message: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if found := condition():
            return found
        time.sleep(0.1)
    raise AssertionError(message)


def _windows(document: str) -> list[dict]:
    """A `--json` run's windows without what differs between two runs of the same source (ids, urls, paths)."""
    windows = json.loads(document)["windows"]
    for window in windows:
        for key in [k for k in window if "url" in k or "uri" in k or k.endswith("_id")]:
            del window[key]
    return windows


def test_a_run_forks_from_the_runner_with_the_callers_arguments_environment_and_output(home, runs_12):
    env, tmp = home
    before = _served(env)
    # PWD and SHLVL differ from shell to shell: they are not part of the runner's key.
    # The caller's umask, not the runner's, for what the run writes.
    served = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--source", str(runs_12), "--out",
                             str(tmp / "out-warm"), "--json"], cwd=ROOT, env={**env, "PWD": "/", "SHLVL": "7"},
                            capture_output=True, text=True, timeout=300, umask=0o077)
    assert served.returncode == 0, served.stderr
    [line] = _served(env)[len(before):]
    assert f"run --source {runs_12} --out {tmp / 'out-warm'} --json in {ROOT}" in line
    assert _windows(served.stdout) == _windows((tmp / "cold.json").read_text())
    assert (tmp / "out-warm" / "actions.jsonl").stat().st_mode & 0o077 == 0
    assert (tmp / "out-cold" / "actions.jsonl").stat().st_mode & 0o077 != 0

    # Exit codes and messages as a run of its own would give them: a refused source, a usage error.
    missing = _cli(env, "run", "--source", str(tmp / "missing.jsonl"), "--out", str(tmp / "out-missing"))
    assert missing.returncode == 2 and missing.stderr.count(f"{tmp / 'missing.jsonl'} does not exist") == 1
    usage = _cli(env, "run", "--no-such-flag")  # ends at once: its answers reach the caller together, run once
    assert usage.returncode == 2 and usage.stderr.count("unrecognized arguments: --no-such-flag") == 1
    assert len(_served(env)) == len(before) + 3
    [sock] = _server_home(env).glob("runner-*.sock")
    assert sock.stat().st_mode & 0o777 == 0o600  # a caller runs code: no other user may connect


def test_on_a_terminal_a_warm_run_prints_as_a_run_of_its_own(home, runs_12):
    env, tmp = home
    before = len(_served(env))
    code, printed = _cli_on_a_terminal(env, "run", "--source", str(runs_12), "--out", str(tmp / "out-tty"))
    assert code == 0, printed
    assert len(_served(env)) == before + 1
    assert "\x1b[" in printed  # Prefect's log lines in colour, as on a terminal: its handler is made anew
    assert "triaged 2 windows" in printed


def test_a_caller_with_another_environment_runs_itself_and_leaves_a_runner_of_its_own(home, runs_12):
    env, tmp = home
    other = {**env, "TRACETRIAGE_TEST_SOMETHING_ELSE": "1"}
    before, runners = len(_served(env)), set(_runners(env))
    done = _cli(other, "run", "--source", str(runs_12), "--out", str(tmp / "out-other"))
    assert done.returncode == 0, done.stderr
    assert len(_served(env)) == before  # not forked: it imported and ran in its own process
    new = _wait(lambda: set(_runners(env)) - runners, 180, "the run left no runner for its environment")
    assert runners <= set(_runners(env))  # the first runner still serves its own callers
    off = _cli({**env, "TRACETRIAGE_WARM": "0"}, "run", "--source", str(runs_12), "--out", str(tmp / "out-off"))
    assert off.returncode == 0, off.stderr
    time.sleep(1)
    assert set(_runners(env)) == runners | new  # TRACETRIAGE_WARM=0: neither served nor leaving a runner


def _hung_run(env: dict[str, str], tmp: Path, runs: Path, name: str) -> tuple[subprocess.Popen, int]:
    """A warm run stuck in an evaluator that sleeps an hour; the caller and the forked run's pid."""
    config = tmp / f"{name}.yaml"
    config.write_text(yaml.safe_dump({"evaluators": [{"key": "hung", "ref": "tests.test_hostile_eval:sleeps_an_hour",
                                                      "timeout": 600}], "eval_workers": 2}))
    before = len(_served(env))
    caller = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--config", str(config), "--source",
                               str(runs), "--out", str(tmp / name)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    line = _wait(lambda: _served(env)[before:], 60, "the run was not forked by the runner")[0]
    run = int(re.search(r" run (\d+): ", line).group(1))
    _wait(lambda: list((tmp / name).glob("work/**/*.state")), 180, "the evaluation never started")
    return caller, run


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_ctrl_c_or_a_killed_caller_ends_the_forked_run_and_its_workers(home, runs_12, how):
    env, tmp = home
    caller, run = _hung_run(env, tmp, runs_12, f"out-hung-{how.name}")
    workers = _wait(lambda: _descendants(run), 60, "the run has no evaluation workers")
    try:
        caller.send_signal(how)
        caller.wait(timeout=60)
        assert caller.returncode != 0
        assert _wait(lambda: not _alive(run), 60, f"the forked run outlived its caller's {how.name}")
        assert _wait(lambda: not any(_alive(pid) for pid in workers), 30, "evaluation workers were left")
    finally:
        caller.kill()
        for pid in [run, *workers]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_signal_the_caller_ignores_is_ignored_by_the_run_too(home, runs_12):
    """`nohup tracetriage run ... &`: the terminal's SIGHUP must not end the run, as it would not a run of its own."""
    env, tmp = home
    config = tmp / "nohup.yaml"
    config.write_text(yaml.safe_dump({"evaluators": [{"key": "hung", "ref": "tests.test_hostile_eval:sleeps_an_hour",
                                                      "timeout": 600}], "eval_workers": 2}))
    before = len(_served(env))
    caller = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--config", str(config), "--source",
                               str(runs_12), "--out", str(tmp / "out-nohup")], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    run = 0
    try:
        line = _wait(lambda: _served(env)[before:], 60, "the run was not forked by the runner")[0]
        run = int(re.search(r" run (\d+): ", line).group(1))
        _wait(lambda: list((tmp / "out-nohup").glob("work/**/*.state")), 180, "the evaluation never started")
        caller.send_signal(signal.SIGHUP)
        time.sleep(2)
        assert caller.poll() is None and _alive(run)
        caller.send_signal(signal.SIGTERM)
        caller.wait(timeout=60)
        assert _wait(lambda: not _alive(run), 60, "the run outlived its caller's SIGTERM")
    finally:
        caller.kill()
        if run and _alive(run):
            os.kill(run, signal.SIGKILL)


def test_server_stop_stops_the_runners(home):
    env, _ = home
    runners = _runners(env)
    assert runners
    stopped = _cli(env, "server", "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert _wait(lambda: not any(_alive(pid) for pid in runners), 30, "a runner outlived `server stop`")
    assert not list(_server_home(env).glob("runner-*.sock"))


def test_the_key_changes_with_the_code_the_environment_and_the_path_but_not_a_shells_own_variables(tmp_path,
                                                                                                  monkeypatch):
    for package in warm.PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    monkeypatch.setattr(warm, "ROOT", tmp_path)
    env, path = {"HOME": "/home/a", "PREFECT_HOME": str(tmp_path / "p")}, [str(tmp_path)]
    first = warm.key(env, path)
    assert warm.key({**env, "PWD": "/x", "OLDPWD": "/y", "SHLVL": "3", "_": "/bin/tracetriage"}, path) == first
    assert warm.key({**env, "PREFECT_API_URL": "http://127.0.0.1:1/api"}, path) != first
    assert warm.key(env, [*path, "/elsewhere"]) != first
    (tmp_path / "tasks" / "new.py").write_text("x = 1\n")
    assert warm.key(env, path) != first
    second = warm.key(env, path)
    os.utime(tmp_path / "tasks" / "new.py", ns=(1, 1))  # edited: another mtime
    assert warm.key(env, path) != second
    (tmp_path / "p").mkdir()
    third = warm.key(env, path)
    (tmp_path / "p" / "profiles.toml").write_text('active = "default"\n')  # `prefect profile` / `config set`
    assert warm.key(env, path) != third
