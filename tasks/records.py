"""LangSmith run records (v1 or v2 wire form, JSONL or Parquet) normalised into one Arrow table of spans.

v1 records carry `parent_run_id`, `session_id`, lowercase `run_type`/`status` and
`extra.metadata`; v2 records (`POST /v2/runs/query`) carry `parent_run_ids`,
`project_id`, UPPERCASE enums and a top-level `metadata`. Both become the `SPANS`
schema. When parent or trace ids are missing they are read off `dotted_order`
(`<ts><root id>.<ts><child id>...`). A malformed record is skipped with a reason,
never fatal.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.schemas import SPANS

RUN_TYPES = {"tool", "chain", "llm", "retriever", "embedding", "prompt", "parser"}
STATUSES = {"success", "error", "pending"}
_UUID_LEN = 36
_STAMP_LEN = 22  # 20261102T090001929828Z


@dataclass
class Skipped:
    """Records that were not usable, counted by reason, with the first few places they occurred."""

    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < 3:
            examples.append(where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, Any]:
        return {reason: {"count": n, "examples": self.examples.get(reason, [])}
                for reason, n in self.counts.most_common()}


class _Columns:
    """Column lists filled record by record (the hot loop of loading)."""

    names = [f.name for f in SPANS if f.name not in ("start_time", "end_time", "latency_s", "is_root")]

    def __init__(self) -> None:
        self.data: dict[str, list[Any]] = {name: [] for name in self.names}
        self.start_text: list[str] = []
        self.end_text: list[str | None] = []
        self.latency: list[float | None] = []
        self.where: list[str] = []

    def table(self, skipped: Skipped) -> pa.Table:
        columns = {name: pa.array(values, SPANS.field(name).type) for name, values in self.data.items()}
        try:
            start, end = _timestamps(self.start_text), _timestamps(self.end_text)
            keep = None
        except pa.ArrowInvalid:
            keep = [a and b for a, b in zip(_valid_stamps(self.start_text), _valid_stamps(self.end_text), strict=False)]
            for where, ok in zip(self.where, keep, strict=False):
                if not ok:
                    skipped.add("invalid start_time or end_time", where)
            mask = pa.array(keep)
            columns = {name: column.filter(mask) for name, column in columns.items()}
            start = _timestamps([t for t, ok in zip(self.start_text, keep, strict=False) if ok])
            end = _timestamps([t for t, ok in zip(self.end_text, keep, strict=False) if ok])
        explicit = pa.array(self.latency, pa.float64())
        if keep is not None:
            explicit = explicit.filter(pa.array(keep))
        derived = pc.divide(pc.cast(pc.subtract(end, start), pa.int64()), 1e6)
        columns["start_time"] = start
        columns["end_time"] = end
        columns["latency_s"] = pc.coalesce(derived, explicit)
        columns["is_root"] = pc.is_null(columns["parent_run_id"])
        return pa.table({f.name: columns[f.name] for f in SPANS}, schema=SPANS)


def _timestamps(texts: list[str | None]) -> pa.Array:
    return pc.cast(pa.array(texts, pa.string()), pa.timestamp("us", tz="UTC"))


def _normal_stamp(value: Any) -> str | None:
    """An ISO timestamp as text Arrow can cast to UTC; None if it is plainly not one.

    The common forms ('...Z', '...+00:00', naive UTC) pass through untouched; the
    column cast later checks them all at once.
    """
    if isinstance(value, str):
        if value.endswith("Z") or value.endswith("+00:00"):
            return value
        if len(value) >= 19 and "+" not in value[19:] and "-" not in value[19:]:
            return value + "Z"
        try:
            return datetime.fromisoformat(value).astimezone(UTC).isoformat()
        except ValueError:
            return None
    if isinstance(value, datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=UTC)
        return moment.astimezone(UTC).isoformat()
    return None


def _valid_stamps(texts: list[str | None]) -> list[bool]:
    valid = []
    for text in texts:
        try:
            valid.append(text is None or bool(_timestamps([text])))
        except (pa.ArrowInvalid, ValueError):
            valid.append(False)
    return valid


def _json_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value  # Parquet exports keep nested objects as JSON text already
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


def _ids_from_dotted(dotted: str) -> list[str]:
    return [segment[_STAMP_LEN:] for segment in dotted.split(".")]


def add_record(columns: _Columns, record: Any, where: str, skipped: Skipped, raw: str | None = None) -> None:
    """Normalise one v1 or v2 run record (`raw` is its JSON text, if at hand) into the columns."""
    if not isinstance(record, dict):
        skipped.add("not a JSON object", where)
        return
    run_id, name, dotted = record.get("id"), record.get("name"), record.get("dotted_order")
    if not run_id or not isinstance(run_id, str):
        skipped.add("missing id", where)
        return
    if not name:
        skipped.add("missing name", where)
        return
    if not dotted or not isinstance(dotted, str):
        skipped.add("missing dotted_order", where)
        return
    lineage = _ids_from_dotted(dotted)
    if lineage[-1] != run_id or any(len(i) != _UUID_LEN for i in lineage):
        skipped.add("dotted_order does not end with the run id", where)
        return
    run_type = str(record.get("run_type") or "").lower()
    if run_type not in RUN_TYPES:
        skipped.add("unknown run_type", where)
        return
    start = _normal_stamp(record.get("start_time"))
    if start is None:
        skipped.add("missing or invalid start_time", where)
        return
    end_value = record.get("end_time")
    end = _normal_stamp(end_value)
    if end_value is not None and end is None:
        skipped.add("invalid end_time", where)
        return

    parent = record.get("parent_run_id")
    if parent is None:
        parents = record.get("parent_run_ids")
        parent = parents[-1] if parents else (lineage[-2] if len(lineage) > 1 else None)
    error = record.get("error")
    status = str(record.get("status") or ("error" if error else "success")).lower()
    if status not in STATUSES:
        skipped.add("unknown status", where)
        return
    metadata = record.get("metadata")
    if metadata is None:
        extra = record.get("extra")
        if isinstance(extra, str):
            extra = orjson.loads(extra)
        metadata = extra.get("metadata") if isinstance(extra, dict) else None

    data = columns.data
    data["id"].append(run_id)
    data["trace_id"].append(record.get("trace_id") or lineage[0])
    data["parent_run_id"].append(parent)
    data["name"].append(str(name))
    data["run_type"].append(run_type)
    data["status"].append(status)
    data["error"].append(error)
    data["dotted_order"].append(dotted)
    data["session_id"].append(record.get("session_id") or record.get("project_id"))
    data["total_tokens"].append(record.get("total_tokens") or 0)
    data["metadata"].append(_json_text(metadata))
    data["record"].append(raw if raw is not None else _json_text(record))
    data["app_path"].append(record.get("app_path"))
    columns.start_text.append(start)
    columns.end_text.append(end)
    columns.latency.append(record.get("latency_seconds"))
    columns.where.append(where)


def spans_from_records(
    records: Iterable[tuple[str, Any, str | None]], skipped: Skipped | None = None
) -> pa.Table:
    """(where, record, raw JSON or None) triples as a SPANS table; a later duplicate run id wins."""
    skipped = skipped if skipped is not None else Skipped()
    columns = _Columns()
    for where, record, raw in records:
        try:
            add_record(columns, record, where, skipped, raw)
        except (TypeError, ValueError, AttributeError, orjson.JSONDecodeError) as exc:
            skipped.add(f"malformed field ({type(exc).__name__})", where)
    table = columns.table(skipped)
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


def _jsonl_records(path: Path, skipped: Skipped) -> Iterator[tuple[str, Any, str | None]]:
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield f"line {number}", orjson.loads(line), line.decode().rstrip()
            except orjson.JSONDecodeError:
                skipped.add("not valid JSON", f"line {number}")


def _parquet_records(path: Path) -> Iterator[tuple[str, Any, str | None]]:
    parquet = pq.ParquetFile(path)
    row = 0
    for batch in parquet.iter_batches(batch_size=50_000):
        for record in batch.to_pylist():
            row += 1
            yield f"row {row}", record, None


def load_spans(path: str | Path) -> tuple[pa.Table, Skipped]:
    """All spans of a JSONL or Parquet file of LangSmith run records, and what was skipped."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"run records file {path} does not exist")
    skipped = Skipped()
    if path.suffix == ".parquet":
        records: Iterable[tuple[str, Any, str | None]] = _parquet_records(path)
    elif path.suffix in (".jsonl", ".json", ".ndjson"):
        records = _jsonl_records(path, skipped)
    else:
        raise ValueError(f"run records file {path} must end in .jsonl or .parquet")
    return spans_from_records(records, skipped), skipped
