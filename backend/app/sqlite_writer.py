"""The daemon's SQLite write thread: each write transaction in one hand-off.

aiosqlite runs every driver call in its connection's thread and hands the answer back to the
event loop: a cursor, an execute, a fetch, a close, each one a round trip between two
threads (0.1-0.2 ms on a busy 2-core VM). A claim-and-complete transaction made ~25 of them,
and that, not SQLite, bounded the daemon's throughput and pick-up latency.

Here the whole transaction runs on a thread of its own instead: an event loop in that
thread drives the same SQLAlchemy statements (queue.py, unchanged) over ``InlineConnection``,
an aiosqlite look-alike whose coroutines call ``sqlite3`` directly and finish without
suspending. The caller's loop hands the transaction over once and gets its result once.
Blocking that thread is fine: it runs nothing else, SQLite has one writer at a time anyway,
and ``busy_timeout`` waits there, never on the caller's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Protocol, TypeVar

from app.db import LenientConnection
from app.threads import in_own_thread

T = TypeVar("T")
STOP_TIMEOUT_SECONDS = 5.0


class InlineCursor:
    """An aiosqlite-shaped cursor over a ``sqlite3`` cursor: every coroutine runs to its end
    at once (SQLAlchemy awaits them from its greenlet; nothing suspends)."""

    def __init__(self, cursor: sqlite3.Cursor) -> None:
        self._cursor = cursor

    async def __aenter__(self) -> InlineCursor:
        return self

    async def __aexit__(self, *_: object) -> None:
        self._cursor.close()

    @property
    def description(self) -> Any:
        return self._cursor.description

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    @property
    def lastrowid(self) -> int | None:
        return self._cursor.lastrowid

    @property
    def arraysize(self) -> int:
        return self._cursor.arraysize

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        self._cursor.arraysize = value

    async def execute(self, sql: str, parameters: Sequence[Any] | None = None) -> InlineCursor:
        self._cursor.execute(sql, () if parameters is None else parameters)
        return self

    async def executemany(self, sql: str, parameters: Sequence[Sequence[Any]]) -> InlineCursor:
        self._cursor.executemany(sql, parameters)
        return self

    async def fetchone(self) -> Any:
        return self._cursor.fetchone()

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        return self._cursor.fetchmany(self._cursor.arraysize if size is None else size)

    async def fetchall(self) -> list[Any]:
        return self._cursor.fetchall()

    async def close(self) -> None:
        self._cursor.close()


class _RunNow:
    """Stands in for aiosqlite's request queue, which SQLAlchemy's isolation-level setter
    feeds directly: run the request at once and resolve its future."""

    def put_nowait(self, item: tuple[asyncio.Future[Any], Callable[[], Any]]) -> None:
        future, function = item
        try:
            future.set_result(function())
        except Exception as exc:
            future.set_exception(exc)


class InlineConnection:
    """An aiosqlite-shaped connection that calls ``sqlite3`` in the calling thread."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._conn = connection
        self._connection: sqlite3.Connection | None = connection  # SQLAlchemy checks it
        self._tx = _RunNow()

    @property
    def sqlite_connection(self) -> sqlite3.Connection:
        """The ``sqlite3`` connection itself (app.services.hotpath runs statements on it)."""
        return self._conn

    @property
    def isolation_level(self) -> str | None:
        return self._conn.isolation_level

    def cursor(self) -> InlineCursor:
        return InlineCursor(self._conn.cursor())

    async def execute(self, sql: str, parameters: Sequence[Any] | None = None) -> InlineCursor:
        return await self.cursor().execute(sql, parameters)

    async def commit(self) -> None:
        self._conn.commit()

    async def rollback(self) -> None:
        self._conn.rollback()

    async def create_function(self, *args: Any, **kwargs: Any) -> None:
        self._conn.create_function(*args, **kwargs)

    async def close(self) -> None:
        self.stop()

    def stop(self) -> None:
        """Close now (SQLAlchemy's terminate)."""
        if self._connection is not None:
            self._connection = None
            self._conn.close()


async def connect_inline(path: Path, *, busy_seconds: float) -> InlineConnection:
    """Open ``path`` for the write thread (SQLAlchemy's ``async_creator``)."""
    return InlineConnection(
        sqlite3.connect(
            path,
            timeout=busy_seconds,
            isolation_level=None,
            check_same_thread=False,
            factory=LenientConnection,
        )
    )


class WriteScope(Protocol):
    """What the thread needs of its database (app.db.Database over ``connect_inline``)."""

    def write_transaction(self) -> AbstractAsyncContextManager[Any]:
        """A session in a write transaction, committed on exit."""

    async def dispose(self) -> None:
        """Close every connection."""


class WriteThread:
    """One thread with its own event loop, running whole transactions handed to it.
    ``make_scope`` builds the thread's database, once, on the thread's loop."""

    def __init__(self, make_scope: Callable[[], WriteScope]) -> None:
        self._make_scope = make_scope
        self._scope: WriteScope | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _ensure_started(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is not None:
                return self._loop
            ready = threading.Event()
            loop = asyncio.new_event_loop()

            def main() -> None:
                asyncio.set_event_loop(loop)
                ready.set()
                try:
                    loop.run_forever()
                finally:
                    loop.close()

            self._thread = threading.Thread(target=main, name="sqlite-writer", daemon=True)
            self._thread.start()
            ready.wait()
            self._loop = loop
            return loop

    async def run(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        """Run ``fn(session)`` in one write transaction on the thread; its result or error."""
        loop = self._ensure_started()
        future = asyncio.run_coroutine_threadsafe(self._transaction(fn), loop)
        return await asyncio.wrap_future(future)

    async def _transaction(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        if self._scope is None:
            self._scope = self._make_scope()
        async with self._scope.write_transaction() as session:
            return await fn(session)

    async def close(self) -> None:
        """Close the thread's connections and end the thread."""
        with self._lock:
            loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is None or thread is None:
            return
        if self._scope is not None:
            scope, self._scope = self._scope, None
            future = asyncio.run_coroutine_threadsafe(scope.dispose(), loop)
            with contextlib.suppress(Exception):  # best effort: the process is ending
                await asyncio.wait_for(asyncio.wrap_future(future), STOP_TIMEOUT_SECONDS)
        loop.call_soon_threadsafe(loop.stop)
        await in_own_thread(thread.join, STOP_TIMEOUT_SECONDS)
