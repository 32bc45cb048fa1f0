"""Alembic environment: async engine, URL from Settings, batch mode on SQLite."""

from __future__ import annotations

import asyncio
from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection

from app.config import load_settings
from app.db import make_engine
from app.models import Base

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logging", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _database_url() -> str:
    url = config.attributes.get("database_url")
    return str(url) if url else load_settings().database_url


# SQLite cannot reflect indexes with a DESC column, so autogenerate cannot compare them
# there; PostgreSQL compares them, and the claim query-plan test proves they exist on both.
SQLITE_UNREFLECTABLE_INDEXES = frozenset(
    {"ix_pending_analysis_claim", "ix_pending_analysis_claim_any", "ix_analysis_notifications_feed"}
)


def include_object(
    obj: object, name: str | None, type_: str, reflected: bool, compare_to: object
) -> bool:
    """Leave out of comparisons what one dialect cannot reflect."""
    dialect = context.get_context().dialect.name
    return not (type_ == "index" and dialect == "sqlite" and name in SQLITE_UNREFLECTABLE_INDEXES)


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        # One transaction for the whole upgrade on SQLite too (Alembic's SQLite default,
        # no transactional DDL, commits after each revision): a second `migrate` run at
        # once took the write lock between two of them and ran the next revisions itself
        # ("table schedules already exists"). SQLite's DDL is transactional.
        transactional_ddl=True,
        compare_type=True,
        include_object=include_object,
    )


#: Migrations of every process take turns (pg_advisory_xact_lock): a second `migrate` run
#: at once waits, then finds the database at head, instead of failing halfway.
MIGRATION_LOCK_KEY = 0x6170_6D69_6772_6174
#: How long a migration waits for a table lock (PostgreSQL) before it gives up. While it
#: waits, every other statement on that table queues behind it: a long reader (a report,
#: pg_dump) would otherwise stop the queue's traffic for as long as it runs.
MIGRATION_LOCK_TIMEOUT = "5s"


def _run_sync(connection: Connection) -> None:
    _configure(connection)
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})")
            connection.exec_driver_sql(f"SET LOCAL lock_timeout = '{MIGRATION_LOCK_TIMEOUT}'")
        context.run_migrations()
        if connection.dialect.name == "sqlite":
            broken = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
            if broken:
                raise RuntimeError(f"the migration broke foreign keys: {broken[:5]}")


async def _run_async() -> None:
    engine = make_engine(_database_url(), pool_size=1, create_folder=True, migrating=True)
    try:
        # SQLite: take the write lock at BEGIN (a deferred transaction that turns into a
        # write fails at once with "database is locked" while a daemon writes)
        async with engine.connect() as connection:
            connection = await connection.execution_options(async_processor_begin="IMMEDIATE")
            await connection.run_sync(_run_sync)
    finally:
        await engine.dispose()


def run_migrations_offline() -> None:
    """Emit SQL to stdout instead of running it."""
    context.configure(
        url=_database_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run against the database; an existing connection (tests) is used as it is."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_sync(connection)
    else:
        asyncio.run(_run_async())


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
