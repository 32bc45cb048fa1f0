"""Alembic, driven from code: upgrade to head, and check that a database is migrated."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

MIGRATE_HINT = "run `async-processor migrate` to create or upgrade it"


class SchemaError(RuntimeError):
    """The database is not at the schema this code needs."""


def migrations_dir() -> Path:
    """The migrations folder: the source checkout's, or the copy inside the wheel."""
    package = Path(__file__).resolve().parent
    for candidate in (package.parent.parent / "migrations", package / "_migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise SchemaError(f"no migrations folder found near {package}")


def alembic_config(database_url: str) -> Config:
    """An Alembic config for ``database_url`` that does not touch logging."""
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.attributes["database_url"] = database_url
    config.attributes["configure_logging"] = False
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Upgrade the database to ``revision`` (blocking; call from sync code or a thread)."""
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str = "base") -> None:
    """Downgrade the database to ``revision`` (blocking)."""
    command.downgrade(alembic_config(database_url), revision)


def head_revision() -> str:
    """The newest revision this code ships."""
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    if head is None:
        raise SchemaError("the migrations folder has no revisions")
    return head


def _current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def current_revision(engine: AsyncEngine) -> str | None:
    """The revision the database is at, or None when it was never migrated."""
    async with engine.connect() as connection:
        return await connection.run_sync(_current)


async def check_migrated(engine: AsyncEngine) -> None:
    """Raise SchemaError, saying what to run, unless the database is at head."""
    try:
        current = await current_revision(engine)
    except SQLAlchemyError as exc:
        raise SchemaError(
            f"cannot read the schema version ({exc.__class__.__name__}: {exc})"
        ) from exc
    head = head_revision()
    if current is None:
        raise SchemaError(f"the database has no async-processor schema; {MIGRATE_HINT}")
    if current != head:
        raise SchemaError(
            f"the database is at revision {current}, this code needs {head}; {MIGRATE_HINT}"
        )
