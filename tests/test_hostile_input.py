"""Hostile input, as production hands it over: records that cannot be decoded, sources that are not files of
records, configs that contradict themselves, and the exit codes and lines a user gets for each."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from flows.cli import main
from tasks.config import ActionConfig, ConfigError, When, load_config
from tasks.dispatch.ledger import read_ledger
from tasks.sources.records import load_spans
from tasks.sources.sample import generate_traces, write_sample
from tasks.store import SnapshotStore

BOM = b"\xef\xbb\xbf"


def _lines(tmp_path: Path, traces: int = 6) -> list[bytes]:
    path = tmp_path / "clean.jsonl"
    write_sample(path, generate_traces(traces, seed=5, hours=1, rates={"tool_error": 0.5}))
    return path.read_bytes().splitlines()


def _write(path: Path, lines: list[bytes], head: bytes = b"") -> Path:
    path.write_bytes(head + b"\n".join(lines) + b"\n")
    return path


def _roots(lines: list[bytes]) -> list[int]:
    return [i for i, line in enumerate(lines) if orjson.loads(line)["parent_run_id"] is None]


def _run(tmp_path: Path, source: Path | str, *extra: str, config: dict | None = None) -> int:
    path = tmp_path / "loop.yaml"
    path.write_text(yaml.safe_dump({"eval_workers": 1, **(config or {})}))
    return main(["run", "--config", str(path), "--source", str(source), "--out", str(tmp_path / "out"), *extra])


def _logged_once_each(out: Path) -> list[str]:
    """The action log's ids, checked against the ledger: every line readable, each sent action logged once."""
    ids = [json.loads(line)["action_id"] for line in (out / "actions.jsonl").read_text().splitlines()]
    sent = {r["action_id"] for r in read_ledger(SnapshotStore(str(out / "snapshots")), "tracetriage")
            if r["state"] == "sent"}
    assert len(ids) == len(set(ids)) and set(ids) == sent
    return ids


def test_undecodable_records_are_skipped_and_named_by_their_file_line_and_a_leading_bom_is_accepted(
        tmp_path, capsys):
    lines = _lines(tmp_path)
    roots = _roots(lines)
    first, second, third = roots[1:4]  # roots[0] is the first line, after the file's byte order mark
    lines[first] = lines[first].replace(b'"inputs":{', b'"inputs":{"note":"caf\xe9",', 1)  # Latin-1, not UTF-8
    lines[second] = lines[second].replace(b'"inputs":{', b'"inputs":{"deep":' + b"[" * 1100 + b"]" * 1100 + b",", 1)
    lines[third] = BOM + lines[third]  # a second file pasted onto the first
    source = _write(tmp_path / "runs.jsonl", lines, head=BOM)
    assert _run(tmp_path, source, "--json") == 0
    document = json.loads(capsys.readouterr().out)
    skipped = document["skipped"]
    assert skipped["not valid UTF-8"]["examples"] == [f"line {first + 1}"]
    assert skipped["nested deeper than 1024 levels"]["examples"] == [f"line {second + 1}"]
    assert skipped["not valid JSON (a UTF-8 byte order mark starts the line)"]["examples"] == [f"line {third + 1}"]
    assert sum(w["traces"] for w in document["windows"]) == len(roots) - 3  # the BOM'd first line is read
    assert len(_logged_once_each(tmp_path / "out")) == sum(w["failing_traces"] for w in document["windows"])


def test_the_text_summary_says_how_many_records_were_skipped_and_why(tmp_path, capsys):
    lines = _lines(tmp_path)
    lines[2:2] = [b"{not json", b"[1, 2]"]
    assert _run(tmp_path, _write(tmp_path / "runs.jsonl", lines)) == 0
    out = capsys.readouterr().out
    assert "skipped 2 records of the source: 1 not valid JSON (e.g. line 3); 1 not a JSON object (e.g. line 4)" in out


def test_a_file_of_child_spans_only_says_it_skipped_them_all_and_why(tmp_path, capsys):
    lines = _lines(tmp_path)
    children = [line for i, line in enumerate(lines) if i not in _roots(lines)]
    assert _run(tmp_path, _write(tmp_path / "runs.jsonl", children)) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("tracetriage: nothing to triage in ")
    assert f"skipped {len(children)} records of the source: {len(children)} span whose trace root is not in " \
           f"the source" in err


def test_a_parquet_file_of_another_schema_says_what_its_records_lack(tmp_path, capsys):
    source = tmp_path / "runs.parquet"
    pq.write_table(pa.table({"trace": ["a", "b", "c"], "score": [0.1, 0.2, 0.3]}), source)
    assert _run(tmp_path, source) == 1
    assert "skipped 3 records of the source: 3 missing id" in capsys.readouterr().err


