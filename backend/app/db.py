"""Engines, sessions, SQLite pragmas, write transactions and the database's clock."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from weakref import WeakKeyDictionary, ref

from sqlalchemy import Interval, event, func, literal
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Connection, Dialect, make_url
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.pool import PoolResetState
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.visitors import InternalTraversal
from sqlalchemy.util import await_only  # 2.1's await_; this name is in 2.0 too

from app.models.types import UTCDateTime, utcnow
from app.services import faults, hotpath
from app.services.wakeups import CANCEL, Bell
from app.threads import in_own_thread

if TYPE_CHECKING:
    from app.sqlite_writer import WriteThread

logger = logging.getLogger("app.db")

#: How SQLite text becomes ``str``: UTF-8, with U+FFFD for bytes that are not. Python's
#: default decoding raised instead ("Could not decode to UTF-8 column 'kind'") and failed
#: the whole read: text that is not UTF-8, written by hand (``CAST(x'ff' AS TEXT)``, a
#: Latin-1 import), made every claim that met its row fail for ever, and the API answer
#: 503 for every page that held it. ~0.1 µs more a text value (the default is C's own).
LENIENT_TEXT = partial(str, encoding="utf-8", errors="replace")


class LenientConnection(sqlite3.Connection):
    """A sqlite3 connection that reads text with LENIENT_TEXT (``sqlite3.connect``'s
    ``factory``, so every way this project opens SQLite gets it)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.text_factory = LENIENT_TEXT


SQLITE_BUSY_TIMEOUT_MS = 5_000
PG_CONNECT_TIMEOUT_SECONDS = 3.0
PG_COMMAND_TIMEOUT_SECONDS = 30.0
#: How long opening a SQLite connection waits for a lock (its first pragmas): the busy
#: timeout, so that a file another process holds locked is answered within seconds (the
#: API's 503), as a statement's wait is.
SQLITE_CONNECT_TIMEOUT_SECONDS = SQLITE_BUSY_TIMEOUT_MS / 1000
_BEGIN_OPTION = "async_processor_begin"
#: ``run_write``'s ``here`` commits between two checkpoints of their own (Database.
#: _checkpoint_here). A one-row enqueue writes six or seven pages (the table's and its
#: indexes'), so the WAL stays near SQLite's own 1,000-page threshold.
HERE_CHECKPOINT_EVERY = 200
R = TypeVar("R")
_WAKE_KEY = "async_processor_wake"
_CANCEL_KEY = "async_processor_wake_cancel"


def is_sqlite_url(url: str | URL) -> bool:
    """True for any SQLite URL."""
    return make_url(url).get_backend_name() == "sqlite"


def sqlite_path(url: str | URL) -> Path | None:
    """The file behind a SQLite URL, or None for in-memory databases and other engines."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def absolute_sqlite_url(url: str | URL) -> URL:
    """A SQLite URL whose file path is absolute, resolved against the working directory
    now: whatever the engine derives from it later (the write thread's connections, the
    daemons' doorbells) then opens the same file after a chdir (a handler's). A relative
    path had made a daemon's new connections open an empty database in the handler's
    directory ("no such table", for ever) while its heartbeat, on an old connection, kept
    its leases alive."""
    parsed = make_url(url)
    path = sqlite_path(parsed)
    if path is None or path.is_absolute() or parsed.database.startswith("file:"):  # type: ignore[union-attr]
        return parsed
    absolute = os.path.abspath(path.expanduser())
    _GIVEN_AS[Path(absolute)] = str(path)
    return parsed.set(database=absolute)


#: The paths absolute_sqlite_url resolved, as they were given (messages about a missing file
#: say that it was taken relative to the working directory).
_GIVEN_AS: dict[Path, str] = {}


def sqlite_path_as_given(path: Path) -> str | None:
    """The relative text a resolved SQLite path was given as; None if it was absolute."""
    return _GIVEN_AS.get(path)


#: Bytes the WAL file is cut back to after a checkpoint lets it restart.
SQLITE_JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024


#: SQLite's synchronous settings a database may run with (SQLITE_SYNCHRONOUS). NORMAL, the
#: default: in WAL mode a commit survives any process's crash, but an OS crash or a power
#: loss may roll back the last commits. FULL syncs the WAL at every commit, and they
#: survive those too. (OFF could corrupt the database on a power loss: not offered.)
SQLITE_SYNCHRONOUS_MODES = ("NORMAL", "FULL", "EXTRA")


def _on_sqlite_connect(
    dbapi_connection: Any,
    _record: Any,
    synchronous: str = "NORMAL",
    foreign_keys: bool = True,
    *,
    patient: bool = True,
) -> None:
    """The project's pragmas; ``patient``: wait out a WAL switch that meets a lock (_wal),
    not for a connection that must never block (the event loop's own)."""
    # Take BEGIN away from the driver so that we can emit BEGIN IMMEDIATE ourselves.
    if synchronous not in SQLITE_SYNCHRONOUS_MODES:
        raise ValueError(f"synchronous must be one of {SQLITE_SYNCHRONOUS_MODES}")
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    if patient:
        _wal(cursor)
    else:
        cursor.execute("PRAGMA journal_mode=WAL")
    for pragma in (
        f"PRAGMA synchronous={synchronous}",
        f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}",
        f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}",
        # The WAL grows while a long reader (a backup, an operator's query, a VACUUM) holds
        # checkpoints back, and SQLite reuses the file without ever shrinking it: 180 MB
        # after a VACUUM stayed until a restart. Truncated to this when it next restarts.
        f"PRAGMA journal_size_limit={SQLITE_JOURNAL_SIZE_LIMIT}",
    ):
        cursor.execute(pragma)
    cursor.close()


