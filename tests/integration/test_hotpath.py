"""Driver-level execution (app.services.hotpath): same transaction, same rows, same errors
as ``session.execute``, on sqlite3 (the daemon's write thread), aiosqlite and asyncpg."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from app.db import Database
from app.models import PendingAnalysis
from app.services import hotpath, queue
from tests.helpers import enqueue_many, notes_of

PID = "proc-hot"


@pytest.fixture(params=["sqlite", "sqlite+write-thread", "postgresql"])
def engine_name(request: pytest.FixtureRequest) -> str:
    """SQLite as the API opens it (aiosqlite) and as the daemon does (its write thread over
    sqlite3); PostgreSQL (asyncpg)."""
    return str(request.param).split("+")[0]


@pytest.fixture
async def hot_db(database_url: str, request: pytest.FixtureRequest) -> AsyncIterator[Database]:
    threaded = request.node.callspec.params["engine_name"].endswith("+write-thread")
    database = Database.from_url(database_url, pre_ping=False, write_thread=threaded)
    try:
        yield database
    finally:
        await database.dispose()


async def _in_write(db: Database, fn: Callable[[AsyncSession], Awaitable[Any]]) -> Any:
    return await db.run_write(fn)


async def _driver_kind(s: AsyncSession) -> str | None:
    found = await hotpath._driver(s)
    return None if found is None else found[0]


async def test_each_shipped_driver_is_driven(hot_db: Database, engine_name: str) -> None:
    """A SQLAlchemy upgrade that changes the adapters must fail here, not slow down quietly."""
    kind = await _in_write(hot_db, _driver_kind)
    expected = {"sqlite": "aiosqlite", "postgresql": "asyncpg"}[engine_name]
    if hot_db._writer is not None:
        expected = "sqlite3"
    assert kind == expected


async def test_statements_belong_to_the_sessions_transaction(hot_db: Database) -> None:
    """A claim as the transaction's first statement, then a rollback: nothing happened."""
    [task_id] = await enqueue_many(hot_db, "chapter_analysis", 1)

    class Abort(Exception):
        pass

    async def claim_then_abort(s: AsyncSession) -> None:
        got = await queue.claim_tasks(s, processor_id=PID, limit=5, lease_seconds=30)
        assert [t.id for t in got] == [task_id]
        raise Abort

    with pytest.raises(Abort):
        await _in_write(hot_db, claim_then_abort)
    async with hot_db.read_transaction() as s:
        row = (
            await s.execute(select(PendingAnalysis).where(PendingAnalysis.id == task_id))
        ).scalar_one()
        assert (row.status, row.attempts, row.locked_by) == ("pending", 0, None)
    assert await notes_of(hot_db, task_id) == []

    async def claim(s: AsyncSession) -> list[queue.ClaimedTask]:
        return await queue.claim_tasks(s, processor_id=PID, limit=5, lease_seconds=30)

    [task] = await _in_write(hot_db, claim)
    assert (task.id, task.attempt) == (task_id, 1)
    assert [kind for kind, _ in await notes_of(hot_db, task_id)] == ["started"]