def test_a_start_time_of_another_type_is_named_and_an_end_before_the_start_is_skipped(tmp_path):
    lines = _lines(tmp_path)
    a, b, c = (orjson.loads(line) for line in lines[:3])
    a["start_time"] = 1762074856
    b["end_time"] = "2000-01-01T00:00:00Z"
    c["start_time"] = c["end_time"] = "9999-12-31T23:59:00Z"  # no window can end after it
    lines[:3] = [orjson.dumps(a), orjson.dumps(b), orjson.dumps(c)]
    spans, skipped, _ = load_spans(_write(tmp_path / "runs.jsonl", lines))
    assert skipped.as_dict() == {
        "start_time is not an ISO time string (it is a number)": {"count": 1, "examples": ["line 1"]},
        "end_time before start_time": {"count": 1, "examples": ["line 2"]},
        "start_time after 9996-12-28": {"count": 1, "examples": ["line 3"]},
    }
    assert spans.num_rows == len(lines) - 3
    assert pa.compute.min(spans.column("latency_s")).as_py() >= 0


@pytest.mark.parametrize(("change", "message"), [
    ({"evaluators": [{"key": "q", "ref": "builtin:error_free", "threshold": "0.5"}]}, "valid number"),
    ({"actions": [{"when": {"evaluator": "no_error", "below": 0.2, "above": 0.8}, "do": "log"}]},
     "matches no score (none is below 0.2 and above 0.8 at once)"),
    ({"actions": [{"when": {"evaluator": "no_error", "below": "0.2"}, "do": "log"}]}, "valid number"),
    ({"name": ".."}, "not only dots"),
    ({"name": "."}, "not only dots"),
    ({"window": {"size": "100000000d"}}, "longer than 366d"),
    ({"window": {"lag": "999999999999d"}}, "is too long"),
    ({"actions": [{"when": {"failing": True}, "do": "slack", "credentials": "bot", "channel": "#x",
                   "api_url": "http://slack.example.com/api/"}]}, "must use https"),
])
def test_a_config_that_cannot_mean_what_it_says_is_refused_with_exit_2_and_nothing_written(
        tmp_path, capsys, change, message):
    config = tmp_path / "loop.yaml"
    config.write_text(yaml.safe_dump(change))
    with pytest.raises(ConfigError, match="invalid config"):
        load_config(config)
    assert main(["run", "--config", str(config), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_the_slack_api_url_follows_the_webhook_rule():
    base = {"when": When(failing=True), "do": "slack", "credentials": "bot", "channel": "#x"}
    for allowed in ("https://slack.example.com/api/", "http://127.0.0.1:8123/api/", "http://localhost/api/"):
        assert ActionConfig(**base, api_url=allowed).api_url == allowed
    for refused in ("http://10.0.0.8/api/", "ftp://slack.com/api/", "slack.com/api"):
        with pytest.raises(ValueError, match="must use https"):
            ActionConfig(**base, api_url=refused)


@pytest.mark.parametrize("what", ["a directory", "a csv file", "a config directory", "a file as --out"])
def test_an_argument_that_cannot_work_is_exit_2_with_one_line_and_nothing_written(tmp_path, capsys, what):
    source, config, out = tmp_path / "runs.jsonl", None, tmp_path / "out"
    _write(source, _lines(tmp_path, 2))
    if what == "a directory":
        source = tmp_path / "exports"
        source.mkdir()
    elif what == "a csv file":
        source = tmp_path / "runs.csv"
        source.write_text("id,name\n1,x\n")
    elif what == "a config directory":
        config = tmp_path / "configs"
        config.mkdir()
    else:
        out.write_text("not a directory")
    argv = ["run", "--source", str(source), "--out", str(out)] + (["--config", str(config)] if config else [])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tracetriage: ")
    assert {"a directory": "is a directory", "a csv file": "must end in .jsonl or .parquet",
            "a config directory": "is a directory", "a file as --out": "is a file"}[what] in err[0]
    assert out.is_file() if what == "a file as --out" else not out.exists()


def test_a_read_only_out_is_exit_2_with_one_line(tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(out)],
                      capture_output=True).returncode:
        pytest.skip("no tmpfs can be mounted here (needs root)")
    try:
        source = _write(tmp_path / "runs.jsonl", _lines(tmp_path, 2))
        assert main(["run", "--source", str(source), "--out", str(out / "triage")]) == 2
        assert capsys.readouterr().err.strip() == \
               f"tracetriage: --out {out / 'triage'} is not writable: Read-only file system"
    finally:
        subprocess.run(["umount", str(out)], check=True)


def test_trace_text_in_the_markdown_summary_shows_as_text_never_as_html_links_or_mentions(tmp_path, capsys):
    from markdown_it import MarkdownIt

    from tasks.summary import summary_markdown

    hostile = "<img src=x onerror=alert(1)>[click](https://evil.example)<!channel>*```"
    lines = [line.replace(b'"name":"lookup_order"', b'"name":' + orjson.dumps(hostile)) for line in _lines(tmp_path)]
    assert _run(tmp_path, _write(tmp_path / "runs.jsonl", lines), "--json") == 0
    (window,) = json.loads(capsys.readouterr().out)["windows"]
    assert any(cause["span_name"] == hostile for cause in window["root_causes"])
    html = MarkdownIt("commonmark").render(summary_markdown(window))
    assert "<img" not in html and "<a " not in html and "<!channel>" not in html and "<em>" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;[click](https://evil.example)&lt;!channel&gt;*```" in html