#: Pause between tries of the WAL switch (_wal).
WAL_RETRY_SECONDS = 0.02


def _wal(cursor: Any) -> None:
    """``PRAGMA journal_mode=WAL``, tried again while SQLite says the database is locked,
    up to the busy timeout. Two processes opening a file that is not yet in WAL (two
    ``migrate`` runs on a new database) could meet where SQLite answers "database is locked"
    at once, without waiting for its busy handler; the second run then failed."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
        time.sleep(WAL_RETRY_SECONDS)  # only while a database file is being created


def _on_sqlite_begin(conn: Connection) -> None:
    # A deferred transaction that later writes fails at once with "database is locked",
    # whatever busy_timeout says; write transactions therefore take the lock up front.
    mode = conn.get_execution_options().get(_BEGIN_OPTION, "DEFERRED")
    if faults.seeded("begin_immediate"):  # test-only seeded bug (app.services.faults)
        mode = "DEFERRED"
    sql = f"BEGIN {mode}"
    driver: Any = conn.connection.driver_connection
    inline = getattr(driver, "sqlite_connection", None)
    try:
        if isinstance(inline, sqlite3.Connection):  # the write thread: sqlite3 itself
            inline.execute(sql)
        elif hotpath.is_aiosqlite(driver):
            # One trip to aiosqlite's thread; through a cursor (exec_driver_sql) it is three:
            # open, execute, close.
            await_only(driver.execute_fetchall(sql))
        else:
            conn.exec_driver_sql(sql)
    except sqlite3.Error as error:
        # SQLAlchemy wraps errors of its own BEGIN, not of this event's: as session.execute
        # would raise it ("database is locked" after busy_timeout is an OperationalError).
        raise sa_exc.DBAPIError.instance(
            sql, None, error, sqlite3.Error, dialect=conn.dialect
        ) from error


def _on_sqlite_reset(_dbapi_connection: Any, record: Any, state: PoolResetState) -> None:
    # Replaces the pool's rollback-on-return, which SQLAlchemy skips only when the
    # connection is closed with its transaction still open: after every commit it would
    # send a ROLLBACK, one more trip to aiosqlite's thread. Roll back only what SQLite says
    # is open (sqlite3's in_transaction is the library's own autocommit flag).
    # On aiosqlite, a call its caller stopped waiting for (cancelled: a request's client
    # gone, a timeout) may still be queued on the connection's thread, a BEGIN among them:
    # it opens a transaction after this check, and the next checkout's BEGIN failed with
    # "cannot start a transaction within a transaction". The ROLLBACK then goes too, queued
    # behind it (a no-op where nothing is open); only OneTripConnection knows it is idle.
    if state.terminate_only or not state.asyncio_safe or state.transaction_was_reset:
        return
    driver = record.driver_connection
    inline = getattr(driver, "sqlite_connection", None)
    if isinstance(inline, sqlite3.Connection):  # the write thread's: every call synchronous
        busy = inline.in_transaction
    else:
        busy = not getattr(driver, "idle", False) or getattr(driver, "in_transaction", True)
    if busy:
        record.dbapi_connection.rollback()


#: A pooled PostgreSQL connection idle longer than this is pinged before it is handed out;
#: one used more recently is trusted (HikariCP's aliveBypassWindowMs, 500 ms, is the same
#: rule). A server that closed the socket is noticed without a ping (asyncpg's is_closed).
PG_PING_AFTER_IDLE_SECONDS = 0.5
_LAST_USED = "async_processor_last_used"


def _mark_used(_dbapi_connection: Any, record: Any, *_: Any) -> None:
    record.info[_LAST_USED] = time.monotonic()


def _on_pg_checkout(_dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    """Pre-ping, cheaper: SQLAlchemy's asyncpg ping is BEGIN, ``;``, ROLLBACK (three round
    trips) on every checkout, the same count as the one-INSERT transaction it precedes.
    This one is free for a connection asyncpg knows is closed, and one round trip
    (``SELECT 1`` outside any transaction) only after PG_PING_AFTER_IDLE_SECONDS idle. A dead
    connection invalidates the pool (a restarted server closed them all) and the pool
    retries with a new one, as with pool_pre_ping."""
    driver = record.driver_connection
    if driver.is_closed():
        raise sa_exc.InvalidatePoolError("the server closed the connection")
    if time.monotonic() - record.info.get(_LAST_USED, 0.0) <= PG_PING_AFTER_IDLE_SECONDS:
        return
    from asyncpg import InterfaceError, PostgresError  # the postgres extra; loaded by now

    try:  # no arguments: the simple query protocol, one round trip
        await_only(driver.execute("SELECT 1", timeout=PG_CONNECT_TIMEOUT_SECONDS))
    except (OSError, TimeoutError, InterfaceError, PostgresError) as error:
        raise sa_exc.InvalidatePoolError(f"ping failed: {error!r}") from error


#: SQLite reader threads of a Database (``read_alone(scans=True)``), each with its own bare
#: connection.
READ_THREADS = 4
#: How long a scanning read may hold the event loop's thread before it is interrupted and
#: read on a reader thread instead (the hop costs ~0.4 ms of CPU and latency a read on a
#: 2-core VM: most polls end well within this), and how many SQLite VM steps run between
#: two looks at the clock.
LOOP_READ_BUDGET_SECONDS = 0.002
BUDGET_STEPS = 1000


class _TooLong(Exception):
    """A read on the event loop's thread ran past its budget and was interrupted."""


