"""Migrations: an empty database upgraded to head equals the models, on both engines."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Column, Integer, MetaData, inspect, text
from sqlalchemy.engine import Connection, make_url

from app import schema
from app.db import Database
from app.models import Base
from app.services import queue
from tests import pg
from tests.conftest import ENGINES

# The rule of migrations/env.py's include_object, reimplemented: SQLite cannot reflect
# indexes with a DESC column, so autogenerate cannot compare them there.
SQLITE_UNREFLECTABLE = {
    "ix_pending_analysis_claim",
    "ix_pending_analysis_claim_any",
    "ix_analysis_notifications_feed",
}
TABLES = {
    "pending_analysis",
    "analysis_notifications",
    "processors",
    "api_tokens",
    "queue_states",
    "task_starts",
    "schedules",
}
TRIGGER = "pending_analysis_notify_insert"
# Alembic warns (UserWarning) that it skips those indexes on SQLite, before include_object.
SKIPPED_INDEX_WARNING = (
    "ignore:autogenerate skipping metadata-specified expression-based index:UserWarning"
)


@pytest.fixture(params=ENGINES)
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of each engine: a new SQLite file, a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path}/empty.db"
        return
    if not request.getfixturevalue("pg_available"):
        pytest.skip("PostgreSQL is not reachable")
    name = pg.new_name("ap_mig")
    url = pg.create_database(name)
    try:
        yield url
    finally:
        pg.drop_database(name)


def _include_object(dialect: str) -> Any:
    """migrations/env.py's include_object for ``dialect``."""

    def include(obj: Any, name: str | None, type_: str, reflected: bool, other: Any) -> bool:
        return not (type_ == "index" and dialect == "sqlite" and name in SQLITE_UNREFLECTABLE)

    return include


def _diff(connection: Connection, metadata: MetaData = Base.metadata) -> list[Any]:
    ctx = MigrationContext.configure(
        connection,
        opts={"compare_type": True, "include_object": _include_object(connection.dialect.name)},
    )
    return list(compare_metadata(ctx, metadata))


def _altered_models() -> MetaData:
    """The models plus one column, to prove the comparison sees a difference."""
    metadata = MetaData(naming_convention=Base.metadata.naming_convention)
    for table in Base.metadata.sorted_tables:
        table.to_metadata(metadata)
    metadata.tables["pending_analysis"].append_column(Column("extra", Integer()))
    return metadata


def _tables(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names())


def _pg_objects(connection: Connection) -> tuple[set[str], set[str]]:
    """(insert triggers on pending_analysis, the notify function) on PostgreSQL."""
    if connection.dialect.name != "postgresql":
        return set(), set()
    triggers = connection.execute(
        text(
            "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal"
            " AND tgrelid = to_regclass('pending_analysis')"
        )
    ).scalars()
    functions = connection.execute(
        text("SELECT proname FROM pg_proc WHERE proname = 'async_processor_notify_insert'")
    ).scalars()
    return set(triggers), set(functions)


async def _inspect(url: str) -> dict[str, Any]:
    db = Database.from_url(url)
    try:
        async with db.engine.connect() as conn:
            tables = await conn.run_sync(_tables)
            diff = await conn.run_sync(_diff) if TABLES <= tables else None
            if diff == []:
                altered = await conn.run_sync(_diff, _altered_models())
                assert [(d[0], d[2], d[3].name) for d in altered] == [
                    ("add_column", "pending_analysis", "extra")
                ]
            triggers, functions = await conn.run_sync(_pg_objects)
    finally:
        await db.dispose()
    return {"tables": tables, "diff": diff, "triggers": triggers, "functions": functions}


@pytest.mark.filterwarnings(SKIPPED_INDEX_WARNING)
async def test_upgrade_matches_models_and_round_trips(empty_url: str) -> None:
    is_pg = make_url(empty_url).get_backend_name() == "postgresql"
    await asyncio.to_thread(schema.upgrade, empty_url)
    state = await _inspect(empty_url)
    assert state["tables"] == {"alembic_version", *TABLES}
    assert state["diff"] == []
    if is_pg:
        assert state["triggers"] == {TRIGGER}
        assert state["functions"] == {"async_processor_notify_insert"}

    await asyncio.to_thread(schema.downgrade, empty_url)
    state = await _inspect(empty_url)
    assert state["tables"] <= {"alembic_version"}
    assert (state["triggers"], state["functions"]) == (set(), set())
    db = Database.from_url(empty_url)
    try:
        with pytest.raises(schema.SchemaError, match="async-processor migrate"):
            await schema.check_migrated(db.engine)
    finally:
        await db.dispose()

    await asyncio.to_thread(schema.upgrade, empty_url)
    state = await _inspect(empty_url)
    assert state["diff"] == []
    assert state["triggers"] == ({TRIGGER} if is_pg else set())
    db = Database.from_url(empty_url)
    try:
        await schema.check_migrated(db.engine)
        async with db.write_transaction() as s:
            task = await queue.enqueue_task(s, kind="k", user_id="alice")
        async with db.read_transaction() as s:
            row = await queue.get_task(s, task.id)
        assert task.created and row is not None and row.status == "pending"
    finally:
        await db.dispose()


