"""The command line: `tracetriage sample` and `tracetriage run`, as a user types them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "runs.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "sample", "--traces", "300", "--hours", "1", "--seed", "4",
         "--out", str(path)],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )
    assert "wrote" in done.stdout and path.exists() and path.with_name("runs.truth.jsonl").exists()
    return path


def test_run_json_prints_one_document_with_the_promised_fields(runs, tmp_path, capsys):
    assert main(["run", "--source", str(runs), "--out", str(tmp_path), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    (window,) = document["windows"]
    assert set(window) == {"window_start", "window_end", "traces", "spans", "skipped_records", "evaluators",
                           "failing_traces", "root_causes", "patterns", "actions", "spike", "snapshot_uri"}
    assert window["traces"] == 300
    assert window["spike"] is None  # a first window has no baseline
    assert set(window["evaluators"]["answer_grounded"]) == {"threshold", "pass", "fail", "error"}
    assert set(window["root_causes"][0]) == {"span_name", "reason", "traces", "share", "example_trace_ids"}
    assert set(window["patterns"][0]) == {"condition", "kind", "span_name", "detail", "failing_traces", "fail_share",
                                          "pass_share", "lift", "example_trace_ids"}
    assert window["actions"]["sent"] == window["failing_traces"]
    assert window["snapshot_uri"].startswith("file://")


def test_run_prints_a_readable_summary(runs, tmp_path, capsys):
    assert main(["run", "--source", str(runs), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "root causes:" in out and "failure modes (over-represented among failures" in out and "actions:" in out


def test_start_and_end_select_windows(runs, tmp_path, capsys):
    assert main(["run", "--source", str(runs), "--out", str(tmp_path), "--json",
                 "--start", "2030-01-01T00:00", "--end", "2030-01-02T00:00"]) == 0
    assert json.loads(capsys.readouterr().out)["windows"] == []


def test_a_bad_config_is_refused_before_anything_is_written(tmp_path, capsys):
    config = tmp_path / "loop.yaml"
    config.write_text(yaml.safe_dump({"evaluators": [{"key": "q", "ref": "no_such_module:fn", "threshold": 0.5}]}))
    out = tmp_path / "out"
    assert main(["run", "--config", str(config), "--out", str(out)]) == 2
    assert "module 'no_such_module' cannot be imported" in capsys.readouterr().err
    assert not out.exists()


def test_a_missing_source_file_is_one_clear_error(tmp_path, capsys):
    assert main(["run", "--source", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(("bug", "kind"), [("int('0.5')", "ValueError"), ("len(None)", "TypeError")])
def test_an_evaluator_module_that_raises_is_exit_1_with_its_traceback_not_a_one_line_config_error(
        runs, tmp_path, monkeypatch, capsys, bug, kind):
    module = f"broken_evals_{kind.lower()}"
    (tmp_path / f"{module}.py").write_text(f"THRESHOLD = {bug}  # a bug in the user's module\n\n\n"
                                           "def score(outputs):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tmp_path / "loop.yaml"
    config.write_text(yaml.safe_dump({"evaluators": [{"key": "q", "ref": f"{module}:score", "threshold": 0.5}]}))
    out = tmp_path / "out"
    assert main(["run", "--config", str(config), "--source", str(runs), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and f"{module}.py\", line 1" in err and f"\n{kind}: " in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"tracetriage: unexpected {kind}: a bug") and "writes no log file" in last
    assert "no flow run had started" in last
    assert not out.exists()


def test_a_bug_during_the_flow_is_exit_1_with_its_traceback_and_where_the_flow_run_logs_are(
        runs, tmp_path, monkeypatch, capsys):
    import tasks.analysis.failure_modes

    def failure_patterns(*args, **kwargs):
        raise ValueError("a bug in the failure modes")

    monkeypatch.setattr(tasks.analysis.failure_modes, "failure_patterns", failure_patterns)
    assert main(["run", "--source", str(runs), "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and 'raise ValueError("a bug in the failure modes")' in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("tracetriage: unexpected ValueError: a bug") and "writes no log file" in last
    assert re.search(r"flow-run logs are in the Prefect UI at http://\S+/runs$", last)


@pytest.mark.parametrize(("rule", "message"), [
    ({"secret_env": "TRACETRIAGE_TEST_UNSET_SECRET"},
     "webhook secret: environment variable TRACETRIAGE_TEST_UNSET_SECRET is not set"),
    ({"secret_block": "no-such-secret"},
     "secret_block 'no-such-secret': Unable to find block document named no-such-secret for block type secret"),
])
def test_a_missing_secret_is_a_config_error_exit_2_with_one_line(runs, tmp_path, monkeypatch, capsys, rule,
                                                                 message):
    monkeypatch.delenv("TRACETRIAGE_TEST_UNSET_SECRET", raising=False)
    config = tmp_path / "loop.yaml"
    config.write_text(yaml.safe_dump({"actions": [{"when": {"failing": True}, "do": "webhook",
                                                   "url": "https://hooks.example.com/triage", **rule}]}))
    out = tmp_path / "out"
    assert main(["run", "--config", str(config), "--source", str(runs), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"tracetriage: {message}"]
    assert not out.exists()


def test_a_source_flag_its_field_refuses_is_exit_2_with_one_line(tmp_path, capsys):
    assert main(["run", "--source", "langsmith:", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "tracetriage: --source 'langsmith:': a langsmith source needs `project: NAME` or `experiment: NAME` "
        "(one of them)"]


def test_the_readme_opens_with_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    commands = [line for line in readme.splitlines() if line.startswith("python3 -m venv .venv")]
    assert len(commands) >= 2
    run_command, test_command = commands[:2]
    assert run_command.endswith(".venv/bin/tracetriage run")
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_prefect_yaml_entrypoints_are_the_flows_and_there_is_a_pull_step():
    import importlib

    project = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert project["pull"], "a pull step, or prefect deploy records this machine's directory"
    flows = {}
    for deployment in project["deployments"]:
        module, _, name = deployment["entrypoint"].partition(":")
        flows[deployment["name"]] = getattr(importlib.import_module(module.replace("/", ".").removesuffix(".py")),
                                            name).name
    assert flows == {"triage-hourly": "triage-latest", "triage-backfill": "triage-backfill",
                     "trend-report": "trend-report", "triage": "triage"}


def test_sample_takes_failure_rates_and_refuses_unknown_modes(tmp_path, capsys):
    out = tmp_path / "all-tool-errors.jsonl"
    assert main(["sample", "--traces", "20", "--out", str(out), "--rate", "tool_error=1",
                 "--rate", "irrelevant_retrieval=0", "--rate", "slow_reranker=0",
                 "--rate", "hallucinated_answer=0"]) == 0
    truth = [json.loads(line) for line in out.with_name("all-tool-errors.truth.jsonl").read_text().splitlines()]
    assert {t["failure_mode"] for t in truth} == {"tool_error"}
    assert main(["sample", "--traces", "5", "--out", str(out), "--rate", "gremlins=0.5"]) == 2
    assert "unknown failure modes ['gremlins']" in capsys.readouterr().err