def _busy(error: sqlite3.OperationalError) -> bool:
    """SQLITE_BUSY or SQLITE_LOCKED: another connection holds what this one needs."""
    return "locked" in str(error) or "busy" in str(error)


class _HereWriter:
    """SQLite: ``Database.run_write``'s ``here`` transactions (and ``read_alone``'s
    reads), on the calling thread, on a bare ``sqlite3`` connection of its own per
    thread. It never waits for the write lock (busy_timeout 0: a lock held elsewhere is
    reported at once, and the caller takes the usual path) and its commits never run a
    checkpoint (milliseconds of I/O on the event loop): the other connections' commits
    run them, or Database._checkpoint_here."""

    def __init__(self, path: Path, dialect: Dialect, synchronous: str = "NORMAL") -> None:
        self._path = path
        self._dialect = dialect
        self._synchronous = synchronous
        self._connections: dict[int, sqlite3.Connection] = {}
        self._checkpointing: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        thread = threading.get_ident()
        conn = self._connections.get(thread)
        if conn is None:
            conn = sqlite3.connect(
                self._path,
                timeout=0,
                isolation_level=None,
                check_same_thread=False,
                factory=LenientConnection,
            )
            try:
                _on_sqlite_connect(conn, None, self._synchronous, patient=False)
                conn.execute("PRAGMA busy_timeout=0")
                conn.execute("PRAGMA wal_autocheckpoint=0")
            except BaseException:
                conn.close()
                raise
            self._connections[thread] = conn
        return conn

    def run(self, fn: Callable[[sqlite3.Connection, Dialect], R]) -> tuple[bool, R | None]:
        """(True, result) when ``fn`` ran and committed; (False, None) when the write lock
        was taken (BEGIN IMMEDIATE failed at once: nothing ran, nothing to undo)."""
        mode = "DEFERRED" if faults.seeded("begin_immediate") else "IMMEDIATE"
        sql = f"BEGIN {mode}"
        try:
            conn = self._connection()
            conn.execute(sql)
        except sqlite3.OperationalError as error:
            if _busy(error):
                return False, None
            raise hotpath.sqlite3_error(error, sql, self._dialect) from error
        except sqlite3.Error as error:
            raise hotpath.sqlite3_error(error, sql, self._dialect) from error
        try:
            result = fn(conn, self._dialect)
            sql = "COMMIT"
            conn.execute(sql)
        except BaseException as error:
            self._roll_back(conn)
            if isinstance(error, sqlite3.Error):
                raise hotpath.sqlite3_error(error, sql, self._dialect) from error
            raise
        return True, result

    def read(
        self, statement: Any, params: Mapping[str, Any], *, budget: float | None = None
    ) -> list[Any] | None:
        """One SELECT on this thread's bare connection, as a read transaction of its own.
        None when SQLite answered busy (a reader waits for nothing in WAL mode, save a
        recovery or an exclusive lock elsewhere): the caller reads the usual way, which
        waits. ``budget`` (seconds): SQLite interrupts the statement once it has run that
        long, and _TooLong is raised (nothing was written: it only read)."""
        try:
            conn = self._connection()
        except sqlite3.OperationalError as error:
            if _busy(error):
                return None
            raise hotpath.sqlite3_error(error, "connect", self._dialect) from error
        except sqlite3.Error as error:
            raise hotpath.sqlite3_error(error, "connect", self._dialect) from error
        if budget is not None:
            deadline = time.perf_counter() + budget
            conn.set_progress_handler(lambda: time.perf_counter() > deadline, BUDGET_STEPS)
        try:
            return hotpath.sqlite3_fetch(conn, self._dialect, statement, params)
        except sa_exc.OperationalError as error:
            if isinstance(error.orig, sqlite3.OperationalError):
                if budget is not None and "interrupted" in str(error.orig):
                    raise _TooLong from None
                if _busy(error.orig):
                    return None
            raise
        finally:
            if budget is not None:
                conn.set_progress_handler(None, 0)

    def _roll_back(self, conn: sqlite3.Connection) -> None:
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        except sqlite3.Error:  # a connection that cannot roll back is not used again
            self._close(conn)

    def _close(self, conn: sqlite3.Connection) -> None:
        for thread, known in list(self._connections.items()):
            if known is conn:
                del self._connections[thread]
        with contextlib.suppress(sqlite3.Error):
            conn.close()

    def checkpoint(self) -> None:
        """One PASSIVE checkpoint (it waits for nobody), on a connection of its own; called
        on one thread at a time. Raises sqlite3.Error when it could not run (the
        connection is then closed, and opened again by the next one)."""
        try:
            if self._checkpointing is None:
                self._checkpointing = sqlite3.connect(
                    self._path, timeout=0, isolation_level=None, check_same_thread=False
                )
            self._checkpointing.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error:
            if self._checkpointing is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._checkpointing.close()
                self._checkpointing = None
            raise

    def close(self) -> None:
        """Close every thread's connection (no checkpoint may be running)."""
        for conn in list(self._connections.values()):
            self._close(conn)
        if self._checkpointing is not None:
            with contextlib.suppress(sqlite3.Error):
                self._checkpointing.close()
            self._checkpointing = None


