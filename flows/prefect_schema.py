"""A new Prefect server's database, created from a stored schema instead of by Prefect's 116 migrations.

A Prefect server on a new home migrates an empty SQLite database before it answers: 10.6 s of CPU here, most of it
SQLAlchemy reflecting each table that an `ALTER` in SQLite's batch mode copies. That was most of a new user's
first `tracetriage run`. The migrations' end result is fixed per Prefect release: `prefect_schema.sql` is that
result (`sqlite3`'s dump of a freshly migrated database, its alembic revision included). A new database created
from it takes milliseconds; Prefect's own start-up upgrade then applies only the migrations newer than the stored
revision, so a newer Prefect still gets its whole schema.

The stored schema is used only when the installed Prefect knows its revision (it is one of Prefect's own SQLite
migrations); an older Prefect migrates from empty as before. `tests/test_prefect_schema.py` checks that the stored
schema, upgraded by the installed Prefect, is exactly what the installed Prefect's migrations build from empty.
After upgrading Prefect, `python -m flows.prefect_schema` writes the schema anew from its migrations.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

SCHEMA = Path(__file__).with_name("prefect_schema.sql")
_REVISION = re.compile(r"""INSERT INTO "alembic_version" VALUES\('([0-9a-f]+)'\);""")


def revision(schema: Path = SCHEMA) -> str | None:
    """The alembic revision the stored schema is at."""
    try:
        found = _REVISION.search(schema.read_text())
    except OSError:
        return None
    return found[1] if found else None


def prefect_knows(rev: str) -> bool:
    """Whether the installed Prefect has the SQLite migration `rev` (so it can upgrade a database at `rev`).
    Looks at its migration files' names (`<date>_<revision>_<title>.py`) without importing Prefect."""
    spec = importlib.util.find_spec("prefect")
    if spec is None or not spec.submodule_search_locations:
        return False
    versions = Path(next(iter(spec.submodule_search_locations)), "server", "database", "_migrations", "versions",
                    "sqlite")
    return any(versions.glob(f"*_{rev}_*.py"))


def create(database: Path, schema: Path = SCHEMA) -> bool:
    """Create `database` from the stored schema when it does not exist and the installed Prefect can upgrade
    from the schema's revision; True if created. Written beside it and renamed into place, so a crash leaves
    no half-made database for Prefect to find."""
    rev = revision(schema)
    if database.exists() or rev is None or not prefect_knows(rev):
        return False
    database.parent.mkdir(parents=True, exist_ok=True)
    partial = database.with_name(f".{database.name}.{os.getpid()}.partial")
    try:
        with contextlib.closing(sqlite3.connect(partial)) as db:
            db.executescript(schema.read_text())
        os.replace(partial, database)
    finally:
        partial.unlink(missing_ok=True)
    return True


def dump(database: Path) -> str:
    """A database's schema and rows as SQL (`sqlite3`'s `.dump`)."""
    with contextlib.closing(sqlite3.connect(database)) as db:
        return "\n".join(db.iterdump()) + "\n"


def upgrade(home: Path) -> Path:
    """Have the installed Prefect migrate the database in `home` (its PREFECT_HOME) to its newest revision, from
    empty when there is none, as its server does on start; returns the database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    subprocess.run([sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"],
                   env={**env, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"},
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return home / "prefect.db"


def main() -> None:
    """Write `prefect_schema.sql` from the installed Prefect's migrations."""
    with tempfile.TemporaryDirectory(prefix="tracetriage-schema-") as home:
        header = (f"-- The database Prefect {version('prefect')}'s migrations build from empty, written by\n"
                  "-- `python -m flows.prefect_schema`: do not edit (flows/prefect_schema.py says why).\n")
        SCHEMA.write_text(header + dump(upgrade(Path(home))))
    print(f"wrote {SCHEMA} (alembic revision {revision()})")


if __name__ == "__main__":
    main()
