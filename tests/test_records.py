"""Run records in either LangSmith wire form become the same spans; bad records are counted, not fatal."""

from __future__ import annotations

import orjson
import pyarrow.parquet as pq
import pytest

from tasks.sources.records import RecordFile, load_spans, spans_from_records
from tasks.sources.sample import generate_traces, to_v2_record, write_sample


@pytest.fixture(scope="module")
def sample():
    return generate_traces(50, seed=5)


def _write_jsonl(path, records, extra_lines=()):
    with open(path, "wb") as handle:
        for record in records:
            handle.write(orjson.dumps(record) + b"\n")
        for line in extra_lines:
            handle.write(line + b"\n")
    return path


def test_v1_and_v2_records_normalise_to_the_same_spans(sample, tmp_path):
    v1, _, _ = load_spans(_write_jsonl(tmp_path / "v1.jsonl", sample.records))
    v2, skipped, _ = load_spans(_write_jsonl(tmp_path / "v2.jsonl", [to_v2_record(r) for r in sample.records]))
    assert skipped.total == 0
    columns = [c for c in v1.column_names if not c.startswith("record_")]
    assert v2.select(columns).equals(v1.select(columns))
    assert set(v1.column("run_type").to_pylist()) == {"chain", "llm", "retriever", "tool"}
    assert set(v2.column("status").to_pylist()) == {"success", "error"}


def test_parent_and_trace_ids_are_read_off_dotted_order_when_missing(sample, tmp_path):
    stripped = [{k: v for k, v in r.items() if k not in ("parent_run_id", "trace_id")} for r in sample.records]
    spans, skipped, _ = load_spans(_write_jsonl(tmp_path / "bare.jsonl", stripped))
    full, _, _ = load_spans(_write_jsonl(tmp_path / "full.jsonl", sample.records))
    assert skipped.total == 0
    for column in ("parent_run_id", "trace_id", "is_root"):
        assert spans.column(column).equals(full.column(column))


def test_parquet_with_the_same_columns_loads_like_jsonl(sample, tmp_path):
    write_sample(tmp_path / "runs.parquet", sample)
    write_sample(tmp_path / "runs.jsonl", sample)
    from_parquet, _, _ = load_spans(tmp_path / "runs.parquet")
    from_jsonl, _, _ = load_spans(tmp_path / "runs.jsonl")
    columns = [c for c in from_jsonl.column_names if not c.startswith("record_")]
    assert from_parquet.select(columns).equals(from_jsonl.select(columns))
    assert pq.read_schema(tmp_path / "runs.parquet").names[:3] == ["id", "name", "run_type"]


def test_latency_and_timestamps_come_out_in_utc_seconds(sample):
    spans = spans_from_records(sample.records[:3])[0]
    row = spans.slice(0, 1).to_pylist()[0]
    assert row["start_time"].tzinfo is not None
    assert row["latency_s"] == pytest.approx((row["end_time"] - row["start_time"]).total_seconds())


def test_malformed_records_are_counted_and_skipped_with_a_reason(sample, tmp_path):
    good = sample.records[:6]
    root = dict(good[0])
    bad = [
        {**root, "id": None},
        {**root, "name": ""},
        {**root, "dotted_order": None},
        {**root, "dotted_order": root["dotted_order"][:-4] + "beef"},
        {**root, "run_type": "spaceship"},
        {**root, "start_time": None},
        {**root, "start_time": "yesterday"},
        {**root, "end_time": "2026-13-45T99:00:00Z"},
        {**root, "status": "exploded"},
        ["not", "an", "object"],
    ]
    path = _write_jsonl(tmp_path / "mixed.jsonl", good + bad, extra_lines=[b"{not json", b'{"id": 1'])
    spans, skipped, _ = load_spans(path)

    assert spans.num_rows == 6
    assert skipped.total == len(bad) + 2
    assert skipped.counts == {
        "missing id": 1,
        "missing name": 1,
        "missing dotted_order": 1,
        "dotted_order does not end with the run id": 1,
        "unknown run_type": 1,
        "missing start_time": 1,
        "invalid start_time or end_time": 2,
        "unknown status": 1,
        "not a JSON object": 1,
        "not valid JSON": 2,
    }
    assert skipped.as_dict()["not valid JSON"]["examples"] == ["line 17", "line 18"]