def make_engine(
    url: str | URL,
    *,
    pool_size: int = 5,
    echo: bool = False,
    pre_ping: bool = True,
    inline: bool = False,
    create_folder: bool = False,
    sqlite_synchronous: str = "NORMAL",
    migrating: bool = False,
) -> AsyncEngine:
    """An async engine for sqlite+aiosqlite or postgresql+asyncpg, configured for the queue.

    ``pre_ping`` tests a pooled PostgreSQL connection before use when it has been idle
    (_on_pg_checkout). The daemon turns it off: its loops retry transient errors anyway, and
    a dead connection costs it one failed transaction, not a failed user request.
    ``inline`` (SQLite files): connections call sqlite3 in the calling thread instead of
    aiosqlite's (only for the write thread of app.sqlite_writer). Otherwise a SQLite file
    is opened with app.sqlite_conn's one-trip cursors (one hand-off to aiosqlite's thread
    a statement instead of four).
    ``create_folder`` (SQLite files): make the file's folder if it is missing, as
    ``migrate`` does; other commands only read and say that no database is there (a typo
    in the path left a root-owned folder behind). ``migrating`` (migrations/env.py): no
    statement timeout on PostgreSQL (an index build may take minutes; the migration sets
    a lock timeout instead), and SQLite's foreign keys off (a batch-mode table rebuild
    drops the old table, and ON DELETE CASCADE would take the notifications with it; the
    migration runs foreign_key_check before it commits).
    """
    if is_sqlite_url(url):
        url = absolute_sqlite_url(url)
        path = sqlite_path(url)
        if create_folder and path is not None and not path.as_posix().startswith("file:"):
            path.expanduser().parent.mkdir(parents=True, exist_ok=True)
        if inline and path is not None:
            from app.sqlite_writer import connect_inline

            engine = create_async_engine(
                url,
                echo=echo,
                pool_size=1,
                pool_reset_on_return=None,  # _on_sqlite_reset
                async_creator=partial(  # absolute, once, now: a handler's chdir cannot move it
                    connect_inline,
                    Path(os.path.abspath(path.expanduser())),
                    busy_seconds=SQLITE_CONNECT_TIMEOUT_SECONDS,
                ),
            )
        elif path is not None and not make_url(url).query:
            from app.sqlite_conn import connect_one_trip

            engine = create_async_engine(
                url,
                echo=echo,
                pool_size=pool_size,
                pool_reset_on_return=None,  # _on_sqlite_reset
                async_creator=partial(  # absolute, as the dialect makes it: once, now
                    connect_one_trip,
                    Path(os.path.abspath(path.expanduser())),
                    busy_seconds=SQLITE_CONNECT_TIMEOUT_SECONDS,
                ),
            )
        else:  # in memory, or a URL with options (a file: URI): aiosqlite as SQLAlchemy opens it
            engine = create_async_engine(
                url,
                echo=echo,
                pool_size=pool_size,
                pool_reset_on_return=None,  # _on_sqlite_reset
                connect_args={
                    "timeout": SQLITE_CONNECT_TIMEOUT_SECONDS,
                    "factory": LenientConnection,
                },
            )
        event.listen(
            engine.sync_engine,
            "connect",
            partial(_on_sqlite_connect, synchronous=sqlite_synchronous, foreign_keys=not migrating),
        )
        event.listen(engine.sync_engine, "begin", _on_sqlite_begin)
        event.listen(engine.sync_engine, "reset", _on_sqlite_reset)
        return engine
    engine = create_async_engine(
        url,
        echo=echo,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_timeout=PG_CONNECT_TIMEOUT_SECONDS,
        connect_args={
            "timeout": PG_CONNECT_TIMEOUT_SECONDS,
            "command_timeout": None if migrating else PG_COMMAND_TIMEOUT_SECONDS,
            "server_settings": {"application_name": "async-processor"},
        },
    )
    if pre_ping:
        for name in ("connect", "checkin"):
            event.listen(engine.sync_engine, name, _mark_used)
        event.listen(engine.sync_engine, "checkout", _on_pg_checkout)
    return engine


