"""LangSmith run records (v1 or v2 wire form, JSONL or Parquet) normalised into one Arrow table of spans.

v1 records carry `parent_run_id`, `session_id`, lowercase `run_type`/`status` and
`extra.metadata`; v2 records (`POST /v2/runs/query`) carry `parent_run_ids`,
`project_id`, UPPERCASE enums and a top-level `metadata`. Both become the `SPANS`
schema. When parent or trace ids are missing they are read off `dotted_order`
(`<ts><root id>.<ts><child id>...`). A malformed record is skipped with a reason,
never fatal.

Spans do not copy their inputs and outputs: each keeps the byte offset and length
of its line in the JSONL file (`RecordFile`), and an evaluator's record is parsed
only when that span is scored. A Parquet source is first written out as JSONL.

A well-formed JSONL file is read by Arrow's multi-threaded JSON reader with only
the scalar fields, and checked column by column; a file with any line Arrow cannot
read (not JSON, or a field of an unexpected type) goes through the record-by-record
path, which says which line was wrong and why. So does a file with a line that Arrow
reads but orjson would refuse when the span is scored (invalid UTF-8 in a field
Arrow skips, a byte order mark starting a line, nesting deeper than orjson's 1,024
levels): such a record is skipped and named by its line, never left to fail the
window at evaluation. A byte order mark at the start of the file is accepted.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
import pyarrow.parquet as pq

from tasks.config import MAX_WINDOW, ConfigError
from tasks.schemas import SPANS

RUN_TYPES = ["tool", "chain", "llm", "retriever", "embedding", "prompt", "parser"]
STATUSES = ["success", "error", "pending"]
_UUID_LEN = 36
_STAMP_LEN = 22  # 20261102T090001929828Z
_SEGMENT = _STAMP_LEN + _UUID_LEN
_TS = pa.timestamp("us", tz="UTC")
RECORDS_KEY = b"tracetriage.records"  # Parquet metadata: the JSONL file the spans' record offsets point into
BOM = b"\xef\xbb\xbf"
MAX_DEPTH = 1024  # orjson's nesting limit: a deeper record cannot be parsed when its span is scored
# The latest start a window can hold: its end, plus the lag, must still be a datetime.
LATEST_START = datetime.max.replace(tzinfo=UTC) - 3 * MAX_WINDOW
_TIMES = {"start_time", "end_time"}

# The scalar fields of a run record, in both wire forms; everything else stays in the file.
_SCALARS = pa.schema(
    [
        ("id", pa.string()), ("name", pa.string()), ("run_type", pa.string()), ("trace_id", pa.string()),
        ("parent_run_id", pa.string()), ("dotted_order", pa.string()), ("session_id", pa.string()),
        ("project_id", pa.string()), ("start_time", pa.string()), ("end_time", pa.string()),
        ("status", pa.string()), ("error", pa.string()), ("total_tokens", pa.int64()),
        ("latency_seconds", pa.float64()), ("app_path", pa.string()),
    ]
)


@dataclass
class Skipped:
    """Records that were not usable, counted by reason, with the first few places they occurred."""

    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, where: str, count: int = 1) -> None:
        self.counts[reason] += count
        examples = self.examples.setdefault(reason, [])
        if len(examples) < 3:
            examples.append(where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, Any]:
        return {reason: {"count": n, "examples": self.examples.get(reason, [])}
                for reason, n in self.counts.most_common()}


class RecordFile:
    """Random access to the run records of a JSONL file by (offset, length)."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._open()

    def _open(self) -> None:
        self._handle = open(self.path, "rb")  # noqa: SIM115 - closed by close() / __del__
        size = os.fstat(self._handle.fileno()).st_size
        self._map = mmap.mmap(self._handle.fileno(), 0, access=mmap.ACCESS_READ) if size else b""

    def record(self, offset: int, length: int) -> dict[str, Any]:
        return orjson.loads(self.raw(offset, length))

    def raw(self, offset: int, length: int) -> bytes:
        """The record's bytes as written (what the judge cache digests). A closed file opens again: a run read
        after its batch (a child passed over until then) reads its record then."""
        if self._handle.closed:
            self._open()
        return self._map[offset:offset + length]

    def close(self) -> None:
        if isinstance(self._map, mmap.mmap):
            self._map.close()
        self._handle.close()

    def __enter__(self) -> RecordFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_metadata(record: dict[str, Any]) -> Any:
    """A record's metadata: top-level in v2, under `extra` in v1."""
    metadata = record.get("metadata")
    if metadata is None:
        extra = record.get("extra")
        if isinstance(extra, str):
            extra = orjson.loads(extra)
        metadata = extra.get("metadata") if isinstance(extra, dict) else None
    return metadata


