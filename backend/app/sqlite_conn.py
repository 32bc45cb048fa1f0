"""aiosqlite connections whose statements take one trip to the connection's thread.

aiosqlite runs each driver call on its connection's thread and hands the answer back to
the event loop, and SQLAlchemy's adapter makes four such calls for every statement: open a
cursor, execute, fetch the rows, close the cursor. Each is a hand-off between two threads
(0.1-0.2 ms on a busy 2-core VM): a one-row SELECT cost the API about 0.9 ms, most of it
waiting for threads. ``OneTripConnection`` is an ``aiosqlite.Connection`` whose cursors do
all four in one call on that thread and keep the rows, the description, the row count and
the last row id for SQLAlchemy to read afterwards, as aiosqlite's own
``execute_fetchall`` does. Everything else (transactions, the pool, error translation,
aiosqlite's thread) is aiosqlite's and SQLAlchemy's, unchanged.

What changes for a caller: rows are fetched when the statement runs, not as they are
iterated (SQLAlchemy's adapter reads them all at once anyway, except for a server-side
cursor, ``stream()``, which then holds its rows in memory).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Generator, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import aiosqlite

from app.db import LenientConnection
from app.threads import in_own_thread

#: (description, rows, rowcount, lastrowid) of one statement
_Outcome = tuple[Any, list[Any], int, int | None]


def _run(connection: sqlite3.Connection, method: str, sql: str, parameters: Any) -> _Outcome:
    """On the connection's thread: the statement and everything SQLAlchemy reads of it."""
    cursor = connection.cursor()
    try:
        getattr(cursor, method)(sql, parameters)
        description = cursor.description
        rows = cursor.fetchall() if description is not None else []
        return description, rows, cursor.rowcount, cursor.lastrowid
    finally:
        cursor.close()


def _script(connection: sqlite3.Connection, script: str) -> _Outcome:
    cursor = connection.cursor()
    try:
        cursor.executescript(script)
        return cursor.description, [], cursor.rowcount, cursor.lastrowid
    finally:
        cursor.close()


class OneTripCursor(aiosqlite.Cursor):
    """An aiosqlite cursor that runs and fetches each statement in one call on the
    connection's thread; its fetches and its close need no thread at all."""

    def __init__(self, conn: OneTripConnection) -> None:  # no sqlite3 cursor is kept
        self.iter_chunk_size = conn._iter_chunk_size
        self._conn = conn
        self._description: Any = None
        self._rows: list[Any] = []
        self._offset = 0
        self._rowcount = -1
        self._lastrowid: int | None = None
        self._arraysize = 1

    async def _outcome(self, fn: Any, *args: Any) -> OneTripCursor:
        outcome: _Outcome = await self._conn._execute(  # type: ignore[no-untyped-call]
            fn, self._conn._conn, *args
        )
        self._description, self._rows, self._rowcount, self._lastrowid = outcome
        self._offset = 0
        return self

    async def execute(self, sql: str, parameters: Iterable[Any] | None = None) -> OneTripCursor:
        return await self._outcome(_run, "execute", sql, [] if parameters is None else parameters)

    async def executemany(self, sql: str, parameters: Iterable[Iterable[Any]]) -> OneTripCursor:
        return await self._outcome(_run, "executemany", sql, parameters)

    async def executescript(self, sql_script: str) -> OneTripCursor:
        return await self._outcome(_script, sql_script)

    def _take(self, count: int | None) -> list[Any]:
        start = self._offset
        end = len(self._rows) if count is None or count < 0 else min(len(self._rows), start + count)
        self._offset = end
        return self._rows[start:end]

    async def fetchone(self) -> Any:
        rows = self._take(1)
        return rows[0] if rows else None

    async def fetchmany(self, size: int | None = None) -> Sequence[Any]:
        return self._take(self._arraysize if size is None else size)

    async def fetchall(self) -> Sequence[Any]:
        return self._take(None)

    async def close(self) -> None:
        self._rows = []
        self._offset = 0

    @property
    def rowcount(self) -> int:
        return self._rowcount

    @property
    def lastrowid(self) -> int | None:
        return self._lastrowid

    @property
    def arraysize(self) -> int:
        return self._arraysize

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        self._arraysize = value

    @property
    def description(self) -> Any:
        return self._description

    @property
    def connection(self) -> sqlite3.Connection:
        return self._conn._conn

    @property
    def row_factory(self) -> Any:  # the connection's: each statement's cursor is made from it
        return self._conn._conn.row_factory

    @row_factory.setter
    def row_factory(self, factory: Any) -> None:
        raise NotImplementedError(
            "set row_factory on the connection (each statement has a cursor of its own)"
        )


class _NewCursor:
    """What ``Connection.cursor()`` returns: awaitable, or an async context manager, as
    aiosqlite's is; making the cursor takes no trip to the thread."""

    def __init__(self, conn: OneTripConnection) -> None:
        self._cursor = OneTripCursor(conn)

    def __await__(self) -> Generator[Any, None, OneTripCursor]:
        return self._aenter().__await__()

    async def _aenter(self) -> OneTripCursor:
        return self._cursor

    async def __aenter__(self) -> OneTripCursor:
        return self._cursor

    async def __aexit__(self, *_: object) -> None:
        await self._cursor.close()


class OneTripConnection(aiosqlite.Connection):
    """aiosqlite's connection, with one-trip cursors, that knows whether any of its calls
    is still queued or running on its thread."""

    #: calls handed to the thread (counted on the event loop) and finished there (counted on
    #: the thread): each counter has one writer
    _sent: int = 0
    _done: int = 0

    def cursor(self) -> _NewCursor:  # type: ignore[override]
        return _NewCursor(self)

    async def _execute(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        self._sent += 1
        return await super()._execute(self._counted, partial(fn, *args, **kwargs))  # type: ignore[no-untyped-call]

    def _counted(self, call: Any) -> Any:  # on the connection's thread
        try:
            return call()
        finally:
            self._done += 1

    @property
    def idle(self) -> bool:
        """No call is queued or running on the connection's thread. A caller cancelled
        while awaiting one stops waiting, and the call still runs: a BEGIN the pool must
        roll back after it, though SQLite says no transaction is open yet."""
        return self._done == self._sent


async def connect_one_trip(path: Path, *, busy_seconds: float) -> OneTripConnection:
    """Open ``path`` as SQLAlchemy's aiosqlite dialect would (its ``async_creator``)."""
    connection = OneTripConnection(
        partial(
            sqlite3.connect,
            str(path),
            timeout=busy_seconds,
            check_same_thread=False,
            factory=LenientConnection,
        ),
        iter_chunk_size=64,
    )
    # As SQLAlchemy's dialect does, so that a connection never holds up the exit (before
    # aiosqlite 0.22 the connection was itself the thread).
    thread: Any = getattr(connection, "_thread", connection)
    thread.daemon = True
    try:
        await connection
    except Exception:
        # On a failed connect aiosqlite stops its thread without waiting for it; the
        # thread's last call into the event loop then raced the loop's close ("Exception in
        # thread … Event loop is closed" under a CLI's error). Wait for it while it is open.
        await in_own_thread(thread.join, 1.0)
        raise
    return connection