def _file_identity(path: Path | None) -> tuple[int, int] | None:
    """A file's (device, inode), or None when it does not exist (or no file is meant)."""
    if path is None:
        return None
    try:
        found = os.stat(path)
    except OSError:
        return None
    return (found.st_dev, found.st_ino)


class Database:
    """An engine plus its session factories: reads, and writes that lock up front.

    ``write_thread`` (SQLite files; the daemon): ``run_write`` runs each transaction whole on
    a thread of its own (app.sqlite_writer), one hand-off instead of one per driver call.
    """

    def __init__(
        self, engine: AsyncEngine, *, write_thread: bool = False, sqlite_synchronous: str = "NORMAL"
    ) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self.sessionmaker = async_sessionmaker(engine, expire_on_commit=False)
        self.write_sessionmaker = async_sessionmaker(
            engine.execution_options(**{_BEGIN_OPTION: "IMMEDIATE"}), expire_on_commit=False
        )
        # SQLite has one writer at a time. Writers of this process queue on an asyncio lock
        # instead of on SQLite's busy handler, which sleeps in growing steps (1, 2, 5, 10 …
        # ms) between retries: the next writer starts the moment the previous commits.
        self._write_locks: WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] | None = (
            WeakKeyDictionary() if self.dialect == "sqlite" else None
        )
        # The last loop's lock, looked up without making a weak reference (every SQLite
        # write asks; the dictionary's lookup made one each time).
        self._last_lock: tuple[ref[asyncio.AbstractEventLoop], asyncio.Lock] | None = None
        path = sqlite_path(engine.url)
        # Absolute, as the engine's connections open it: a later chdir (a handler's) must
        # not make this point at another file (file_problem, the doorbells).
        self.sqlite_file = None if path is None else Path(os.path.abspath(path.expanduser()))
        self._file_id = _file_identity(self.sqlite_file)
        self._writer: WriteThread | None = None
        # Not for URLs with options (a file: URI, mode=ro …): sqlite3.connect(path) would
        # not open the same database the engine does.
        self._here = None
        self._here_commits = 0
        self._checkpointer: ThreadPoolExecutor | None = None
        self._readers: ThreadPoolExecutor | None = None  # read_alone(scans=True), SQLite
        self._checkpoint_guard = threading.Lock()  # event loops of several threads
        self._checkpoint_running: asyncio.Future[None] | None = None
        self._closed = False
        if path is not None and not engine.url.query:  # absolute now, as the engine's
            self._here = _HereWriter(
                Path(os.path.abspath(path.expanduser())), engine.dialect, sqlite_synchronous
            )
        if write_thread and path is not None:
            from app.sqlite_writer import WriteThread

            def writer_database() -> Database:
                inline = make_engine(engine.url, inline=True, sqlite_synchronous=sqlite_synchronous)
                return Database(inline, sqlite_synchronous=sqlite_synchronous)

            self._writer = WriteThread(writer_database)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        pool_size: int = 5,
        pre_ping: bool = True,
        write_thread: bool = False,
        sqlite_synchronous: str = "NORMAL",
    ) -> Database:
        """Build the engine for ``url`` and wrap it (``sqlite_synchronous``: the
        SQLITE_SYNCHRONOUS setting, for SQLite)."""
        engine = make_engine(
            url, pool_size=pool_size, pre_ping=pre_ping, sqlite_synchronous=sqlite_synchronous
        )
        return cls(engine, write_thread=write_thread, sqlite_synchronous=sqlite_synchronous)

    async def run_write(
        self,
        fn: Callable[[AsyncSession], Awaitable[R]],
        *,
        here: Callable[[sqlite3.Connection, Dialect], R] | None = None,
    ) -> R:
        """``await fn(session)`` in one write transaction, committed when it returns.

        With the write thread, ``fn`` runs on that thread's event loop: it must not touch
        this loop's objects (events, futures, tasks); plain data in and out.

        ``here`` (SQLite files): the same transaction written for a bare ``sqlite3``
        connection, for a short one that is waited for (the claim of a job just enqueued).
        It is tried first, on this thread, inside BEGIN IMMEDIATE … COMMIT on a connection
        that never waits for the lock; only when another process holds the lock does
        ``fn`` run instead, the usual way, which may wait. It saves the session's work
        around two statements (~0.6 ms) and the write thread's two hand-offs (~0.3 ms
        each on a 2-core VM after an idle spell).
        """
        if self._write_locks is None:
            async with self.write_transaction() as session:
                return await fn(session)
        async with self._write_lock():
            if here is not None and self._here is not None and hotpath.ENABLED and not self._closed:
                # (After dispose() the usual path: no bare connection is opened again.)
                if self._here_commits >= HERE_CHECKPOINT_EVERY and self._writer is None:
                    # Before this transaction, never after a commit: a cancellation while
                    # it runs then leaves nothing written by this call.
                    await self._checkpoint_here()
                done, result = self._here.run(here)
                if done:
                    self._here_commits += 1
                    return result  # type: ignore[return-value]
            if self._writer is not None:
                return await self._writer.run(fn)
            async with self._immediate() as session:
                return await fn(session)

    async def write_if_free(self, here: Callable[[sqlite3.Connection, Dialect], R]) -> bool:
        """SQLite files: ``here`` in a write transaction on the bare connection, only when
        neither this process nor another holds the write lock right now; False when it
        was skipped (it never waits, and never delays this process's other writers)."""
        if self._write_locks is None or self._here is None or self._closed:
            return False
        lock = self._write_lock()
        if lock.locked():
            return False
        async with lock:
            done, _ = self._here.run(here)
        return done

    async def read_alone(
        self, statement: Any, params: Mapping[str, Any], *, scans: bool = False
    ) -> list[Any] | None:
        """The rows of one Core SELECT, read on the bare driver in a transaction of its own:
        SQLite files on a bare ``sqlite3`` connection, PostgreSQL autocommitted on a pooled
        asyncpg connection. A session's read costs ~0.8 ms of SQLAlchemy work on a 2-core
        VM, the most of a small API request (the token lookup). None where this way does
        not apply (another driver, the hot path off, SQLite busy): the caller reads through
        ``read_transaction`` instead.

        SQLite: a lookup by a unique key runs on this thread (tens of microseconds). A read
        whose work grows with the data (``scans``: a feed page, a count) runs here too
        while it stays within LOOP_READ_BUDGET_SECONDS, which nearly every one does; one
        that runs longer is interrupted and read again on a reader thread, as the
        session's driver thread would, so that a large one never holds the event loop
        (an unread count over 200,000 notifications, an admin's over every user's)."""
        if not hotpath.ENABLED or self._closed:
            return None
        if self.dialect == "postgresql":
            return await hotpath.fetch_autocommit_pooled(self.engine, statement, params)
        if self._here is None:
            return None
        if not scans:
            return self._here.read(statement, params)
        try:
            return self._here.read(statement, params, budget=LOOP_READ_BUDGET_SECONDS)
        except _TooLong:
            pass  # a large one: again, on a reader thread
        with self._checkpoint_guard:
            if self._closed:
                return None
            if self._readers is None:
                self._readers = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="sqlite-read")
            readers = self._readers
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(readers, self._here.read, statement, params)

    async def _checkpoint_here(self) -> None:
        """The bare connection's commits never checkpoint (I/O on the event loop). Without
        the write thread, whose commits do, after every HERE_CHECKPOINT_EVERY of them this
        Database checkpoints on a thread of its own while it holds its write lock (on this
        event loop): a checkpoint running beside writers never catches up with them, and
        the WAL restarts from its beginning only after one that did (SQLite's own
        automatic checkpoint also runs in the committing connection). Best effort: a
        failure is logged (a WARNING) and the next try comes after as many commits again,
        never an enqueue's error."""
        with self._checkpoint_guard:
            if self._here is None or self._closed:
                return
            if self._checkpointer is None:
                self._checkpointer = ThreadPoolExecutor(1, thread_name_prefix="sqlite-checkpoint")
            checkpointer = self._checkpointer
        loop = asyncio.get_running_loop()
        running = self._checkpoint_running
        if running is None or running.done() or running.get_loop() is not loop:
            try:
                running = loop.run_in_executor(checkpointer, self._here.checkpoint)
            except RuntimeError as error:  # the executor shut down by dispose()
                logger.debug("checkpoint skipped: %s", error)
                return
            running.add_done_callback(self._checkpointed)
            self._checkpoint_running = running
        # Shielded: a caller cut short leaves the checkpoint to finish (and count) on its
        # own; the next transaction waits for it instead of starting another.
        with contextlib.suppress(Exception):  # logged by _checkpointed
            await asyncio.shield(running)

    def _checkpointed(self, done: asyncio.Future[None]) -> None:
        """A checkpoint ended (on this event loop): count again from zero, after a failure
        too (one that cannot run would otherwise be tried before every transaction)."""
        if done.cancelled():
            return
        self._here_commits = 0
        error = done.exception()
        if error is not None:
            logger.warning(
                "checkpoint of %s failed (%r); the next try in %d commits",
                self.sqlite_file,
                error,
                HERE_CHECKPOINT_EVERY,
            )

    def _write_lock(self) -> asyncio.Lock:
        if self._write_locks is None:
            raise RuntimeError("one writer at a time is a SQLite rule; PostgreSQL has no lock")
        loop = asyncio.get_running_loop()
        last = self._last_lock
        if last is not None and last[0]() is loop:
            return last[1]
        lock = self._write_locks.get(loop)
        if lock is None:
            lock = self._write_locks[loop] = asyncio.Lock()
        self._last_lock = (ref(loop), lock)
        return lock

    @asynccontextmanager
    async def write_transaction(self) -> AsyncIterator[AsyncSession]:
        """A session in a write transaction (BEGIN IMMEDIATE on SQLite); commits on exit."""
        if self._write_locks is None:
            async with self.write_sessionmaker() as session, session.begin():
                yield session
            return
        async with self._write_lock(), self._immediate() as session:
            yield session

    @asynccontextmanager
    async def _immediate(self) -> AsyncIterator[AsyncSession]:
        """SQLite: a session in BEGIN IMMEDIATE (the caller holds this process's lock)."""
        async with self.write_sessionmaker() as session, session.begin():
            # Take the write lock now, before the caller builds statements: SQLite's
            # clock is bound into them (now_sql), and must not predate a wait for it.
            await session.connection()
            yield session

    @asynccontextmanager
    async def read_transaction(self) -> AsyncIterator[AsyncSession]:
        """A session in a read transaction; rolled back on exit."""
        async with self.sessionmaker() as session:
            yield session

    def wake_daemons(self) -> None:
        """SQLite: ring the daemons' doorbells after committing new work outside a session
        (a session's enqueue rings them itself, at its commit). PostgreSQL: nothing to do,
        the insert trigger's NOTIFY wakes them."""
        if self.sqlite_file is not None:
            ring_daemons(self.sqlite_file)

    def file_problem(self) -> str | None:
        """SQLite: what is wrong when the database file this process opened was deleted or
        replaced under it (a restore by `mv`, an `rm`): its connections go on reading and
        writing the old file, which no one else sees, silently. None when all is well (or
        no file is meant); the first file seen is the one expected."""
        if self.sqlite_file is None:
            return None
        now = _file_identity(self.sqlite_file)
        if self._file_id is None:
            self._file_id = now
            return None
        if now is None:
            return f"the database file {self.sqlite_file} was deleted while this process ran"
        if now != self._file_id:
            return f"the database file {self.sqlite_file} was replaced while this process ran"
        return None

    async def dispose(self) -> None:
        """Close every pooled connection (and the write thread)."""
        if self._writer is not None:
            await self._writer.close()
        with self._checkpoint_guard:
            self._closed = True
            checkpointer, self._checkpointer = self._checkpointer, None
            readers, self._readers = self._readers, None
        if checkpointer is not None:
            await in_own_thread(checkpointer.shutdown)  # a checkpoint may be running
        if readers is not None:
            await in_own_thread(readers.shutdown)  # reads may be running
        if self._here is not None:
            self._here.close()
        await self.engine.dispose()