async def test_rows_match_the_core_path(hot_db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same claim and the same finish, by the driver and by session.execute: equal
    values and types (JSON payloads, aware datetimes, floats)."""
    ids = await enqueue_many(hot_db, "chapter_analysis", 6, payload={"a": [1, 2.5, "x"]})

    async def claim_three(s: AsyncSession) -> list[queue.ClaimedTask]:
        return await queue.claim_tasks(s, processor_id=PID, limit=3, lease_seconds=30)

    fast = await _in_write(hot_db, claim_three)
    monkeypatch.setattr(hotpath, "ENABLED", False)
    core = await _in_write(hot_db, claim_three)
    assert [t.id for t in fast + core] == ids
    for a, b in zip(fast, core, strict=True):
        assert a.payload["a"] == b.payload["a"] == [1, 2.5, "x"]
        assert a.scheduled_at.tzinfo is not None and b.scheduled_at.tzinfo is not None
        assert (a.attempt, a.kind, a.timeout_seconds) == (b.attempt, b.kind, b.timeout_seconds)
    for enabled, batch in ((True, fast), (False, core)):
        monkeypatch.setattr(hotpath, "ENABLED", enabled)
        items = [
            queue.Finished(
                t.id, t.attempt, queue.Finish.COMPLETE, result={"ok": t.id}, duration_seconds=0.25
            )
            for t in batch
        ]

        async def finish(s: AsyncSession, items: list[queue.Finished] = items) -> Any:
            return await queue.finish_tasks(s, processor_id=PID, items=items)

        assert await _in_write(hot_db, finish) == ["completed"] * 3
    async with hot_db.read_transaction() as s:
        rows = (
            (await s.execute(select(PendingAnalysis).order_by(PendingAnalysis.id))).scalars().all()
        )
    assert [(r.status, r.result, r.duration_seconds, r.locked_by) for r in rows] == [
        ("completed", {"ok": r.id}, 0.25, None) for r in rows
    ]


async def test_driver_errors_are_sqlalchemys(hot_db: Database) -> None:
    """A statement the database refuses raises SQLAlchemy's exception, as session.execute
    does, and the session rolls back cleanly."""

    async def bad_claim(s: AsyncSession) -> Any:
        stmt = queue._claim_statement(False, frozenset())
        params = {"c_limit": "not a number", "c_processor": PID, "c_now": None}
        params["c_lease_until"] = None
        return await hotpath.fetch(s, stmt, params)

    if hot_db.dialect == "sqlite":  # SQLite takes any type: break the SQL instead

        async def bad_claim(s: AsyncSession) -> Any:
            return await hotpath.fetch(s, select(text("no_such_column")), {})

    with pytest.raises(sa_exc.DBAPIError):
        await _in_write(hot_db, bad_claim)
    assert await enqueue_many(hot_db, "chapter_analysis", 1)  # the connection still works


async def test_the_driver_is_looked_up_once_per_transaction(
    hot_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    lookups: list[object] = []
    real = hotpath._lookup

    async def counting(session: AsyncSession) -> Any:
        found = await real(session)
        lookups.append(found)
        return found

    monkeypatch.setattr(hotpath, "_lookup", counting)
    async with hot_db.write_sessionmaker() as s:
        for _ in range(2):  # two transactions in one session: one lookup each
            await s.begin()
            first = await hotpath._driver(s)
            assert await hotpath._driver(s) is first
            await queue.claim_tasks(s, processor_id=PID, limit=1, lease_seconds=30)
            await s.commit()
    assert len(lookups) == 2 and lookups[0] is not None


@pytest.mark.parametrize("engine_name", ["postgresql"])
async def test_a_lost_connection_is_invalidated_not_handed_out_again(
    hot_db: Database, database_url: str
) -> None:
    """The daemon's pool does not pre-ping: a connection the server dropped must be thrown
    away by the statement that found it dead, or the next transaction draws it again."""
    await enqueue_many(hot_db, "chapter_analysis", 1)
    async with hot_db.write_sessionmaker() as s:
        await s.begin()
        pid = (await s.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        async with hot_db.write_transaction() as killer:
            await killer.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        with pytest.raises(sa_exc.DBAPIError) as caught:
            await queue.claim_tasks(s, processor_id=PID, limit=1, lease_seconds=30)
        assert caught.value.connection_invalidated
        await s.rollback()

    async def claim(s: AsyncSession) -> list[queue.ClaimedTask]:
        return await queue.claim_tasks(s, processor_id=PID, limit=1, lease_seconds=30)

    assert len(await _in_write(hot_db, claim)) == 1  # a fresh connection, first time


@pytest.mark.parametrize("engine_name", ["postgresql"])
async def test_an_autocommit_on_a_pooled_connection_that_died_invalidates_it(
    database_url: str,
) -> None:
    """fetch_autocommit_pooled (an enqueue alone's one greenlet hop): a connection the
    server dropped comes out as SQLAlchemy's error, flagged invalidated, and the pool hands
    out a fresh one next time, not the dead one again."""
    db = Database.from_url(database_url, pool_size=1, pre_ping=False)
    pid_of = select(func.pg_backend_pid())
    try:
        [(pid,)] = await hotpath.fetch_autocommit_pooled(db.engine, pid_of, {}) or [()]
        other = Database.from_url(database_url, pool_size=1)
        try:
            async with other.write_transaction() as killer:
                await killer.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        finally:
            await other.dispose()
        with pytest.raises(sa_exc.DBAPIError) as caught:
            await hotpath.fetch_autocommit_pooled(db.engine, pid_of, {})
        assert caught.value.connection_invalidated
        [(fresh,)] = await hotpath.fetch_autocommit_pooled(db.engine, pid_of, {}) or [()]
        assert fresh != pid
        done = await queue.enqueue_task_alone(db, kind="chapter_analysis", user_id="u")
        async with db.read_transaction() as s:
            found = await s.get(PendingAnalysis, done.id)
        assert found is not None and found.status == "pending"
    finally:
        await db.dispose()
