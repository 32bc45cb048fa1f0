"""Engines: SQLite pragmas, BEGIN IMMEDIATE, folder creation, the database clock."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import func, select, text
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import SettingsError, load_settings
from app.db import Database, later_sql, make_engine, now_sql, sqlite_path
from app.models.types import utcnow

PRAGMAS = ("journal_mode", "synchronous", "busy_timeout", "foreign_keys", "journal_size_limit")


async def _pragmas(s: AsyncSession) -> list[object]:
    return [(await s.execute(text(f"PRAGMA {name}"))).scalar_one() for name in PRAGMAS]


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_sqlite_pragmas_on_every_connection(db: Database) -> None:
    # WAL, synchronous=NORMAL (1), busy_timeout 5000 ms, foreign keys on, the WAL cut back
    # to 64 MiB: for read and write sessions alike, and for a second pooled connection
    # opened while one is busy.
    expected = ["wal", 1, 5000, 1, 64 * 1024 * 1024]
    async with db.read_transaction() as s:
        assert await _pragmas(s) == expected
        async with db.write_transaction() as w:
            assert await _pragmas(w) == expected


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_sqlite_synchronous_full_reaches_every_connection(database_url: str) -> None:
    """SQLITE_SYNCHRONOUS=FULL (2): the pool's connections, the write thread's and the
    bare one of run_write's ``here`` all run with it."""
    import sqlite3 as sqlite3_module

    db = Database.from_url(database_url, write_thread=True, sqlite_synchronous="FULL")
    try:
        async with db.read_transaction() as s:
            assert (await s.execute(text("PRAGMA synchronous"))).scalar_one() == 2

        async def on_thread(s: AsyncSession) -> int:
            return int((await s.execute(text("PRAGMA synchronous"))).scalar_one())

        def here(conn: sqlite3_module.Connection, _dialect: object) -> int:
            return int(conn.execute("PRAGMA synchronous").fetchone()[0])

        assert await db.run_write(on_thread) == 2
        assert await db.run_write(on_thread, here=here) == 2
    finally:
        await db.dispose()
    with pytest.raises(SettingsError, match="SQLITE_SYNCHRONOUS"):  # OFF: a power loss
        load_settings(database_url=database_url, sqlite_synchronous="OFF")  # may corrupt


@pytest.fixture
def other_connection(database_url: str) -> Iterator[sqlite3.Connection]:
    """A second, raw connection to the same SQLite file that never waits for a lock."""
    path = sqlite_path(database_url)
    assert path is not None
    conn = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


