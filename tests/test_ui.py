"""What a person sees in Prefect's UI and the CLI: the forms' schema, the artifacts' tables, the run's roll-up and
warnings, the report's state directory. (bench/ui_browser.py checks the same pages in a real browser.)"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from prefect.utilities.callables import parameter_schema

from flows.cli import main
from flows.report import trend_report_flow
from flows.triage import triage, triage_backfill, triage_latest
from tasks.config import ConfigError, FileSource, LoopConfig, load_config, source_form_schema, source_identity
from tasks.sinks.connections import validate
from tasks.sources.sample import SAMPLE_START, generate_traces, write_sample
from tasks.summary import MIN_LIFT, patterns_rows, rollup_row, summary_markdown, telling_patterns, window_events


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """300 sample traces over 3 hours, triaged."""
    tmp = tmp_path_factory.mktemp("ui")
    source = tmp / "runs.jsonl"
    write_sample(source, generate_traces(300, seed=41, hours=3))
    config = LoopConfig(name="ui", source=FileSource(path=str(source)), eval_workers=1)
    return {"source": source, "config": config, "out": tmp / "out", "result": triage(config=config,
                                                                                     out=str(tmp / "out"))}


def _descriptions(schema: object) -> list[str]:
    if isinstance(schema, dict):
        own = [schema["description"]] if isinstance(schema.get("description"), str) else []
        return own + [d for v in schema.values() for d in _descriptions(v)]
    if isinstance(schema, list):
        return [d for v in schema for d in _descriptions(v)]
    return []


@pytest.mark.parametrize("flow", [triage, triage_backfill, triage_latest, trend_report_flow])
def test_every_flow_parameter_is_described_and_no_description_has_angle_brackets(flow):
    schema = parameter_schema(flow).model_dump_for_openapi()
    assert all(p.get("description") for p in schema["properties"].values()), schema["properties"]
    assert not [d for d in _descriptions(schema) if "<" in d or ">" in d]  # the form drops text in brackets


def test_source_is_one_flat_object_in_the_form_and_parses_to_the_kind_chosen(tmp_path):
    form = source_form_schema()
    assert "oneOf" not in json.dumps(form) and form["properties"]["kind"]["enum"] == ["sample", "file", "langsmith"]
    assert {"traces", "path", "project", "rate_limit"} <= set(form["properties"])
    # What the form sends: every kind's fields at their defaults, plus the ones typed in.
    sent = {name: field["default"] for name, field in form["properties"].items() if "default" in field}
    config = LoopConfig.model_validate({"source": {**sent, "kind": "file", "path": "runs.jsonl"}})
    assert config.source == FileSource(path="runs.jsonl")
    typed = LoopConfig.model_validate({"source": {**sent, "kind": "langsmith", "project": "support", "filter": "",
                                                  "path": ""}})
    assert typed.source.project == "support" and typed.source.filter is None  # empty text is no value
    with pytest.raises(ConfigError, match=r"source: source.path is a field of kind 'file', but source.kind is "
                                          r"'sample'"):
        load_config(data={"source": {**sent, "path": "runs.jsonl"}})


def test_durations_carry_the_pattern_the_form_checks():
    import jsonschema

    window = LoopConfig.model_json_schema()["$defs"]["WindowConfig"]
    assert jsonschema.Draft202012Validator(window).is_valid({"size": "15m", "lag": "0s"})
    assert not jsonschema.Draft202012Validator(window).is_valid({"size": "1 hour"})


def test_a_missing_file_names_the_parameter_not_a_cli_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match="check source.path") as error:
        validate(LoopConfig(source=FileSource(path=str(tmp_path / "nope.jsonl"))))
    assert "--source" not in str(error.value)


def test_a_range_without_traces_ends_with_a_warning_naming_the_source_and_what_it_holds(small):
    later = SAMPLE_START + timedelta(days=30)
    result = triage_backfill(start=later, end=later + timedelta(hours=2), config=small["config"],
                             out=str(small["out"]))
    assert result["windows"] == []
    assert result["warning"] == (f"no traces of source file {small['source']} in 2026-12-02 09:00 .. 2026-12-02 "
                                 "11:00 UTC; it holds 3 windows, 2026-11-02 09:00 .. 2026-11-02 11:00 UTC")


def test_the_rollup_has_one_row_per_window_with_percentages_and_the_window_run(small):
    windows, runs = small["result"]["windows"], small["result"]["window_runs"]
    assert len(runs) == len(windows) == 3 and len(set(runs)) == 3
    row = rollup_row(windows[0], f"http://ui/runs/flow-run/{runs[0]}")
    assert row["window"] == "2026-11-02 09:00" and row["traces"] == windows[0]["traces"]
    assert row["failing"] == f"{windows[0]['failing_traces'] / windows[0]['traces']:.1%}"
    assert row["top root cause"].endswith("%") and row["run"].endswith(runs[0])


def test_the_patterns_table_keeps_the_summary_lift_filter_in_readable_columns(small):
    window = small["result"]["windows"][0]
    rows, telling = patterns_rows(window), telling_patterns(window)
    assert len(telling) < len(window["patterns"])  # the sample has conditions as common among passes
    assert all(p["lift"] is None or p["lift"] >= MIN_LIFT for p in telling)
    assert [r["failure mode"].split(" (")[0] for r in rows] == [p["condition"] for p in telling][:len(rows)]
    assert set(rows[0]) == {"failure mode", "of failures", "of passes", "lift"}
    assert all(r["of failures"].endswith("%") and len(r["of failures"].split(".")[1]) == 2 for r in rows)
    markdown = summary_markdown(window)
    assert "```" not in markdown and "| evaluator |" in markdown  # wraps: no code block


def test_event_ids_differ_between_sources_and_repeat_for_the_same_source(small, tmp_path):
    window = small["result"]["windows"][0]
    here = source_identity(small["config"].source)
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(small["source"].read_bytes())
    other = source_identity(FileSource(path=str(copy)))
    ids = [e["id"] for e in window_events(window, "ui", here)]
    assert ids == [e["id"] for e in window_events(window, "ui", here)]
    assert not set(ids) & {e["id"] for e in window_events(window, "ui", other)}


def test_report_reads_the_state_directory_run_wrote_and_writes_the_chart_where_asked(tmp_path, capsys):
    runs, state, chart = tmp_path / "runs.jsonl", tmp_path / "state", tmp_path / "charts" / "trend.png"
    assert main(["sample", "--windows", "3", "--traces", "60", "--out", str(runs)]) == 0
    assert main(["run", "--source", str(runs), "--out", str(state), "--json"]) == 0
    capsys.readouterr()
    assert main(["report", "--out", str(state), "--chart", str(chart), "--since", "1d"]) == 0
    out = capsys.readouterr().out
    assert "0 of 3 windows spiked" in out and chart.read_bytes()[:4] == b"\x89PNG"
    assert main(["report", "--out", str(state)]) == 0
    assert (state / "trend.png").exists()


def test_sample_plants_a_spike_in_the_window_named(tmp_path, capsys):
    runs = tmp_path / "spike.jsonl"
    assert main(["sample", "--windows", "3", "--traces", "100", "--window-rate", "2:tool_error=0.6",
                 "--out", str(runs)]) == 0
    truth = [json.loads(line) for line in runs.with_name("spike.truth.jsonl").read_text().splitlines()]
    tool_errors = [sum(t["failure_mode"] == "tool_error" for t in truth[i * 100:(i + 1) * 100]) for i in range(3)]
    assert tool_errors[1] > 40 and max(tool_errors[0], tool_errors[2]) < 20
    assert main(["sample", "--windows", "3", "--window-rate", "4:tool_error=0.6", "--out", str(runs)]) == 2
    assert "N must be a window number from 1 to 3" in capsys.readouterr().err


def test_the_hourly_deployment_is_paused_until_it_has_a_config_block():
    import yaml

    project = yaml.safe_load((Path(__file__).resolve().parents[1] / "prefect.yaml").read_text())
    (hourly,) = [d for d in project["deployments"] if d["name"] == "triage-hourly"]
    assert hourly["paused"] is True and "config_block" in hourly["description"]


def test_the_readme_block_step_ships_its_example_loop():
    root = Path(__file__).resolve().parents[1]
    assert "load_config('docs/loop.yaml')" in (root / "README.md").read_text()
    assert load_config(root / "docs" / "loop.yaml").name == "support-bot"
