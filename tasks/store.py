"""The snapshot store: each window's tables as Parquet, one Hive partition per table and window, on a disk, S3 or GCS.

Layout under the store's URL: `<table>/window_start=<ISO>/part-0.parquet`. A
partition is one file, so replacing it is atomic: on a local disk the file is
written beside its final name and renamed over it; on object storage (s3://, gs://
through fsspec) it is one object PUT, which readers see whole or not at all. A
crash leaves the old partition or the new one, never half of one; a rerun replaces
it whole. Readers read only the partitions and columns they ask for, old schema
versions included (see `tasks.schemas`).
"""

from __future__ import annotations

import errno
import os
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from tasks.config import ConfigError
from tasks.contracts import WindowTriage
from tasks.schemas import SCHEMA_VERSION, SNAPSHOT_TABLES, SPANS_SNAPSHOT

PART = "part-0.parquet"
PREFIX = "window_start="
STALE_TMP_SECONDS = 600


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def not_disk_full(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: a full (or read-only) disk stays full for the seconds a retry waits."""
    try:
        state.result()
    except OSError as exc:
        return exc.errno not in DISK_FULL
    except Exception:  # noqa: BLE001 - any other failure is worth the retry
        return True
    return False


def partition_name(window_start: datetime) -> str:
    return PREFIX + window_start.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def partition_start(name: str) -> datetime:
    return datetime.strptime(name.removeprefix(PREFIX), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def is_local_url(url: str) -> bool:
    scheme = urlparse(url).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt")


class SnapshotStore:
    """Snapshot tables under one URL: a local directory, or any fsspec URL (s3://, gs://, memory://).

    >>> store = SnapshotStore("/tmp/tracetriage-doc-snapshots")
    >>> store.url
    'file:///tmp/tracetriage-doc-snapshots'

    Object-store credentials come from `storage_options` (built from a
    `SnapshotStorage` block) or the environment, as fsspec reads them.
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        if is_local_url(url):
            self.root = str(Path(url.removeprefix("file://")).expanduser().resolve())
            self.fs: pafs.FileSystem = pafs.LocalFileSystem()
            self.url = Path(self.root).as_uri()
            self._fsspec = None
        else:
            import fsspec

            try:
                fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
            except ImportError as exc:
                raise ConfigError(f"snapshots.url {url!r} needs an fsspec backend: {exc}") from None
            self.root = root.rstrip("/")
            self.fs = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
            self.url = url.rstrip("/")
            self._fsspec = fs

    @property
    def is_local(self) -> bool:
        return self._fsspec is None

    def _dir(self, table_name: str, window_start: datetime | None = None) -> str:
        path = f"{self.root}/{table_name}"
        return path if window_start is None else f"{path}/{partition_name(window_start)}"

    def write_partition(self, table_name: str, window_start: datetime, table: pa.Table) -> str:
        """Replace one table's partition for a window atomically; returns the partition file's path."""
        schema = SNAPSHOT_TABLES[table_name]
        if table.schema != schema:
            table = table.select(schema.names).cast(schema)
        directory = self._dir(table_name, window_start)
        final = f"{directory}/{PART}"
        if not self.is_local:
            pq.write_table(table, final, filesystem=self.fs)  # one object PUT: atomic on S3 and GCS
            return final
        Path(directory).mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(Path(directory))
        tmp = f"{directory}/.{PART}.{uuid.uuid4().hex}.tmp"  # dot files are invisible to dataset readers
        pq.write_table(table, tmp)
        os.replace(tmp, final)
        return final

    def put_bytes(self, relative: str, data: bytes, *, exclusive: bool = False) -> bool:
        """Write one whole object under the store (a ledger segment): renamed into place after an fsync on a
        disk, one PUT on object storage, so it is durable and never seen half-written.

        With `exclusive`, only if no object has that name (a hard link on a disk; on S3 a PUT with
        `If-None-Match: *`): returns False when one had, so of many writers exactly one wins."""
        path = f"{self.root}/{relative}"
        if not self.is_local:
            if exclusive:
                try:
                    self._fsspec.pipe_file(path, data, mode="create")
                except FileExistsError:
                    return False
                return True
            with self.fs.open_output_stream(path) as out:
                out.write(data)
            return True
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
        except OSError as exc:  # a full disk: no half object left behind, and the error says where
            Path(tmp).unlink(missing_ok=True)
            raise OSError(exc.errno, exc.strerror, path) from exc
        if not exclusive:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True

    def get_bytes(self, relative: str) -> bytes | None:
        """One object's bytes, or None if it is not there."""
        try:
            with self.fs.open_input_stream(f"{self.root}/{relative}") as stream:
                return stream.read()
        except FileNotFoundError:
            return None

    def delete(self, relatives: list[str]) -> None:
        """Remove objects under the store (one bulk request on object storage)."""
        paths = [f"{self.root}/{relative}" for relative in relatives]
        if self.is_local:
            for path in paths:
                Path(path).unlink(missing_ok=True)
        elif paths:
            self._fsspec.rm(paths)

    def objects(self, relative: str) -> list[tuple[str, bytes]]:
        """Every object directly under a directory of the store (tmp files excluded), by name, with its bytes.

        An object deleted between the listing and its read (ledger segments being compacted into a new one)
        means the listing is stale: it is read again."""
        for _ in range(5):
            found = []
            for name in self.listing(relative):
                if name.endswith(".tmp"):
                    continue
                if (data := self.get_bytes(f"{relative}/{name}")) is None:
                    break
                found.append((name, data))
            else:
                return found
        raise RuntimeError(f"{self.url}/{relative} kept changing while it was read")

    def listing(self, relative: str) -> list[str]:
        """Names directly under a directory of the store."""
        directory = f"{self.root}/{relative}"
        if self.is_local:
            return sorted(p.name for p in Path(directory).iterdir()) if Path(directory).is_dir() else []
        try:
            return sorted(e.rstrip("/").rsplit("/", 1)[-1]
                          for e in self._fsspec.ls(directory, detail=False, refresh=True))
        except FileNotFoundError:
            return []

    def windows(self, table_name: str) -> list[datetime]:
        """Window starts that have a partition of this table, oldest first (one listing call)."""
        return sorted(partition_start(n) for n in self.listing(table_name) if n.startswith(PREFIX))

    def read(
        self, table_name: str, columns: list[str] | None = None, windows: list[datetime] | None = None
    ) -> pa.Table:
        """Some columns of some windows of a table (all of either when None), with the current schema.

        Partitions written with an older schema version read with the columns they lack as nulls.
        """
        schema = SNAPSHOT_TABLES[table_name]
        present = self.windows(table_name)
        if windows is not None:
            wanted = set(windows)
            present = [w for w in present if w in wanted]
        paths = [f"{self._dir(table_name, w)}/{PART}" for w in present]
        dataset = ds.dataset(paths, schema=schema, format="parquet", filesystem=self.fs)
        table = dataset.to_table(columns=columns)
        return table.sort_by("window_start") if "window_start" in table.column_names else table


def _remove_stale_tmp(directory: Path) -> None:
    """Temporary files left by a writer that was killed mid-write (a live writer's are recent)."""
    cutoff = time.time() - STALE_TMP_SECONDS
    for path in directory.glob(f".{PART}.*.tmp"):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
        except FileNotFoundError:
            pass


def spans_snapshot(window_spans_path: str, window_start: datetime) -> pa.Table:
    """The window's spans in the snapshot's shape (the `spans` table, written when `snapshots.spans` is on)."""
    names = [f.name for f in SPANS_SNAPSHOT if f.name not in ("window_start", "schema_version")]
    spans = pq.read_table(window_spans_path, columns=names)
    spans = spans.add_column(0, "window_start", pa.repeat(pa.scalar(window_start, SPANS_SNAPSHOT.field(0).type),
                                                           spans.num_rows))
    return spans.append_column("schema_version", pa.repeat(pa.scalar(SCHEMA_VERSION, pa.int32()), spans.num_rows))


def write_snapshot(store: SnapshotStore, window_start: datetime, tables: dict[str, pa.Table]) -> str:
    """Every table of a window; returns the store's URL."""
    unknown = set(tables) - set(SNAPSHOT_TABLES)
    if unknown:
        raise ValueError(f"no snapshot schema for tables {sorted(unknown)}")
    for name, table in tables.items():
        store.write_partition(name, window_start, table)
    return store.url


def read_table(root: str | SnapshotStore, table_name: str) -> pa.Table:
    """All windows of one snapshot table."""
    store = root if isinstance(root, SnapshotStore) else SnapshotStore(str(root))
    return store.read(table_name)


@task(name="snapshot", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=2),
      retry_condition_fn=not_disk_full)
def snapshot_task(store: SnapshotStore, window_start: datetime, tables: dict[str, pa.Table]) -> str:
    return write_snapshot(store, window_start, tables)


def snapshot_window(*, store: SnapshotStore, triage: WindowTriage, spans: bool, in_flow: bool = False) -> Any:
    """The window's snapshot tables (with `spans`, its spans too), written while dispatch runs: a future, or with
    `in_flow` (a Dask runner: submitting would ship the tables to a worker) a state, written now."""
    tables = triage.tables()
    if spans:
        tables["spans"] = spans_snapshot(triage.scored.window.path, triage.window_start)
    if in_flow:
        return snapshot_task(store, triage.window_start, tables, return_state=True)
    return snapshot_task.submit(store, triage.window_start, tables)