def _begin_immediate(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("ROLLBACK")


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_write_transaction_holds_the_write_lock_from_its_start(
    db: Database, other_connection: sqlite3.Connection
) -> None:
    _begin_immediate(other_connection)  # free before
    async with db.write_transaction() as s:
        await s.execute(text("SELECT count(*) FROM pending_analysis"))  # a read only
        with pytest.raises(sqlite3.OperationalError, match="database is locked"):
            other_connection.execute("BEGIN IMMEDIATE")
    _begin_immediate(other_connection)  # free again after the commit


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_read_transaction_does_not_take_the_write_lock(
    db: Database, other_connection: sqlite3.Connection
) -> None:
    async with db.read_transaction() as s:
        await s.execute(text("SELECT count(*) FROM pending_analysis"))
        other_connection.execute("BEGIN IMMEDIATE")  # succeeds: the read holds no write lock
        try:
            # … and the open read goes on while the other connection holds it (WAL)
            await s.execute(text("SELECT count(*) FROM pending_analysis"))
        finally:
            other_connection.execute("ROLLBACK")


async def test_make_engine_creates_the_sqlite_folder_when_asked(tmp_path: Path) -> None:
    """migrate asks; the other commands only read, and a typo in the path left a folder."""
    path = tmp_path / "not" / "yet" / "q.db"
    make_engine(f"sqlite+aiosqlite:///{path}")
    assert not path.parent.exists()
    engine = make_engine(f"sqlite+aiosqlite:///{path}", create_folder=True)
    try:
        assert path.parent.is_dir()  # created up front, before any connection
        async with engine.connect() as conn:
            assert (await conn.execute(text("PRAGMA journal_mode"))).scalar_one() == "wal"
    finally:
        await engine.dispose()
    assert path.is_file()


def _aware_utc(value: datetime) -> None:
    assert isinstance(value, datetime)
    assert value.tzinfo is not None and value.utcoffset() == timedelta(0), value


async def test_database_clock_is_aware_utc(db: Database) -> None:
    async with db.read_transaction() as s:
        now = (await s.execute(select(now_sql(db.dialect)))).scalar_one()
        later = (await s.execute(select(later_sql(db.dialect, 90)))).scalar_one()
    _aware_utc(now)
    _aware_utc(later)
    assert abs((now - utcnow()).total_seconds()) < 5
    if db.dialect == "postgresql":
        assert later - now == timedelta(seconds=90)  # one transaction: one now()
    else:
        assert timedelta(seconds=90) <= later - now < timedelta(seconds=91)


async def test_pinned_clock_is_returned_as_given(db: Database) -> None:
    pinned = datetime(2030, 1, 2, 3, 4, 5, 678_000, tzinfo=UTC)
    async with db.read_transaction() as s:
        now = (await s.execute(select(now_sql(db.dialect, pinned)))).scalar_one()
        later = (await s.execute(select(later_sql(db.dialect, 1.5, pinned)))).scalar_one()
    _aware_utc(now)
    _aware_utc(later)
    assert (now, later) == (pinned, pinned + timedelta(seconds=1.5))


@pytest.mark.parametrize("engine_name", ["postgresql"])
async def test_postgres_clock_is_the_servers_transaction_time(db: Database) -> None:
    async with db.read_transaction() as s:
        first = (await s.execute(select(now_sql(db.dialect)))).scalar_one()
        await asyncio.sleep(0.05)
        server = (await s.execute(text("SELECT now()"))).scalar_one()
        again = (await s.execute(select(now_sql(db.dialect)))).scalar_one()
        wall = (await s.execute(text("SELECT clock_timestamp()"))).scalar_one()
    _aware_utc(first)
    assert first == server == again  # now() is fixed for the transaction
    assert wall > first  # … while the server's wall clock moved on


# --- run_write: the daemon's write path (SQLite: whole transactions on the write thread) -----


@pytest.fixture
async def threaded_db(database_url: str) -> AsyncIterator[Database]:
    """A Database as the daemon builds it (SQLite: with its write thread)."""
    database = Database.from_url(database_url, pre_ping=False, write_thread=True)
    try:
        yield database
    finally:
        await database.dispose()


async def _count(db: Database) -> int:
    async with db.read_transaction() as s:
        return int((await s.execute(text("SELECT count(*) FROM processors"))).scalar_one())


async def _insert_processor(s: AsyncSession, name: str) -> None:
    await s.execute(
        text(
            "INSERT INTO processors (id, hostname, pid, version, started_at, last_seen_at,"
            " concurrency, in_flight, state, processed, failed, queues)"
            " VALUES (:id, 'h', 1, 'v', :now, :now, 1, 0, 'running', 0, 0, '*')"
        ),
        {"id": name, "now": utcnow()},
    )


async def test_run_write_commits_and_returns_the_result(threaded_db: Database) -> None:
    async def write(s: AsyncSession) -> str:
        await _insert_processor(s, "p1")
        return "done"

    assert await threaded_db.run_write(write) == "done"
    assert await _count(threaded_db) == 1


async def test_run_write_rolls_back_and_raises_on_error(threaded_db: Database) -> None:
    async def write(s: AsyncSession) -> None:
        await _insert_processor(s, "p1")
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await threaded_db.run_write(write)
    assert await _count(threaded_db) == 0
    # the connection is usable after the failure
    await threaded_db.run_write(lambda s: _insert_processor(s, "p2"))
    assert await _count(threaded_db) == 1


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_run_write_runs_on_the_write_thread(threaded_db: Database) -> None:
    import threading

    async def where(s: AsyncSession) -> str:
        await s.execute(text("SELECT 1"))
        return threading.current_thread().name

    assert await threaded_db.run_write(where) == "sqlite-writer"
    assert threading.current_thread().name != "sqlite-writer"


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_run_write_waits_for_a_lock_off_the_event_loop(
    threaded_db: Database, other_connection: sqlite3.Connection
) -> None:
    # Another process holds the write lock: the write waits (busy_timeout) on the write
    # thread while the event loop keeps running, then commits once the lock is free.
    other_connection.execute("BEGIN IMMEDIATE")
    write = asyncio.ensure_future(threaded_db.run_write(lambda s: _insert_processor(s, "p1")))
    ticks = 0
    while ticks < 20:
        await asyncio.sleep(0.01)
        ticks += 1
    assert not write.done()
    other_connection.execute("ROLLBACK")
    await asyncio.wait_for(write, 10)
    assert await _count(threaded_db) == 1


async def _where_and_insert(s: AsyncSession, name: str) -> str:
    import threading

    await _insert_processor(s, name)
    return threading.current_thread().name


def _insert_here(name: str) -> Callable[[sqlite3.Connection, Dialect], str]:
    """run_write's ``here`` form of _where_and_insert: the same row on a bare connection."""

    def insert(conn: sqlite3.Connection, _dialect: Dialect) -> str:
        conn.execute(
            "INSERT INTO processors (id, hostname, pid, version, started_at, last_seen_at,"
            " concurrency, in_flight, state, processed, failed, queues)"
            " VALUES (?, 'h', 1, 'v', ?, ?, 1, 0, 'running', 0, 0, '*')",
            (name, str(utcnow()), str(utcnow())),
        )
        return "here:" + threading.current_thread().name

    return insert


@pytest.mark.parametrize("engine_name", ["sqlite"])
@pytest.mark.parametrize("threaded", [True, False], ids=["write-thread", "no-write-thread"])
async def test_run_write_here_runs_on_this_thread_when_the_lock_is_free(
    threaded_db: Database, db: Database, threaded: bool
) -> None:
    """The claim's path: ``here`` runs, not ``fn``, on this thread when nobody holds the
    write lock; committed, and the connection is reused for the next one."""

    target = threaded_db if threaded else db
    here = "here:" + threading.current_thread().name
    for name in ("p1", "p2"):
        found = await target.run_write(
            lambda s, name=name: _where_and_insert(s, name), here=_insert_here(name)
        )
        assert found == here
    assert await _count(target) == 2


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_run_write_here_never_waits_and_runs_no_checkpoint(threaded_db: Database) -> None:
    """The bare connection has the application's pragmas, except that it never waits for
    the lock and leaves checkpoints to the other connections (they would run on the event
    loop)."""

    def pragmas(conn: sqlite3.Connection, _dialect: Dialect) -> list[object]:
        names = (
            "journal_mode",
            "synchronous",
            "busy_timeout",
            "foreign_keys",
            "wal_autocheckpoint",
            "journal_size_limit",
        )
        return [conn.execute(f"PRAGMA {name}").fetchone()[0] for name in names]

    async def unused(_s: AsyncSession) -> list[object]:
        raise AssertionError("the lock was free: here should have run")

    expected = ["wal", 1, 0, 1, 0, 64 * 1024 * 1024]
    assert await threaded_db.run_write(unused, here=pragmas) == expected


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_run_write_here_goes_to_the_write_thread_when_locked(
    threaded_db: Database, other_connection: sqlite3.Connection
) -> None:
    """Another process holds the write lock: the event loop is never blocked waiting for
    it; ``fn`` goes to the write thread, waits there, and commits once."""
    other_connection.execute("BEGIN IMMEDIATE")
    write = asyncio.ensure_future(
        threaded_db.run_write(lambda s: _where_and_insert(s, "p1"), here=_insert_here("p1"))
    )
    ticks = 0
    while ticks < 20:  # the loop keeps turning while the write waits
        await asyncio.sleep(0.01)
        ticks += 1
    assert not write.done()
    other_connection.execute("ROLLBACK")
    assert await asyncio.wait_for(write, 10) == "sqlite-writer"
    assert await _count(threaded_db) == 1


@pytest.mark.parametrize("engine_name", ["sqlite"])
@pytest.mark.parametrize("failure", ["python", "sqlite"])
async def test_run_write_here_raises_errors_from_inside_the_transaction(
    threaded_db: Database, failure: str
) -> None:
    """Only a lock that was never taken sends the transaction elsewhere: an error of the
    transaction itself is raised (a database error as SQLAlchemy's, as ``fn``'s would be),
    rolled back, and not run twice; the connection serves the next transaction."""
    runs = []

    def fails(conn: sqlite3.Connection, dialect: Dialect) -> None:
        runs.append(1)
        _insert_here("p1")(conn, dialect)
        if failure == "python":
            raise ValueError("boom")
        conn.execute("INSERT INTO no_such_table VALUES (1)")

    async def unused(_s: AsyncSession) -> None:
        raise AssertionError("fn must not run after here failed")

    expected = ValueError if failure == "python" else sa_exc.OperationalError
    with pytest.raises(expected, match=r"boom|no such table"):
        await threaded_db.run_write(unused, here=fails)
    assert runs == [1]
    assert await _count(threaded_db) == 0
    assert await threaded_db.run_write(unused, here=_insert_here("p2")) == (
        "here:" + threading.current_thread().name
    )
    assert await _count(threaded_db) == 1


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_run_write_here_a_failed_commit_is_raised_and_rolled_back(
    threaded_db: Database,
) -> None:
    """COMMIT itself fails (a deferred foreign key check): SQLAlchemy's IntegrityError,
    nothing of the transaction kept, the connection fine for the next one."""

    def orphan_note(conn: sqlite3.Connection, dialect: Dialect) -> None:
        _insert_here("p1")(conn, dialect)
        conn.execute("PRAGMA defer_foreign_keys=ON")
        conn.execute(
            "INSERT INTO analysis_notifications (task_id, type, title, message, data, is_read,"
            " created_at) VALUES (424242, 'started', 't', 'm', '{}', 0, ?)",
            (str(utcnow()),),
        )

    async def unused(_s: AsyncSession) -> None:
        raise AssertionError("fn must not run after here failed")

    with pytest.raises(sa_exc.IntegrityError, match="FOREIGN KEY"):
        await threaded_db.run_write(unused, here=orphan_note)
    assert await _count(threaded_db) == 0
    assert await threaded_db.run_write(unused, here=_insert_here("p2")) == (
        "here:" + threading.current_thread().name
    )
    assert await _count(threaded_db) == 1


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_run_write_and_write_transaction_take_turns(threaded_db: Database) -> None:
    # Writers of one process queue on one lock, whichever path they take: none of them
    # meets "database is locked" from its own process.
    async def one(i: int) -> None:
        if i % 2:
            await threaded_db.run_write(lambda s: _insert_processor(s, f"p{i}"))
        else:
            async with threaded_db.write_transaction() as s:
                await _insert_processor(s, f"p{i}")

    await asyncio.gather(*(one(i) for i in range(40)))
    assert await _count(threaded_db) == 40


@pytest.fixture
def aiosqlite_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The name of each function aiosqlite runs on its thread (one trip there and back)."""
    import aiosqlite.core

    calls: list[str] = []
    original = aiosqlite.core.Connection._execute

    async def counted(self: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
        shown, shown_args = fn, args
        if getattr(fn, "__name__", "") == "_counted":  # OneTripConnection's count of its calls
            shown, shown_args = args[0].func, args[0].args
        calls.append(f"{shown.__name__} {shown_args[0] if shown_args else ''}".strip())
        return await original(self, fn, *args, **kwargs)

    monkeypatch.setattr(aiosqlite.core.Connection, "_execute", counted)
    return calls


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_sqlite_begin_is_one_trip_and_a_commit_needs_no_rollback(
    db: Database, aiosqlite_calls: list[str]
) -> None:
    """BEGIN IMMEDIATE in one trip to aiosqlite's thread (not a cursor's open, execute,
    close), the INSERT in one (app.sqlite_conn), and no rollback when a committed
    connection goes back to the pool."""
    async with db.write_transaction() as s:  # the pool's connection exists from here on
        await s.execute(text("SELECT 1"))
    aiosqlite_calls.clear()
    async with db.write_transaction() as s:
        await _insert_processor(s, "p1")
    assert [c.split()[0] for c in aiosqlite_calls] == [
        "_execute_fetchall",  # BEGIN IMMEDIATE
        "_run",  # the INSERT through SQLAlchemy's cursor: open, execute, close in one trip
        "commit",  # and nothing after it
    ], aiosqlite_calls
    assert aiosqlite_calls[0] == "_execute_fetchall BEGIN IMMEDIATE"
    assert await _count(db) == 1


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_sqlite_statement_and_all_its_rows_in_one_trip(
    db: Database, aiosqlite_calls: list[str]
) -> None:
    """A read: BEGIN, then the SELECT with every row it returns in one trip, then the
    rollback; the rows come out whole however they are read (all, one by one, streamed)."""
    async with db.write_transaction() as s:
        for name in ("p1", "p2", "p3"):
            await _insert_processor(s, name)
    aiosqlite_calls.clear()
    query = text("SELECT id FROM processors ORDER BY id")
    async with db.read_transaction() as s:
        assert (await s.execute(query)).scalars().all() == ["p1", "p2", "p3"]
    assert [c.split()[0] for c in aiosqlite_calls] == ["_execute_fetchall", "_run", "rollback"]
    async with db.read_transaction() as s:
        result = await s.execute(query)
        assert result.fetchone() == ("p1",)
        assert result.fetchmany(1) == [("p2",)]
        assert result.fetchall() == [("p3",)]
        assert result.fetchone() is None
        streamed = await s.stream(query)
        assert [list(part) async for part in streamed.partitions(2)] == [
            [("p1",), ("p2",)],
            [("p3",)],
        ]


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_sqlite_one_trip_cursor_reports_counts_ids_and_errors(db: Database) -> None:
    """What SQLAlchemy reads of a cursor after its statement: rowcount of an UPDATE and of
    an executemany, lastrowid of an ORM insert, no rows for DML; a constraint error is
    SQLAlchemy's IntegrityError and leaves the connection usable."""
    from app.models import ApiToken

    async with db.write_transaction() as s:
        insert = text(
            "INSERT INTO processors (id, hostname, pid, version, started_at, last_seen_at,"
            " concurrency, in_flight, state, processed, failed, queues)"
            " VALUES (:id, 'h', 1, 'v', :now, :now, 1, 0, 'running', 0, 0, '*')"
        )
        many = await s.execute(insert, [{"id": f"p{i}", "now": utcnow()} for i in range(4)])
        assert many.rowcount == 4
        updated = await s.execute(text("UPDATE processors SET pid = 2 WHERE id IN ('p0', 'p1')"))
        assert updated.rowcount == 2
        assert not updated.returns_rows
        token = ApiToken(token_hash="h" * 64, user_id="u", is_admin=False, name=None)
        s.add(token)
        await s.flush()
        assert token.id is not None and token.id >= 1
    with pytest.raises(sa_exc.IntegrityError):
        async with db.write_transaction() as s:
            await _insert_processor(s, "p0")
    assert await _count(db) == 4
    async with db.write_transaction() as s:
        await _insert_processor(s, "p9")
    assert await _count(db) == 5