def wake_daemons_at_commit(session: AsyncSession, *, cancel: bool = False) -> None:
    """Ring the SQLite daemons' doorbells once this write transaction commits (new work
    to claim; with ``cancel``, a running job's cancel flag set), whoever owns the session:
    ours, or an application's own. PostgreSQL's equivalent is NOTIFY, sent in the
    transaction itself."""
    bind = session.get_bind()
    path = _doorbell_path(bind.engine.url if isinstance(bind, Connection) else bind.url)
    if path is not None:
        session.info[_WAKE_KEY] = path
        if cancel:
            session.info[_CANCEL_KEY] = True


@functools.lru_cache(maxsize=64)
def _doorbell_path(url: URL) -> Path | None:
    """The SQLite file whose daemons a commit on ``url`` wakes (parsed once per URL: every
    enqueue in a session asks, and parsing it was ~9 % of such an enqueue's own time)."""
    path = sqlite_path(url)
    return None if path is None else path.expanduser()


_BELLS: dict[Path, Bell] = {}  # one per SQLite file, for the process's lifetime


def ring_daemons(path: Path, message: bytes = b"") -> None:
    """Ring the doorbells of the daemons on the SQLite file ``path`` (work was committed;
    ``message`` as for ``Bell.ring``). Best effort, and never an error out of a commit that
    succeeded."""
    try:
        bell = _BELLS.get(path)
        if bell is None:
            bell = _BELLS[path] = Bell(path)
        bell.ring(message)
    except Exception as exc:  # pragma: no cover - the bell only saves a poll
        logger.warning("could not ring the daemons' doorbell for %s (%s)", path, exc)


