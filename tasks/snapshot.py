"""Stage 6, snapshot: each window's tables as Parquet, one Hive partition per table and window.

Layout: `<root>/<table>/window_start=<ISO>/part-0.parquet`. A partition is one file,
written beside its final name and renamed over it, so a crash leaves the old
partition or the new one, never half of one; a rerun replaces it whole.
"""

from __future__ import annotations

import os
import uuid
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from tasks.schemas import SNAPSHOT_TABLES

PART = "part-0.parquet"


def partition_name(window_start: datetime) -> str:
    return "window_start=" + window_start.strftime("%Y-%m-%dT%H:%M:%SZ")


def write_partition(root: str | Path, table_name: str, window_start: datetime, table: pa.Table) -> Path:
    """Replace one table's partition for a window atomically; returns the partition file."""
    schema = SNAPSHOT_TABLES[table_name]
    if table.schema != schema:
        table = table.select(schema.names).cast(schema)
    directory = Path(root) / table_name / partition_name(window_start)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / PART
    tmp = directory / f".{PART}.{uuid.uuid4().hex}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, final)
    return final


def write_snapshot(root: str | Path, window_start: datetime, tables: dict[str, pa.Table]) -> str:
    """Every table of a window; returns the snapshot root as a URI."""
    unknown = set(tables) - set(SNAPSHOT_TABLES)
    if unknown:
        raise ValueError(f"no snapshot schema for tables {sorted(unknown)}")
    for name, table in tables.items():
        write_partition(root, name, window_start, table)
    return Path(root).resolve().as_uri()


def read_table(root: str | Path, table_name: str) -> pa.Table:
    """All windows of one snapshot table; each file holds its own `window_start` column."""
    dataset = ds.dataset(Path(root) / table_name, format="parquet", schema=SNAPSHOT_TABLES[table_name])
    return dataset.to_table().sort_by("window_start")


@task(name="snapshot", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=2))
def snapshot_task(root: str, window_start: datetime, tables: dict[str, pa.Table]) -> str:
    return write_snapshot(root, window_start, tables)