async def test_sqlite_files_get_one_trip_connections_memory_does_not(tmp_path: Path) -> None:
    """A SQLite file is opened with app.sqlite_conn's connection; a URL with options (a
    ``file:`` URI) by SQLAlchemy's dialect, as given."""
    import aiosqlite

    from app.sqlite_conn import OneTripConnection

    async def driver_of(url: str) -> object:
        engine = make_engine(url)
        try:
            async with engine.connect() as conn:
                raw = await conn.get_raw_connection()
                return raw.driver_connection
        finally:
            await engine.dispose()

    file_driver = await driver_of(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}")
    assert isinstance(file_driver, OneTripConnection)
    uri_driver = await driver_of(f"sqlite+aiosqlite:///file:{tmp_path / 'b.db'}?mode=rwc&uri=true")
    assert isinstance(uri_driver, aiosqlite.Connection)
    assert not isinstance(uri_driver, OneTripConnection)
    assert (tmp_path / "b.db").exists()
    assert not Path("file:").exists()  # noqa: ASYNC240 - no folder named after the URI


async def test_one_trip_cursor_on_its_own(tmp_path: Path) -> None:
    """The cursor as aiosqlite's callers use it: fetchone, fetchmany with arraysize,
    iteration, executescript, and a description kept after close."""
    from app.sqlite_conn import connect_one_trip

    conn = await connect_one_trip(tmp_path / "c.db", busy_seconds=1)
    try:
        cursor = await conn.cursor()
        await cursor.executescript(
            "CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (1), (2), (3);"
        )
        await cursor.execute("SELECT x FROM t ORDER BY x")
        assert cursor.description[0][0] == "x"
        cursor.arraysize = 2
        assert await cursor.fetchone() == (1,)
        assert await cursor.fetchmany() == [(2,), (3,)]
        assert await cursor.fetchmany() == []
        await cursor.execute("SELECT x FROM t ORDER BY x")
        assert await cursor.fetchmany() == [(1,), (2,)]
        assert await cursor.fetchall() == [(3,)]
        await cursor.execute("SELECT x FROM t ORDER BY x")
        assert await cursor.fetchone() == (1,)
        assert await cursor.fetchmany(-1) == [(2,), (3,)]  # as sqlite3: every row left
        await cursor.execute("SELECT x FROM t ORDER BY x")
        assert [row async for row in cursor] == [(1,), (2,), (3,)]
        async with conn.cursor() as inner:
            await inner.execute("INSERT INTO t VALUES (?)", (4,))
            assert (inner.rowcount, inner.lastrowid, inner.description) == (1, 4, None)
        await conn.commit()
    finally:
        await conn.close()


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_sqlite_connection_back_in_the_pool_inside_a_transaction_is_rolled_back(
    db: Database,
) -> None:
    """A transaction SQLAlchemy does not know of (begun on the driver) is rolled back when
    the connection goes back to the pool: the next user never inherits it."""
    async with db.engine.connect() as conn:
        raw = await conn.get_raw_connection()
        driver: Any = raw.driver_connection
        await conn.commit()  # SQLAlchemy's own transaction ends; the driver's begins
        await driver.execute("BEGIN IMMEDIATE")
        await driver.execute(
            "INSERT INTO processors (id, hostname, pid, version, started_at, last_seen_at,"
            " concurrency, in_flight, state, processed, failed, queues)"
            " VALUES ('p1', 'h', 1, 'v', '2026-01-01', '2026-01-01', 1, 0, 'running', 0, 0, '*')"
        )
        assert driver.in_transaction
    assert not driver.in_transaction
    assert await _count(db) == 0
    async with db.write_transaction() as s:  # the write lock was given back
        await _insert_processor(s, "p2")
    assert await _count(db) == 1


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_sqlite_begin_that_cannot_lock_raises_sqlalchemys_error(
    db: Database, other_connection: sqlite3.Connection
) -> None:
    """BEGIN IMMEDIATE against a held write lock fails as session.execute would fail:
    sqlalchemy.exc.OperationalError, which the daemon's loops treat as transient."""
    from sqlalchemy.exc import OperationalError

    other_connection.execute("BEGIN IMMEDIATE")
    try:
        async with db.engine.connect() as conn:
            await conn.exec_driver_sql("PRAGMA busy_timeout=50")
            await conn.commit()
            await conn.execution_options(async_processor_begin="IMMEDIATE")
            with pytest.raises(OperationalError, match="database is locked"):
                await conn.begin()
    finally:
        other_connection.execute("ROLLBACK")