def test_a_run_recorded_twice_keeps_its_last_record(sample, tmp_path):
    first = dict(sample.records[1])
    updated = {**first, "status": "error", "error": "late failure"}
    spans, skipped, _ = load_spans(_write_jsonl(tmp_path / "dup.jsonl", sample.records[:6] + [updated]))
    assert spans.num_rows == 6
    assert skipped.counts == {"duplicate run id (kept the last record)": 1}
    row = next(r for r in spans.to_pylist() if r["id"] == first["id"])
    assert row["error"] == "late failure"


def test_an_unknown_file_kind_or_a_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_spans(tmp_path / "nope.jsonl")
    (tmp_path / "runs.csv").write_text("id\n")
    with pytest.raises(ValueError, match=".jsonl or .parquet"):
        load_spans(tmp_path / "runs.csv")


def test_blank_lines_and_crlf_line_ends_are_read_and_records_stay_addressable(sample, tmp_path):
    path = tmp_path / "crlf.jsonl"
    lines = [orjson.dumps(r) for r in sample.records]
    path.write_bytes(b"\r\n".join(lines[:5]) + b"\r\n\r\n" + b"\n".join(lines[5:]))  # no final newline either
    spans, skipped, records_file = load_spans(path)
    assert skipped.total == 0 and spans.num_rows == len(sample.records)
    with RecordFile(records_file) as records:
        offsets, lengths = spans.column("record_offset").to_pylist(), spans.column("record_length").to_pylist()
        ids = [records.record(o, n)["id"] for o, n in zip(offsets, lengths, strict=True)]
    assert ids == spans.column("id").to_pylist()


def test_spans_whose_trace_root_is_missing_are_skipped_and_counted_in_their_window(sample, tmp_path):
    from datetime import timedelta

    from tasks.sources.windows import ORPHAN, fetch_windows

    root_ids = {r["id"] for r in sample.records if r["parent_run_id"] is None}
    dropped = sorted(root_ids)[0]
    orphans = [r for r in sample.records if r["trace_id"] == dropped and r["id"] != dropped]
    kept = [r for r in sample.records if r["id"] != dropped]
    fetched = fetch_windows(str(_write_jsonl(tmp_path / "orphans.jsonl", kept)), timedelta(hours=1), 100,
                            str(tmp_path / "work"))
    assert fetched.skipped[ORPHAN]["count"] == len(orphans) > 0
    assert sum(w.orphans for w in fetched.windows) == len(orphans)
    assert sum(w.traces for w in fetched.windows) == len(root_ids) - 1


@pytest.mark.parametrize("piece", [97, 4096, 1 << 25])  # shorter than a line; a few lines; the whole file
def test_a_file_read_in_pieces_of_any_size_gives_the_same_spans(sample, tmp_path, monkeypatch, piece):
    """Lines that cross a piece's end, a piece with no line end in it, CRLF, a blank line and a last line
    without a newline: the same spans and record offsets whatever the piece size."""
    from tasks.sources import records

    path = tmp_path / "pieces.jsonl"
    lines = [orjson.dumps(r) for r in sample.records]
    path.write_bytes(b"\r\n".join(lines[:7]) + b"\r\n\n" + b"\n".join(lines[7:]))
    whole, skipped, _ = load_spans(path)
    monkeypatch.setattr(records._chunks, "__defaults__", (piece,))
    pieces, skipped_in_pieces, _ = load_spans(path)
    assert skipped.total == skipped_in_pieces.total == 0
    assert pieces.equals(whole) and whole.num_rows == len(sample.records)
    assert [b for _, b in records._chunks(path)] and b"".join(b for _, b in records._chunks(path)) == path.read_bytes()
