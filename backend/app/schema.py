"""Alembic, driven from code: upgrade to head, and check that a database is migrated."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from app.text import error_line

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATE_HINT = "run `async-processor migrate` to create or upgrade it"
# Alembic (with Mako and Pygments, ~8 MB) is imported only to migrate: the daemon and the
# API check the schema by reading alembic_version and the revision files themselves.
_REVISION = re.compile(r"^revision(?:\s*:\s*str)?\s*=\s*[\"']([^\"']+)[\"']", re.M)
_DOWN = re.compile(r"^down_revision\b[^=]*=(.*)$", re.M)  # None, "rev" or a merge's tuple
_QUOTED = re.compile(r"[\"']([^\"']+)[\"']")


class SchemaError(RuntimeError):
    """The database is not at the schema this code needs."""


class BadDatabaseURL(SchemaError):
    """The driver refused the database URL's form (a query parameter it does not take, a
    port out of range): a bad setting, not a database's state."""


#: What a driver raises for a URL it cannot use (asyncpg: TypeError for an unknown
#: keyword such as libpq's sslmode, OverflowError for a port over 65535).
URL_ERRORS = (TypeError, ValueError, OverflowError)


def migrations_dir() -> Path:
    """The migrations folder: the source checkout's, or the copy inside the wheel."""
    package = Path(__file__).resolve().parent
    for candidate in (package.parent.parent / "migrations", package / "_migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise SchemaError(f"no migrations folder found near {package}")


def alembic_config(database_url: str) -> Config:
    """An Alembic config for ``database_url`` that does not touch logging."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.attributes["database_url"] = database_url
    config.attributes["configure_logging"] = False
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Upgrade the database to ``revision`` (blocking; call from sync code or a thread)."""
    from alembic import command

    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str = "base") -> None:
    """Downgrade the database to ``revision`` (blocking)."""
    from alembic import command

    command.downgrade(alembic_config(database_url), revision)


@functools.cache
def head_revision() -> str:
    """The newest revision this code ships, read from the revision files (one linear
    history: the one revision no other names as its ``down_revision``)."""
    revisions, parents = _revisions()
    heads = sorted(revisions - parents)
    if len(heads) != 1:
        raise SchemaError(f"the migrations folder has {len(heads)} heads: {heads}")
    return heads[0]


@functools.cache
def _revisions() -> tuple[frozenset[str], frozenset[str]]:
    """Every revision this code ships, and those named as another's ``down_revision``."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in sorted((migrations_dir() / "versions").glob("*.py")):
        source = path.read_text(encoding="utf-8")
        found = _REVISION.search(source)
        if found is None:
            continue
        revisions.add(found.group(1))
        down = _DOWN.search(source)
        if down is not None:
            parents.update(_QUOTED.findall(down.group(1)))
    return frozenset(revisions), frozenset(parents)


#: What a database migrated by newer code needs: not `migrate`, which cannot go there.
NEWER_HINT = (
    "this code does not know that revision (a newer async-processor migrated the database): "
    "run the newer version, or downgrade the database with the version that migrated it"
)


def _current(connection: Connection) -> str | None:
    if not inspect(connection).has_table("alembic_version"):
        return None
    versions = connection.execute(text("SELECT version_num FROM alembic_version")).scalars()
    return next(iter(versions), None)


async def current_revision(engine: AsyncEngine) -> str | None:
    """The revision the database is at, or None when it was never migrated."""
    async with engine.connect() as connection:
        return await connection.run_sync(_current)


def _file_of(path: Path | None) -> Path | None:
    """The file a SQLite database path names: itself, or a ``file:`` URI's path (None for
    an in-memory one)."""
    if path is None or not path.as_posix().startswith("file:"):
        return path
    parts = urlsplit(path.as_posix())
    if "mode=memory" in parts.query or parts.path in ("", ":memory:"):
        return None
    return Path(unquote(parts.path))


async def check_migrated(engine: AsyncEngine) -> None:
    """Raise SchemaError, saying what to run, unless the database is at head."""
    from app.db import sqlite_path, sqlite_path_as_given

    path = _file_of(sqlite_path(engine.url))
    if path is not None and not path.expanduser().exists():
        # Checked before connecting: SQLite would create an empty file there.
        given = sqlite_path_as_given(path)
        where = str(path) if given is None else given
        if given is not None or not path.expanduser().is_absolute():
            where += (
                f" (relative to the current folder, {Path.cwd()}: is"
                " ASYNC_PROCESSOR_DATABASE_URL set? An absolute path takes four slashes,"
                " sqlite+aiosqlite:////var/lib/…)"
            )
        raise SchemaError(f"no database file at {where}; {MIGRATE_HINT}")
    try:
        current = await current_revision(engine)
    except (SQLAlchemyError, OSError) as exc:  # OSError: asyncpg cannot reach the server
        raise SchemaError(f"cannot read the database ({error_line(exc)})") from exc
    except URL_ERRORS as exc:
        raise BadDatabaseURL(
            f"the database URL cannot be used ({exc.__class__.__name__}: {exc})"
        ) from exc
    head = head_revision()
    if current is None:
        raise SchemaError(f"the database has no async-processor schema; {MIGRATE_HINT}")
    if current not in _revisions()[0]:
        raise SchemaError(f"the database is at revision {current}; {NEWER_HINT}")
    if current != head:
        raise SchemaError(
            f"the database is at revision {current}, this code needs {head}; {MIGRATE_HINT}"
        )