# --- PostgreSQL: the pooled connection's check before use --------------------------------------


@pytest.fixture
def asyncpg_round_trips(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The first word of each statement asyncpg sends (each one round trip): ``execute``
    carries BEGIN, COMMIT and the ping, ``_execute`` every fetch."""
    import asyncpg.connection

    trips: list[str] = []
    for name in ("execute", "_execute"):
        original = getattr(asyncpg.connection.Connection, name)

        def counted(original: Any) -> Any:
            async def send(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
                trips.append(query.split()[0] if query.split() else query)
                return await original(self, query, *args, **kwargs)

            return send

        monkeypatch.setattr(asyncpg.connection.Connection, name, counted(original))
    return trips


async def _enqueue(db: Database) -> object:
    """One library enqueue (the INSERT goes to asyncpg's ``_execute``); the asyncpg
    connection it ran on."""
    from app.services import queue

    async with db.write_transaction() as s:
        await queue.enqueue_task(s, kind="k", payload={})
        return (await (await s.connection()).get_raw_connection()).driver_connection


@pytest.mark.parametrize("engine_name", ["postgresql"])
async def test_pg_connection_is_pinged_only_after_being_idle(
    db: Database, asyncpg_round_trips: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection back from the pool moments ago goes straight to work: BEGIN, the
    statement, COMMIT (SQLAlchemy's pre-ping added BEGIN, ``;``, ROLLBACK to each). One
    idle past the window is pinged first, with one SELECT outside any transaction, and
    stays in use."""
    import app.db

    first = await _enqueue(db)
    asyncpg_round_trips.clear()
    assert await _enqueue(db) is first
    assert asyncpg_round_trips == ["BEGIN;", "INSERT", "COMMIT;"]

    monkeypatch.setattr(app.db, "PG_PING_AFTER_IDLE_SECONDS", 0.05)
    await asyncio.sleep(0.1)
    asyncpg_round_trips.clear()
    assert await _enqueue(db) is first
    assert asyncpg_round_trips == ["SELECT", "BEGIN;", "INSERT", "COMMIT;"]


@pytest.mark.parametrize("engine_name", ["postgresql"])
async def test_pg_connection_the_server_closed_is_replaced_before_use(
    db: Database, database_url: str
) -> None:
    """A pooled connection whose backend was terminated (a restart, an operator's
    pg_terminate_backend) is never handed out: the next transaction gets a new one and
    succeeds, though it comes inside the window in which no ping is sent."""
    import asyncpg

    async with db.write_transaction() as s:
        first = int((await s.execute(text("SELECT pg_backend_pid()"))).scalar_one())
        driver: Any = (await (await s.connection()).get_raw_connection()).driver_connection
    other = await asyncpg.connect(database_url.replace("+asyncpg", ""))
    try:
        assert await other.fetchval("SELECT pg_terminate_backend($1)", first)
    finally:
        await other.close()
    deadline = asyncio.get_running_loop().time() + 10
    while not driver.is_closed():  # asyncpg reads the server's goodbye from the socket
        assert asyncio.get_running_loop().time() < deadline, "asyncpg never saw the close"
        await asyncio.sleep(0.01)
    async with db.write_transaction() as s:
        second = int((await s.execute(text("SELECT pg_backend_pid()"))).scalar_one())
    assert second != first


async def test_read_alone_reads_on_the_bare_driver(db: Database, monkeypatch: Any) -> None:
    """One SELECT outside any session: the rows, typed by the columns (an aware datetime,
    a bool); None (the caller reads through a session) with the hot path off and after
    dispose."""
    from app.services import hotpath, queue

    statement = select(queue.TASKS.c.id, queue.TASKS.c.created_at).where(queue.TASKS.c.id > 0)
    async with db.write_transaction() as s:
        await queue.enqueue_task(s, kind="noop", payload={})
    [row] = await db.read_alone(statement, {}) or [None]
    assert row is not None and row.id >= 1 and row.created_at.tzinfo is not None
    monkeypatch.setattr(hotpath, "ENABLED", False)
    assert await db.read_alone(statement, {}) is None
    monkeypatch.setattr(hotpath, "ENABLED", True)
    await db.dispose()
    assert await db.read_alone(statement, {}) is None


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_read_alone_never_waits_for_a_locked_sqlite_file(database_url: str) -> None:
    """A connection in exclusive locking mode keeps every reader out: the bare read says
    so at once (None) instead of blocking the event loop, and reads once it is gone."""
    from app.services import queue

    holder = sqlite3.connect(sqlite_path(database_url) or "", isolation_level=None)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("UPDATE processors SET pid = pid")
    holder.execute("COMMIT")  # the file stays locked by this connection
    db = Database.from_url(database_url)
    statement = select(func.count()).select_from(queue.TASKS)
    try:
        started = asyncio.get_running_loop().time()
        assert await db.read_alone(statement, {}) is None
        assert asyncio.get_running_loop().time() - started < 1
        holder.close()
        assert [tuple(row) for row in await db.read_alone(statement, {}) or []] == [(0,)]
    finally:
        holder.close()
        await db.dispose()


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_a_read_that_scans_long_runs_off_the_event_loop(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite: a lookup by key reads on the event loop's thread, and so does a scanning read
    (a feed page with its unread count) that ends within its budget; one that runs longer
    is interrupted there and read again whole on a reader thread, so a large one never
    holds the loop. After dispose neither runs."""
    from sqlalchemy import literal

    from app import db as db_module
    from app.db import _HereWriter
    from app.services import notifications, queue

    threads: list[str] = []
    read = _HereWriter.read

    def spy(self: _HereWriter, statement: Any, params: Any, **kw: Any) -> Any:
        threads.append(threading.current_thread().name)
        return read(self, statement, params, **kw)

    monkeypatch.setattr(_HereWriter, "read", spy)
    loop_thread = threading.current_thread().name
    assert await queue.read_task(db, 1) is None
    assert await notifications.page_for_user(db, user_id="alice") == ([], 0)
    assert threads == [loop_thread, loop_thread]
    # A scan of 2,000,000 generated rows: far past 2 ms.
    numbers = select(literal(1).label("x")).cte("numbers", recursive=True)
    numbers = numbers.union_all(select(numbers.c.x + 1).where(numbers.c.x < 2_000_000))
    statement = select(func.count()).select_from(numbers)
    threads.clear()
    started = time.perf_counter()
    assert [tuple(r) for r in await db.read_alone(statement, {}, scans=True) or []] == [
        (2_000_000,)
    ]
    assert threads[0] == loop_thread and threads[1].startswith("sqlite-read"), threads
    assert time.perf_counter() - started > db_module.LOOP_READ_BUDGET_SECONDS
    await db.dispose()
    threads.clear()
    assert await db.read_alone(statement, {}, scans=True) is None
    assert threads == []


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_a_file_locked_before_any_connection_is_reported_within_the_busy_timeout(
    database_url: str,
) -> None:
    """Another process keeps the file locked (exclusive locking mode) before this one has
    a connection: opening one gives up after the busy timeout, not half a minute later, so
    the API answers its 503 within seconds."""
    from app import db as db_module

    holder = sqlite3.connect(sqlite_path(database_url) or "", isolation_level=None)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("UPDATE processors SET pid = pid")
    holder.execute("COMMIT")
    db = Database.from_url(database_url)
    try:
        started = time.monotonic()
        with pytest.raises(sa_exc.OperationalError, match="locked"):
            async with db.read_transaction() as s:
                await s.execute(text("SELECT count(*) FROM pending_analysis"))
        waited = time.monotonic() - started
        assert waited < db_module.SQLITE_BUSY_TIMEOUT_MS / 1000 + 3, waited
    finally:
        holder.close()
        await db.dispose()


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_a_database_file_deleted_or_replaced_is_noticed(
    db: Database, database_url: str, tmp_path: Path
) -> None:
    """A restore by `mv` or an `rm` left the daemon and the API reading and writing the old
    file, which no one else saw: 202s for jobs that were then lost. Each process compares
    the file with the one it opened (the daemon's heartbeat stops it; /readyz says 503)."""
    path = sqlite_path(database_url)
    assert path is not None and db.file_problem() is None
    copy = tmp_path / "restored.db"
    shutil.copyfile(path, copy)
    os.replace(copy, path)
    assert "was replaced while this process ran" in (db.file_problem() or "")
    os.remove(path)
    assert "was deleted while this process ran" in (db.file_problem() or "")
    assert Database(make_engine("postgresql+asyncpg://u@h/d")).file_problem() is None


def test_a_relative_database_path_survives_a_chdir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default URL is relative (./data/async_processor.db). A handler's os.chdir made
    the check look for another file ("deleted", /readyz 503) and the write thread open an
    empty database there; both hold the absolute path from the start now."""
    monkeypatch.chdir(tmp_path)
    sqlite3.connect("here.db").close()
    db = Database(make_engine("sqlite+aiosqlite:///./here.db"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert db.file_problem() is None
    assert db.sqlite_file == tmp_path / "here.db"