@event.listens_for(Session, "after_commit")
def _ring_after_commit(session: Session) -> None:
    path = session.info.pop(_WAKE_KEY, None)
    cancel = session.info.pop(_CANCEL_KEY, False)
    if path is not None:
        ring_daemons(path, CANCEL if cancel else b"")


@event.listens_for(Session, "after_soft_rollback")
def _forget_wake(session: Session, previous_transaction: Any) -> None:
    if previous_transaction.parent is None:  # the whole transaction, not a savepoint
        session.info.pop(_WAKE_KEY, None)
        session.info.pop(_CANCEL_KEY, None)


#: SQLSTATEs worth retrying besides unavailability (``database_unavailable``): the same
#: work tried again may well not meet them (a deadlock, a serialization failure, a timeout).
TRANSIENT_SQLSTATES = frozenset(
    {
        "40001",  # serialization failure
        "40P01",  # deadlock detected
        "40003",  # statement completion unknown
        "55P03",  # lock not available
        "57014",  # statement cancelled (statement_timeout, pg_cancel_backend)
        "25P03",  # idle-in-transaction session timeout: the connection was ended
        "25P04",  # transaction timeout (PostgreSQL 17)
        "25006",  # read-only transaction: a failover to a standby in progress
    }
)


def database_unavailable(exc: BaseException) -> bool:
    """Whether a driver error says the database cannot serve anyone right now, rather than
    that a statement was wrong: PostgreSQL's SQLSTATE classes 08 (connection), 53 (out of
    connections or resources), 57P (shutting down, restarting, not accepting connections
    yet), 28 (the login refused) and 3D000 (the database is gone), and 55000 when it says
    the database is not accepting connections (``ALLOW_CONNECTIONS false``). asyncpg's
    errors for these reach SQLAlchemy as a plain DBAPIError, not an OperationalError."""
    code = sqlstate(exc)
    if code is None:
        return False
    if code.startswith(("08", "53", "57P", "28")) or code == "3D000":
        return True
    return code == "55000" and "accepting connections" in str(exc)


