"""A new Prefect database from the stored schema (flows/prefect_schema.py): the same database Prefect's own
migrations build, and never a half-made or unupgradable one."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest

from flows import prefect_schema


def _schema(database: Path) -> tuple[set, list]:
    """Every table and index with its SQL as SQLite stores it, and the alembic revision. A table's constraints
    are taken in any order: Prefect's migrations themselves write a rebuilt table's foreign keys in an order that
    differs from one run to the next."""
    def constraints_in_any_order(sql: str | None) -> tuple | None:
        if sql is None:
            return None
        lines = sql.splitlines()
        constraint = [line.strip().rstrip(", ") for line in lines if line.strip().startswith("CONSTRAINT")]
        return (tuple(line for line in lines if not line.strip().startswith("CONSTRAINT")), frozenset(constraint))

    with contextlib.closing(sqlite3.connect(database)) as db:
        return ({(kind, name, table, constraints_in_any_order(sql))
                 for kind, name, table, sql in db.execute("SELECT type, name, tbl_name, sql FROM sqlite_master")},
                db.execute("SELECT version_num FROM alembic_version").fetchall())


def test_the_stored_schema_upgraded_by_the_installed_prefect_is_what_its_migrations_build(tmp_path):
    migrated = prefect_schema.upgrade(tmp_path / "migrated")
    created = tmp_path / "created" / "prefect.db"
    assert prefect_schema.create(created)
    prefect_schema.upgrade(created.parent)  # as its server does on start: nothing to do unless Prefect is newer
    tables, revision = _schema(migrated)
    assert len([t for t in tables if t[0] == "table"]) > 30
    assert _schema(created) == (tables, revision)


def test_an_existing_database_is_left_alone(tmp_path):
    database = tmp_path / "prefect.db"
    database.write_bytes(b"a database with runs in it")
    assert not prefect_schema.create(database)
    assert database.read_bytes() == b"a database with runs in it"


def test_a_schema_the_installed_prefect_cannot_upgrade_is_not_used(tmp_path):
    """A stored revision that is not among the installed Prefect's migrations (an older Prefect): no database,
    so the server migrates one from empty."""
    schema = tmp_path / "schema.sql"
    schema.write_text(prefect_schema.SCHEMA.read_text().replace(prefect_schema.revision(), "0123456789ab"))
    assert prefect_schema.revision(schema) == "0123456789ab"
    assert prefect_schema.prefect_knows(prefect_schema.revision())
    assert not prefect_schema.prefect_knows("0123456789ab")
    assert not prefect_schema.create(tmp_path / "prefect.db", schema)
    assert list(tmp_path.iterdir()) == [schema]


def test_a_create_that_fails_midway_leaves_no_database(tmp_path):
    """Prefect must never find a half-made database: it would take it for one to upgrade."""
    schema = tmp_path / "schema.sql"
    text = prefect_schema.SCHEMA.read_text()
    half = text.index('CREATE TABLE "flow_run" (')
    schema.write_text(text[:half] + "CREATE TABLE broken (;\n" + text[half:])
    with pytest.raises(sqlite3.OperationalError):
        prefect_schema.create(tmp_path / "home" / "prefect.db", schema)
    assert list((tmp_path / "home").iterdir()) == []
