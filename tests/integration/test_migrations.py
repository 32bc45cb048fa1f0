"""Migrations: an empty database upgraded to head equals the models, on both engines."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.engine import Connection, make_url

from app import schema
from app.db import Database
from app.models import Base
from app.services import queue
from tests import pg
from tests.conftest import ENGINES

SQLITE_UNREFLECTABLE = {
    "ix_pending_analysis_claim",
    "ix_pending_analysis_claim_any",
    "ix_analysis_notifications_feed",
}


@pytest.fixture(params=ENGINES)
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of each engine."""
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


def _diff(connection: Connection) -> list[Any]:
    sqlite = connection.dialect.name == "sqlite"

    def include(obj: Any, name: str | None, type_: str, reflected: bool, other: Any) -> bool:
        # SQLite cannot reflect DESC index columns; PostgreSQL compares them all.
        return not (sqlite and type_ == "index" and name in SQLITE_UNREFLECTABLE)

    ctx = MigrationContext.configure(
        connection, opts={"compare_type": True, "include_object": include}
    )
    return list(compare_metadata(ctx, Base.metadata))


def _tables(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names())


async def _check(url: str) -> tuple[list[Any], set[str]]:
    db = Database.from_url(url)
    try:
        async with db.engine.connect() as conn:
            return await conn.run_sync(_diff), await conn.run_sync(_tables)
    finally:
        await db.dispose()


@pytest.mark.filterwarnings(
    "ignore:autogenerate skipping metadata-specified expression-based index"
)
@pytest.mark.filterwarnings("ignore:Generating approximate signature for index")
async def test_upgrade_matches_models_and_round_trips(empty_url: str) -> None:
    await asyncio.to_thread(schema.upgrade, empty_url)
    diff, tables = await _check(empty_url)
    assert diff == []
    assert tables == {
        "alembic_version",
        "pending_analysis",
        "analysis_notifications",
        "processors",
        "api_tokens",
    }
    await asyncio.to_thread(schema.downgrade, empty_url)
    _, tables = await _check(empty_url)
    assert tables <= {"alembic_version"}
    await asyncio.to_thread(schema.upgrade, empty_url)
    db = Database.from_url(empty_url)
    try:
        await schema.check_migrated(db.engine)
        async with db.write_transaction() as s:
            assert (await queue.enqueue_task(s, kind="k")).id == 1
    finally:
        await db.dispose()


async def test_unmigrated_database_is_refused_with_a_hint(empty_url: str) -> None:
    db = Database.from_url(empty_url)
    try:
        with pytest.raises(schema.SchemaError, match="async-processor migrate"):
            await schema.check_migrated(db.engine)
    finally:
        await db.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("engine_name", ["postgresql"])
async def test_postgres_insert_trigger_notifies_once_per_transaction(
    db: Database, database_url: str
) -> None:
    dsn = make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
    listener = await asyncpg.connect(dsn)
    received: list[str] = []
    await listener.add_listener(queue.NOTIFY_CHANNEL, lambda *args: received.append(args[2]))
    try:
        async with db.write_transaction() as s:
            await queue.enqueue_tasks(s, [{"kind": "k"} for _ in range(50)])
            await queue.enqueue_task(s, kind="k")
        for _ in range(100):
            if received:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        assert received == [queue.NOTIFY_CHANNEL]
    finally:
        await listener.close()