# --- the columnar path ---------------------------------------------------------------------------

CHUNK = 1 << 25  # bytes of the source read and parsed at a time


def _chunks(path: Path, size: int = CHUNK) -> Any:
    """(byte offset, bytearray) of consecutive pieces of the file, each ending at a newline (or the file's end).

    Read, not memory-mapped: the pages of a mapped file count in the process's RSS once touched, and a 615 MB
    source would add its whole size to the peak. Read into the piece itself, after the last piece's unfinished
    line: a piece is never copied whole (two copies of each were a fifth of a 30,000-trace file's parse)."""
    with open(path, "rb", buffering=0) as handle:
        offset, carry = 0, b""
        while True:
            piece = bytearray(len(carry) + size)
            piece[:len(carry)] = carry
            with memoryview(piece) as view:
                got = handle.readinto(view[len(carry):])
            if not got:
                break
            end = len(carry) + got
            cut = piece.rfind(b"\n", 0, end) + 1
            carry = bytes(piece[cut:end])  # the unfinished line (all of it when the piece has no line end)
            if cut:
                del piece[cut:]
                yield offset, piece
                offset += cut
        if carry:
            yield offset, bytearray(carry)


def _line_spans(piece: bytes, offset: int, first_line: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Byte offset, length and 1-based line number of every non-empty line of a piece; the piece's line count."""
    newlines, find, at = [], piece.find, piece.find(b"\n")
    while at >= 0:  # memchr, line by line: 3x faster than numpy's comparison of every byte
        newlines.append(at)
        at = find(b"\n", at + 1)
    newlines = np.array(newlines, dtype=np.int64)
    ends = newlines if piece.endswith(b"\n") else np.r_[newlines, len(piece)]
    begin = np.r_[0, ends[:-1] + 1].astype(np.int64) if len(ends) else np.zeros(0, np.int64)
    length = ends.astype(np.int64) - begin
    keep = length > 0
    return begin[keep] + offset, length[keep], np.flatnonzero(keep) + first_line, len(ends)


def _decodable(piece: bytes, offsets: np.ndarray, lengths: np.ndarray) -> bool:
    """Whether orjson can parse every line of a piece that Arrow read (offsets into the piece): valid UTF-8
    throughout, no byte order mark starting a line, no nesting past MAX_DEPTH. Checked in bulk; a line long enough
    to hold more opening brackets than MAX_DEPTH has them counted, and only one that has is parsed here."""
    if not len(offsets):
        return True
    data = np.frombuffer(piece, dtype=np.uint8)
    ends = offsets + lengths
    lines = pa.Array.from_buffers(pa.large_string(), len(offsets),
                                  [None, pa.py_buffer(np.r_[offsets, ends[-1]]), pa.py_buffer(piece)])
    heads = np.stack([data[np.minimum(offsets + i, len(data) - 1)] for i in range(len(BOM))], axis=1)
    if (heads == np.frombuffer(BOM, np.uint8)).all(axis=1).any():
        return False
    long = np.flatnonzero(lengths > 2 * MAX_DEPTH)  # a depth over MAX_DEPTH takes that many brackets, and closers
    opening = np.flatnonzero((data | 0x20) == ord("{")) if len(long) else np.zeros(0, np.int64)  # `{` and `[`
    brackets = np.searchsorted(opening, ends[long]) - np.searchsorted(opening, offsets[long])
    try:
        lines.validate(full=True)  # UTF-8, by Arrow's vectorised check
        for i in long[brackets > MAX_DEPTH]:
            orjson.loads(piece[offsets[i]:ends[i]])
    except (pa.ArrowInvalid, orjson.JSONDecodeError):
        return False
    return True


def _scalars_columnar(path: Path) -> pa.Table | None:
    """The scalar fields of every line, by Arrow's JSON reader, a piece of the file at a time (so memory holds
    one piece's parse, not the whole file's); None when it cannot read every line, or orjson could not parse one
    of them when its span is scored (the record-by-record path then names those lines)."""
    tables, first_line = [], 1
    options = pj.ParseOptions(explicit_schema=_SCALARS, unexpected_field_behavior="ignore")
    for offset, piece in _chunks(path):
        if offset == 0 and piece.startswith(BOM):  # a byte order mark starting the file is accepted
            piece, offset = piece[len(BOM):], len(BOM)
        try:
            rows = pj.read_json(pa.BufferReader(piece), read_options=pj.ReadOptions(block_size=1 << 24),
                                parse_options=options)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            return None
        offsets, lengths, lines, count = _line_spans(piece, offset, first_line)
        first_line += count
        if len(offsets) != rows.num_rows or not _decodable(piece, offsets - offset, lengths):
            return None  # whitespace-only or undecodable lines: the record-by-record path numbers them exactly
        tables.append(rows.append_column("record_offset", pa.array(offsets)).append_column(
            "record_length", pa.array(lengths)).append_column("line", pa.array(lines)))
    if not tables:
        return _SCALARS.empty_table().append_column("record_offset", pa.array([], pa.int64())).append_column(
            "record_length", pa.array([], pa.int64())).append_column("line", pa.array([], pa.int64()))
    return pa.concat_tables(tables)


def _scalar_row(record: Any) -> dict[str, Any] | str:
    """One record's scalar fields, typed as `_SCALARS`, or why the record is unusable."""
    if not isinstance(record, dict):
        return "not a JSON object"
    row: dict[str, Any] = {}
    for field_ in _SCALARS:
        value = record.get(field_.name)
        if value is None:
            row[field_.name] = None
        elif field_.type == pa.string():
            if isinstance(value, datetime):
                value = (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
            if not isinstance(value, str) and field_.name in _TIMES:
                return f"{field_.name} is not an ISO time string (it is {_JSON_KIND.get(type(value), 'a number')})"
            row[field_.name] = value if isinstance(value, str) else str(value) if field_.name in _TEXTUAL else None
        elif isinstance(value, bool) or not isinstance(value, int | float):
            return f"malformed field ({field_.name})"
        else:
            row[field_.name] = int(value) if field_.type == pa.int64() else float(value)
    return row


_TEXTUAL = {"name", "run_type", "status", "error"}
_JSON_KIND = {bool: "true or false", list: "a list", dict: "an object"}


def _undecodable(error: orjson.JSONDecodeError) -> str:
    """Why orjson refused a line, as a skip reason (its message's position is inside the record, not the file)."""
    message = str(error)
    if "byte order mark" in message:
        return "not valid JSON (a UTF-8 byte order mark starts the line)"
    if "UTF-8" in message:
        return "not valid UTF-8"
    if "depth" in message:
        return f"nested deeper than {MAX_DEPTH} levels"
    return "not valid JSON"


def _scalars_by_record(path: Path, skipped: Skipped) -> pa.Table:
    """The scalar fields line by line, skipping (with the line number) what is not a JSON object."""
    rows, offsets, lengths, lines = [], [], [], []
    with open(path, "rb") as handle:
        offset = 0
        for number, line in enumerate(handle, start=1):
            begin, offset = offset, offset + len(line)
            if number == 1 and line.startswith(BOM):
                begin, line = len(BOM), line[len(BOM):]
            if not line.strip():
                continue
            try:
                row = _scalar_row(orjson.loads(line))
            except orjson.JSONDecodeError as exc:
                row = _undecodable(exc)
            if isinstance(row, str):
                skipped.add(row, f"line {number}")
                continue
            rows.append(row)
            offsets.append(begin)
            lengths.append(len(line.rstrip(b"\r\n")))
            lines.append(number)
    table = pa.Table.from_pylist(rows, schema=_SCALARS)
    return table.append_column("record_offset", pa.array(offsets, pa.int64())).append_column(
        "record_length", pa.array(lengths, pa.int64())).append_column("line", pa.array(lines, pa.int64()))


def _reasons(rows: pa.Table) -> pa.Array:
    """The first reason each row is unusable, null where it is fine."""
    run_id, dotted = rows.column("id"), rows.column("dotted_order")

    def blank(column: Any) -> Any:
        return pc.or_kleene(pc.is_null(column), pc.equal(column, ""))

    segments_fit = (pc.fill_null(pc.utf8_length(dotted), 0).to_numpy() + 1) % (_SEGMENT + 1) == 0
    dotted_bad = pc.or_(pc.fill_null(pc.not_equal(pc.utf8_slice_codeunits(dotted, -_UUID_LEN), run_id), True),
                        pa.array(~segments_fit))
    checks = [
        ("missing id", blank(run_id)),
        ("missing name", blank(rows.column("name"))),
        ("missing dotted_order", blank(dotted)),
        ("dotted_order does not end with the run id", dotted_bad),
        ("unknown run_type", pc.invert(pc.is_in(rows.column("run_type"), pa.array(RUN_TYPES)))),
        ("missing start_time", pc.is_null(rows.column("start_time"))),
        ("unknown status", pc.invert(pc.is_in(rows.column("status"), pa.array(STATUSES)))),
    ]
    reason = pa.nulls(rows.num_rows, pa.string())
    for label, failed in reversed(checks):
        reason = pc.if_else(pc.fill_null(failed, True), label, reason)
    return reason


def _with_zone(stamps: Any) -> Any:
    """ISO timestamps without a zone are UTC: give them a 'Z' so Arrow casts them."""
    zoned = pc.match_substring_regex(stamps, r"(Z|[+-]\d\d:?\d\d)$")
    return pc.if_else(pc.fill_null(zoned, True), stamps, pc.binary_join_element_wise(stamps, "Z", ""))


def _drop(rows: pa.Table, bad: np.ndarray, reasons: list[str], skipped: Skipped) -> pa.Table:
    for reason, line in zip(reasons, rows.column("line").filter(pa.array(bad)).to_pylist(), strict=True):
        skipped.add(reason, f"line {line}")
    return rows.filter(pa.array(~bad))


def _timestamps(rows: pa.Table, skipped: Skipped) -> tuple[pa.Table, Any, Any]:
    start, end = _with_zone(rows.column("start_time")), _with_zone(rows.column("end_time"))
    try:
        return rows, pc.cast(start, _TS), pc.cast(end, _TS)
    except pa.ArrowInvalid:
        bad = ~np.array([a and b for a, b in zip(_valid_stamps(start.to_pylist()), _valid_stamps(end.to_pylist()),
                                                  strict=True)], dtype=bool)
        rows = _drop(rows, bad, ["invalid start_time or end_time"] * int(bad.sum()), skipped)
        return _timestamps(rows, skipped)


def _plausible_times(rows: pa.Table, start: Any, end: Any, skipped: Skipped) -> tuple[pa.Table, Any, Any]:
    """Rows whose end is not before their start (a negative latency would pass any latency check), and whose start
    leaves room for a window after it."""
    checks = [("end_time before start_time", pc.fill_null(pc.less(end, start), False)),
              (f"start_time after {LATEST_START:%Y-%m-%d}", pc.fill_null(pc.greater(start, LATEST_START), False))]
    bad = np.zeros(rows.num_rows, dtype=bool)
    reasons = np.full(rows.num_rows, None, dtype=object)
    for label, failed in reversed(checks):
        failed = failed.to_numpy(zero_copy_only=False)
        reasons[failed] = label
        bad |= failed
    if not bad.any():
        return rows, start, end
    keep = pa.array(~bad)
    return _drop(rows, bad, list(reasons[bad]), skipped), start.filter(keep), end.filter(keep)


def _valid_stamps(texts: list[str | None]) -> list[bool]:
    valid = []
    for text in texts:
        try:
            valid.append(text is None or bool(pc.cast(pa.array([text]), _TS)))
        except (pa.ArrowInvalid, ValueError):
            valid.append(False)
    return valid


def _spans(rows: pa.Table, path: Path, skipped: Skipped) -> pa.Table:
    """Scalar rows of either wire form, checked and normalised into SPANS."""
    derived_status = pc.if_else(pc.fill_null(pc.not_equal(rows.column("error"), ""), False), "error", "success")
    rows = rows.set_column(rows.schema.get_field_index("run_type"), "run_type", pc.utf8_lower(rows.column("run_type")))
    rows = rows.set_column(rows.schema.get_field_index("status"), "status",
                           pc.coalesce(pc.utf8_lower(rows.column("status")), derived_status))
    reasons = _reasons(rows)
    if reasons.null_count != len(reasons):
        bad = pc.is_valid(reasons).to_numpy(zero_copy_only=False)
        rows = _drop(rows, bad, reasons.drop_null().to_pylist(), skipped)
    rows, start_time, end_time = _timestamps(rows, skipped)
    rows, start_time, end_time = _plausible_times(rows, start_time, end_time, skipped)
    dotted = rows.column("dotted_order")
    lineage_parent = pc.if_else(
        pc.greater(pc.utf8_length(dotted), _SEGMENT),
        pc.utf8_slice_codeunits(dotted, -(_UUID_LEN + _SEGMENT + 1), -(_SEGMENT + 1)),
        pa.scalar(None, pa.string()),
    )
    parent = pc.coalesce(rows.column("parent_run_id"), lineage_parent)
    derived_latency = pc.divide(pc.cast(pc.subtract(end_time, start_time), pa.int64()), 1e6)
    columns = {
        "id": rows.column("id"),
        "trace_id": pc.coalesce(rows.column("trace_id"), pc.utf8_slice_codeunits(dotted, _STAMP_LEN, _SEGMENT)),
        "parent_run_id": parent,
        "name": rows.column("name"),
        "run_type": rows.column("run_type"),
        "status": rows.column("status"),
        "error": rows.column("error"),
        "start_time": start_time,
        "end_time": end_time,
        "latency_s": pc.coalesce(derived_latency, rows.column("latency_seconds")),
        "dotted_order": dotted,
        "session_id": pc.coalesce(rows.column("session_id"), rows.column("project_id")),
        "is_root": pc.is_null(parent),
        "total_tokens": pc.fill_null(rows.column("total_tokens"), 0),
        "app_path": rows.column("app_path"),
        "record_offset": rows.column("record_offset"),
        "record_length": rows.column("record_length"),
    }
    table = pa.table({f.name: columns[f.name] for f in SPANS}).cast(SPANS)
    return _drop_duplicate_ids(table, skipped)


def _drop_duplicate_ids(table: pa.Table, skipped: Skipped) -> pa.Table:
    ids = table.column("id")
    if pc.count_distinct(ids).as_py() == len(ids):
        return table
    frame = table.select(["id"]).to_pandas()
    keep = ~frame["id"].duplicated(keep="last").to_numpy()
    for run_id in frame["id"][~keep]:
        skipped.add("duplicate run id (kept the last record)", f"id {run_id}")
    return table.filter(pa.array(keep))


def parquet_as_jsonl(path: Path, out_path: Path) -> Path:
    """A Parquet export rewritten as JSONL (nested fields may be structs or JSON text), for offset access."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f"{out_path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=20_000):
            for record in batch.to_pylist():
                for key in ("inputs", "outputs", "extra", "metadata", "events"):
                    if isinstance(record.get(key), str):
                        try:
                            record[key] = orjson.loads(record[key])
                        except orjson.JSONDecodeError:
                            pass
                handle.write(orjson.dumps(record, default=str, option=orjson.OPT_NON_STR_KEYS) + b"\n")
    os.replace(tmp, out_path)
    return out_path


RECORD_SUFFIXES = (".jsonl", ".json", ".ndjson", ".parquet")


class RecordsFileError(ConfigError):
    """A run-records file that cannot be a source: a directory, or not JSONL or Parquet."""


class MissingRecordsFileError(RecordsFileError, FileNotFoundError):
    """A run-records file that does not exist."""


def check_records_file(path: str | Path) -> Path:
    """A run-records file that can be read: raises a RecordsFileError (naming the fix) otherwise."""
    path = Path(path).expanduser()
    if not path.exists():
        raise MissingRecordsFileError(f"run records file {path} does not exist; check source.path")
    if path.is_dir():
        raise RecordsFileError(f"run records file {path} is a directory; give one .jsonl or .parquet file")
    if path.suffix not in RECORD_SUFFIXES:
        raise RecordsFileError(f"run records file {path} must end in .jsonl or .parquet (export the runs as JSONL)")
    return path


def load_spans(path: str | Path, work_dir: str | Path | None = None) -> tuple[pa.Table, Skipped, Path]:
    """All spans of a JSONL or Parquet file of LangSmith run records, what was skipped, and the JSONL file
    that `record_offset`/`record_length` point into (the source itself, or a JSONL copy of a Parquet one;
    the spans' schema metadata names it too, under RECORDS_KEY)."""
    path = check_records_file(path)
    if path.suffix == ".parquet":
        directory = Path(work_dir) if work_dir else path.parent
        stat = path.stat()
        path = parquet_as_jsonl(path, directory / f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}.jsonl")
    skipped = Skipped()
    rows = _scalars_columnar(path)
    if rows is None:
        rows = _scalars_by_record(path, skipped)
    spans = _spans(rows, path, skipped).replace_schema_metadata({RECORDS_KEY: str(path.resolve()).encode()})
    return spans, skipped, path


def spans_from_records(
    records: list[dict[str, Any]], path: str | Path | None = None
) -> tuple[pa.Table, Skipped, Path]:
    """Spans of in-memory run records, written as JSONL first to `path` (default: a new temporary file)."""
    if path is None:
        handle, name = tempfile.mkstemp(prefix="tracetriage-", suffix=".jsonl")
        os.close(handle)
        path = name
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        for record in records:
            handle.write(orjson.dumps(record, default=str) + b"\n")
    return load_spans(path)