def _filter_index_predicates(connection: Connection) -> dict[str, str | None]:
    """The WHERE of each task-list filter index, as the database reports it."""
    key = f"{connection.dialect.name}_where"
    found: dict[str, str | None] = {}
    for index in inspect(connection).get_indexes("pending_analysis"):
        if index["name"] in FILTER_INDEXES:
            where = index.get("dialect_options", {}).get(key)
            found[str(index["name"])] = None if where is None else str(where)
    return found


FILTER_INDEXES = {
    f"ix_pending_analysis_{c}" for c in ("user_id", "project_id", "chapter_id", "completed_at")
}


async def _predicates(url: str) -> dict[str, str | None]:
    db = Database.from_url(url)
    try:
        async with db.engine.connect() as conn:
            return await conn.run_sync(_filter_index_predicates)
    finally:
        await db.dispose()


async def test_two_migrations_at_once_both_end_at_head(empty_url: str) -> None:
    """A deploy that migrates from every host: the second run waits for the first (an
    advisory lock on PostgreSQL, BEGIN IMMEDIATE on SQLite) and finds the database at
    head; it failed halfway ("relation already exists", "database is locked")."""
    import os

    script = str(Path(sys.executable).with_name("async-processor"))
    env = {**os.environ, "ASYNC_PROCESSOR_DATABASE_URL": empty_url}
    runs = [
        await asyncio.create_subprocess_exec(
            script, "migrate", env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(2)
    ]
    outputs = [await run.communicate() for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    state = await _inspect(empty_url)
    assert state["tables"] == {"alembic_version", *TABLES} and state["diff"] == []


async def test_foreign_keys_are_off_while_migrating_and_checked(empty_url: str) -> None:
    """SQLite: a batch-mode rebuild of pending_analysis drops the old table, and with
    foreign keys on, ON DELETE CASCADE took every notification with it. The migration's
    connection runs with them off and checks them before it commits."""
    from app.db import make_engine

    engine = make_engine(empty_url, migrating=True)
    try:
        async with engine.connect() as conn:
            if conn.dialect.name == "sqlite":
                assert (await conn.exec_driver_sql("PRAGMA foreign_keys")).scalar() == 0
    finally:
        await engine.dispose()


async def test_filter_indexes_hold_only_rows_with_a_value(empty_url: str) -> None:
    """0005: (user_id | project_id | chapter_id, id) and completed_at skip the rows where
    that column is NULL (an enqueue, a claim or a completion, the updates non-HOT, writes
    no entry there for them); its downgrade restores the full indexes. The plans that read
    them: test_read_plans."""
    await asyncio.to_thread(schema.upgrade, empty_url)
    found = await _predicates(empty_url)
    assert found.keys() == FILTER_INDEXES
    for name, where in found.items():
        column = name.removeprefix("ix_pending_analysis_")
        assert where is not None and where.replace("(", "").replace(")", "").strip() == (
            f"{column} IS NOT NULL"
        ), (name, where)
    await asyncio.to_thread(schema.downgrade, empty_url, "0004")
    assert await _predicates(empty_url) == dict.fromkeys(FILTER_INDEXES)


async def test_unmigrated_database_is_refused_with_a_hint(empty_url: str) -> None:
    db = Database.from_url(empty_url)
    try:
        with pytest.raises(schema.SchemaError, match="async-processor migrate"):
            await schema.check_migrated(db.engine)
    finally:
        await db.dispose()


async def test_an_older_revision_is_refused_naming_both(empty_url: str) -> None:
    await asyncio.to_thread(schema.upgrade, empty_url, "0003")
    db = Database.from_url(empty_url)
    try:
        needs = f"at revision 0003, this code needs {schema.head_revision()}"
        with pytest.raises(schema.SchemaError, match=needs):
            await schema.check_migrated(db.engine)
    finally:
        await db.dispose()


def test_head_revision_is_alembics_head() -> None:
    """The schema check reads the revision files itself (the daemon does not import
    Alembic): it must agree with Alembic."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(schema.alembic_config("sqlite://"))
    assert schema.head_revision() == script.get_current_head()


def test_the_daemon_and_the_api_do_not_import_alembic() -> None:
    """~8 MB of resident memory (Alembic, Mako, Pygments) that only `migrate` needs."""
    code = (
        "import sys, app.background_processor, app.api.main; "
        "print(sorted(m for m in ('alembic', 'mako', 'pygments') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


def _dsn(database_url: str) -> str:
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.mark.parametrize("engine_name", ["postgresql"])
async def test_postgres_insert_trigger_notifies_after_commit_once_per_transaction(
    db: Database, database_url: str
) -> None:
    listener = await asyncpg.connect(_dsn(database_url))
    received: list[tuple[str, object]] = []
    got = asyncio.Event()

    def on_notify(_conn: Any, _pid: int, channel: str, payload: object) -> None:
        received.append((channel, payload))
        got.set()

    await listener.add_listener(queue.NOTIFY_CHANNEL, on_notify)
    try:
        async with db.write_transaction() as s:
            await queue.enqueue_tasks(s, [{"kind": "k"} for _ in range(50)])
            await queue.enqueue_task(s, kind="k")
            await asyncio.sleep(0.2)
            assert received == []  # nothing is delivered before the commit
        await asyncio.wait_for(got.wait(), 5)
        await asyncio.sleep(0.2)  # a second notification would have arrived by now
        assert received == [(queue.NOTIFY_CHANNEL, "")]
    finally:
        await listener.close()