def login_refused(exc: BaseException) -> bool:
    """PostgreSQL refused the login itself: a wrong user or password (SQLSTATE class 28) or
    no such database (3D000). Transient in a running process (a password rotation, a
    restore), a setting to fix in one that is starting."""
    code = sqlstate(exc)
    return code is not None and (code.startswith("28") or code == "3D000")


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE a driver error carries: SQLAlchemy's wrapper's original's, or a bare
    asyncpg error's own (the hot path may meet one); None for errors without one."""
    orig = getattr(exc, "orig", None)
    code = getattr(exc if orig is None else orig, "sqlstate", None)
    return code if isinstance(code, str) else None


def dialect_of(session: AsyncSession) -> str:
    """The dialect name ("sqlite" or "postgresql") of a session's bind."""
    if isinstance(session, AsyncConnection):
        return session.dialect.name
    return session.get_bind().dialect.name


def now_sql(dialect: str, now: datetime | None = None) -> ColumnElement[datetime]:
    """The database's clock as a SQL expression (``now`` pins it, for tests).

    PostgreSQL: ``now()``, so daemons on hosts with different clocks agree. SQLite is
    embedded: the database's clock is this host's clock, bound as a parameter.
    """
    if now is not None:
        return literal(now, UTCDateTime())
    if dialect == "postgresql":
        return func.now()
    return literal(utcnow(), UTCDateTime())


def later_sql(dialect: str, seconds: float, now: datetime | None = None) -> ColumnElement[datetime]:
    """The database's clock plus ``seconds``, as a SQL expression."""
    delta = timedelta(seconds=seconds)
    if now is None and dialect == "postgresql":
        return func.now() + literal(delta, Interval())
    return literal((now or utcnow()) + delta, UTCDateTime())


class Unindexed(ColumnElement[Any]):
    """A column the planner must not search an index of: ``+column`` on SQLite (its way
    to keep a term off an index), the column itself elsewhere. SQLite plans without
    statistics, so an equality on an indexed column looks cheapest to it even where that
    index holds every finished row (``kind = ?`` through ``(kind, id)`` read a kind's whole
    history); PostgreSQL weighs it with its statistics."""

    inherit_cache = True
    _traverse_internals = [("column", InternalTraversal.dp_clauseelement)]  # noqa: RUF012

    def __init__(self, column: ColumnElement[Any]) -> None:
        self.column = column
        self.type = column.type

    @property
    def _from_objects(self) -> list[Any]:  # its column's table, for a SELECT of it alone
        return self.column._from_objects


@compiles(Unindexed)
def _unindexed(element: Unindexed, compiler: SQLCompiler, **kw: Any) -> str:
    return compiler.process(element.column, **kw)


@compiles(Unindexed, "sqlite")
def _unindexed_sqlite(element: Unindexed, compiler: SQLCompiler, **kw: Any) -> str:
    return "+" + compiler.process(element.column, **kw)


class UnindexedText(Unindexed):
    """``Unindexed`` for a text column compared by equality, kept off its indexes on
    PostgreSQL too: ``(column || '')``. PostgreSQL's statistics can mislead it as well: a
    due pick of a flow-limited kind, one scan per priority each estimated at a few rows,
    was planned as a BitmapAnd of the pending index with the kind's ``(kind, id)`` index,
    which holds the kind's whole history (60,000 finished rows: 30-46 ms a pick in the
    custom plans a prepared statement starts with, against ~1 ms)."""

    inherit_cache = True


@compiles(UnindexedText, "postgresql")
def _unindexed_text_pg(element: UnindexedText, compiler: SQLCompiler, **kw: Any) -> str:
    return f"({compiler.process(element.column, **kw)} || '')"
