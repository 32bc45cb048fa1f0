"""Driver-level execution of the daemon's hottest statements.

The claim, the completer's locking SELECT and batch UPDATEs, and the notifications INSERT
run for every job. Through ``session.execute`` each costs ~0.2 ms of SQLAlchemy work (an
ORM execute state, an execution context, bind and result processing through several
layers, a Result) against ~0.015 ms for the same statement on the bare driver; for a
claim-and-complete transaction of 10 jobs that overhead was most of the transaction.

Here a Core statement (the same object queue.py builds) is compiled **once per dialect**
by SQLAlchemy; each call binds its parameters with the column types' own bind processors,
runs the SQL on the session's driver connection (sqlite3, aiosqlite or asyncpg) inside the
session's transaction, and reads rows with the types' result processors. SQL, types and
transaction are SQLAlchemy's; only the per-call layers are skipped. Driver errors are
translated to SQLAlchemy's exceptions (``sqlalchemy.exc.OperationalError`` …) with the
disconnect flag set, as ``session.execute`` would raise them.

Anything this module does not know (another driver, ``ENABLED`` off) goes through
``session.execute``: tests run the conformance suite both ways.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import sys
import time
from collections import namedtuple
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import CursorResult, Dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.sql import Select
from sqlalchemy.util.concurrency import await_only, greenlet_spawn

#: Off: every statement goes through ``session.execute`` (tests compare both paths).
ENABLED = True

#: Each position's parameter name, bind processor, and the last earlier position whose
#: processor is the same (a shared type's, see _type_key), or -1.
_Binder = list[tuple[str, Callable[[Any], Any] | None, int]]
Watcher = Callable[[str, Any, float], None]
_WATCHERS: list[Watcher] = []
_MAX_SHAPES = 64  # expanded IN-list sizes kept per statement


class Prepared:
    """One Core statement, compiled for one dialect, with its bind and result processors."""

    def __init__(
        self, statement: Any, dialect: Dialect, column_keys: Sequence[str] | None = None
    ) -> None:
        self.statement = statement
        self.dialect = dialect
        self._compiled = statement.compile(dialect=dialect, column_keys=column_keys)
        if self._compiled.prefetch:  # Python-side defaults: SQLAlchemy computes them per call
            raise TypeError("statements with Python-side column defaults are not supported")
        self._binds = self._compiled.binds
        self._expanding: list[str] = sorted(n for n, b in self._binds.items() if b.expanding)
        if any(b.literal_execute for b in self._binds.values()):
            raise TypeError("literal_execute parameters are not supported on the hot path")
        self._defaults = {
            name: bind.effective_value
            for name, bind in self._binds.items()
            if not bind.required and not bind.expanding
        }
        self._shapes: dict[tuple[int, ...], tuple[str, _Binder, dict[str, list[str]]]] = {}
        if not self._expanding:
            self._shapes[()] = (self._compiled.string, self._binder(self._compiled.positiontup), {})
        columns = (
            statement.selected_columns
            if isinstance(statement, Select)
            else statement.exported_columns
        )
        names: list[str] = [str(c.key) for c in columns]
        self.row: Any = namedtuple("Row", names, rename=True)  # type: ignore[misc]
        procs = [_result_processor(c.type, dialect) for c in columns]
        self._result = procs if any(procs) else None

    def _binder(
        self,
        positions: Sequence[str] | None,
        expanded: Mapping[str, Callable[[Any], Any]] | None = None,
    ) -> _Binder:
        """Each position's parameter name and processor: a bind's own type's, or, for the
        members of an expanded IN list, the one SQLAlchemy's expansion gave it (none for
        plain integers). Positions of a type that declares ``shares_bind_processor`` share
        one processor per type and point back at the previous such position, so ``bind``
        processes a value repeated there (an enqueue's three clock parameters) once."""
        if positions is None:
            raise TypeError(f"{self.dialect.name}: only positional paramstyles are supported")
        binder: _Binder = []
        shared: dict[Any, tuple[Callable[[Any], Any], int]] = {}
        for i, name in enumerate(positions):
            bind = self._binds.get(name)
            if bind is not None and not bind.expanding:
                impl = bind.type.dialect_impl(self.dialect)
                proc = impl.bind_processor(self.dialect)
                key = _type_key(impl)
                if proc is not None and key is not None:
                    proc, before = shared.get(key, (proc, -1))
                    shared[key] = (proc, i)
                    binder.append((name, proc, before))
                    continue
            elif expanded is not None:
                proc = expanded.get(name)
            else:
                raise KeyError(name)
            binder.append((name, proc, -1))
        return binder

    def _shape(self, params: Mapping[str, Any]) -> tuple[str, _Binder, dict[str, list[str]]]:
        key = tuple(len(params[name]) for name in self._expanding)
        shape = self._shapes.get(key)
        if shape is None:
            sample = {**self._defaults, **params}
            state = self._compiled.construct_expanded_state(sample)
            binder = self._binder(state.positiontup, state.processors)
            shape = (state.statement, binder, state.parameter_expansion)
            if len(self._shapes) >= _MAX_SHAPES:
                self._shapes.clear()
            self._shapes[key] = shape
        return shape

    def bind(self, params: Mapping[str, Any]) -> tuple[str, list[Any]]:
        """The SQL and its positional arguments for one parameter set."""
        sql, binder, expansion = self._shape(params)
        values = {**self._defaults, **params} if self._defaults else params
        if expansion:
            values = dict(values)
            for name, expanded in expansion.items():
                flat = [v for item in params[name] for v in _items(item)]
                values.update(zip(expanded, flat, strict=True))
        out: list[Any] = []
        for name, proc, before in binder:
            value = values[name]
            if proc is None:
                out.append(value)
            elif before >= 0 and values[binder[before][0]] is value:
                out.append(out[before])  # the same object, already processed alike
            else:
                out.append(proc(value))
        return sql, out

    def positions(self) -> tuple[str, list[tuple[str, Callable[[Any], Any] | None]]]:
        """The SQL and each position's (parameter name, bind processor), for a caller that
        makes its arguments itself (queue's one-row enqueue). No expanding parameters."""
        sql, binder, _ = self._shapes[()]
        return sql, [(name, proc) for name, proc, _ in binder]

    def bind_many(self, rows: Sequence[Mapping[str, Any]]) -> tuple[str, list[list[Any]]]:
        """The SQL and its arguments for an executemany (no expanding parameters). A value
        that is the same object as the previous row's in that position (a batch's clock,
        its processor id) is processed once."""
        sql, binder, _ = self._shapes[()]
        defaults = self._defaults
        last: list[tuple[Any, Any]] = [(_UNSET, None)] * len(binder)
        args = []
        for row in rows:
            values = {**defaults, **row} if defaults else row
            out = []
            for i, (name, proc, _) in enumerate(binder):
                value = values[name]
                if proc is None:
                    out.append(value)
                    continue
                seen, done = last[i]
                if seen is not value:
                    done = proc(value)
                    last[i] = (value, done)
                out.append(done)
            args.append(out)
        return sql, args

    def rows(self, raw: Sequence[Sequence[Any]]) -> list[Any]:
        """Driver rows as named tuples, through the column types' result processors."""
        make = self.row._make
        procs = self._result
        if procs is None:
            return [make(r) for r in raw]
        return [
            make([v if p is None else p(v) for p, v in zip(procs, r, strict=True)]) for r in raw
        ]


#: JSON text from the C encoder built once (``json.dumps`` and ``JSONEncoder.encode`` build
#: one per call, ~2 µs, the most of a small value's encoding): ``encoder(value, 0)`` yields
#: the pieces. No circular-reference markers (a dict shared across calls would keep stale
#: ids after an error): a cycle ends in RecursionError, and the caller then asks ``json``
#: itself what is wrong. None where the C accelerator is missing.
JSONPieces = Callable[[object, int], Sequence[str]]


def json_encoder(*, ensure_ascii: bool) -> JSONPieces | None:
    """The C JSON encoder of ``json.dumps(value, ensure_ascii=…, allow_nan=False)``."""
    make: Any = getattr(json.encoder, "c_make_encoder", None)  # not in typeshed
    if make is None:
        return None
    strings = (
        json.encoder.encode_basestring_ascii if ensure_ascii else json.encoder.encode_basestring
    )
    return make(  # type: ignore[no-any-return]
        None,  # markers
        json.JSONEncoder().default,
        strings,
        None,  # indent
        ": ",
        ", ",
        False,  # sort_keys
        False,  # skipkeys
        False,  # allow_nan
    )


def _type_key(type_: Any) -> Any:
    """A key equal for types whose bind processors are interchangeable, or None. Only a
    type that declares it (``shares_bind_processor = True``: its processing is defined by
    its class and the dialect alone, like UTCDateTime's) is shared. An equal SQLAlchemy
    cache key is not enough: Enum's leaves out its enum class, SQLite DATETIME's its
    storage format."""
    kind = type(type_)
    return kind if getattr(kind, "shares_bind_processor", False) is True else None


def _result_processor(type_: Any, dialect: Dialect) -> Callable[[Any], Any] | None:
    impl = type_.dialect_impl(dialect)
    try:
        return impl.result_processor(dialect, None)  # type: ignore[no-any-return]
    except (TypeError, sa_exc.InvalidRequestError):
        # asyncpg's numeric types ask for the column's type code: numeric or float8
        code = _PG_NUMERIC if getattr(impl, "asdecimal", False) else _PG_FLOAT8
        return impl.result_processor(dialect, code)  # type: ignore[no-any-return]


_PG_FLOAT8, _PG_NUMERIC = 701, 1700


_UNSET = object()


def _items(item: Any) -> tuple[Any, ...]:
    return tuple(item) if isinstance(item, tuple | list) else (item,)


_PREPARED: dict[tuple[int, tuple[Any, ...], tuple[str, ...] | None], Prepared] = {}


def flavor(dialect: Dialect) -> tuple[Any, ...]:
    """What a compiled statement's processors depend on beyond the statement: the dialect
    and an engine's own JSON serializer and deserializer (``create_async_engine(…,
    json_serializer=…)``). Two engines of one dialect share compiled statements unless
    they encode JSON differently: keyed by the name alone, the first engine's processors
    served the other, and one engine's one-row enqueue stored the other's JSON text.

    The functions are keyed by identity (one need not be hashable): a compiled statement's
    processors hold the functions they were made with, so an id in the cache is never
    reused by another function."""
    serializer = getattr(dialect, "_json_serializer", None)
    deserializer = getattr(dialect, "_json_deserializer", None)
    return (
        dialect.name,
        None if serializer is None else id(serializer),
        None if deserializer is None else id(deserializer),
    )


def prepared(
    statement: Any, dialect: Dialect, column_keys: tuple[str, ...] | None = None
) -> Prepared:
    """The statement compiled for ``dialect`` (an INSERT: for these ``column_keys``), once
    per dialect flavor (``flavor``). Meant for statements built once (module-level or
    cached); the cache holds them, so their ids stay theirs."""
    key = (id(statement), flavor(dialect), column_keys)
    found = _PREPARED.get(key)
    if found is None or found.statement is not statement:
        found = _PREPARED[key] = Prepared(statement, dialect, column_keys)
    return found


@contextmanager
def watch(watcher: Watcher) -> Iterator[None]:
    """Call ``watcher(sql, arguments, seconds)`` after each statement sent to a driver
    here, inside the block (tests capture the SQL; the benchmark times the claim): the
    counterpart of SQLAlchemy's cursor events, which this path does not fire."""
    _WATCHERS.append(watcher)
    try:
        yield
    finally:
        _WATCHERS.remove(watcher)


def _watched(sql: str, args: Any, started: float) -> None:
    elapsed = time.perf_counter() - started
    for watcher in list(_WATCHERS):
        watcher(sql, args, elapsed)


# --- the drivers ------------------------------------------------------------------------


_Driver = tuple[str, Any, Any, Dialect, AsyncConnection]
_CACHE_KEY = "async_processor_hotpath_driver"


async def _driver(session: AsyncSession) -> _Driver | None:
    """(kind, driver connection, SQLAlchemy's adapter, dialect) for the session's connection,
    inside its transaction; None when this module cannot drive it. Looked up once per
    transaction (``session.connection()`` costs a greenlet round trip)."""
    if not ENABLED:
        return None
    transaction = session.sync_session.get_transaction()
    cached = session.info.get(_CACHE_KEY)
    if cached is not None and transaction is not None and transaction.is_active:
        owner, hit = cached
        if owner is transaction:
            return hit  # type: ignore[no-any-return]
    found = await _lookup(session)
    transaction = session.sync_session.get_transaction()  # begun by the lookup
    if found is not None and transaction is not None:
        session.info[_CACHE_KEY] = (transaction, found)
    return found


def is_aiosqlite(driver: Any) -> bool:
    """An aiosqlite connection (app.sqlite_conn's included); aiosqlite is not imported where
    no SQLite engine was made."""
    module = sys.modules.get("aiosqlite")
    return module is not None and isinstance(driver, module.Connection)


async def _lookup(session: AsyncSession) -> _Driver | None:
    conn = await session.connection()  # begins the transaction (BEGIN … on SQLite)
    dialect = conn.dialect
    raw = await conn.get_raw_connection()
    adapter: Any = raw.dbapi_connection
    driver = raw.driver_connection
    if dialect.name == "sqlite":
        inline = getattr(driver, "sqlite_connection", None)
        if isinstance(inline, sqlite3.Connection):
            return "sqlite3", inline, adapter, dialect, conn
        if is_aiosqlite(driver):
            return "aiosqlite", driver, adapter, dialect, conn
        return None
    if dialect.name == "postgresql" and type(driver).__module__.startswith("asyncpg"):
        start = getattr(adapter, "_start_transaction", None)
        if start is None or not hasattr(adapter, "_transaction"):
            return None  # SQLAlchemy's adapter changed: stay on the safe path
        if adapter._transaction is None:
            try:
                await start()  # SQLAlchemy's own lazy BEGIN, as its cursor would do it
            except Exception as error:
                raise await _failed(error, "asyncpg", adapter, dialect, "BEGIN", conn) from error
        return "asyncpg", driver, adapter, dialect, conn
    return None


def _translated(
    error: Exception, kind: str, adapter: Any, dialect: Dialect, sql: str
) -> tuple[Exception, bool]:
    """A driver error as SQLAlchemy raises it from ``session.execute`` (its DB-API shape
    wrapped in ``sqlalchemy.exc``), and whether it means the connection is lost (the
    caller then invalidates it, so the pool drops it instead of handing it out again)."""
    if kind == "asyncpg":
        try:
            adapter._handle_exception(error)  # raises the DB-API-shaped error
        except Exception as translated:
            error = translated
    dbapi = dialect.loaded_dbapi
    if not isinstance(error, dbapi.Error):
        return error, False
    invalidated = False
    try:
        invalidated = bool(dialect.is_disconnect(error, adapter, None))
    except Exception:  # noqa: S110 - a check that fails is not a disconnect
        pass
    wrapped = sa_exc.DBAPIError.instance(
        sql, None, error, dbapi.Error, connection_invalidated=invalidated, dialect=dialect
    )
    return wrapped, invalidated


async def _failed(
    error: Exception, kind: str, adapter: Any, dialect: Dialect, sql: str, conn: AsyncConnection
) -> Exception:
    """_translated, invalidating ``conn`` on a lost connection."""
    raised, invalidated = _translated(error, kind, adapter, dialect, sql)
    if invalidated:
        with contextlib.suppress(Exception):
            await conn.invalidate(raised.orig if isinstance(raised, sa_exc.DBAPIError) else None)
    return raised


async def fetch(session: AsyncSession, statement: Any, params: Mapping[str, Any]) -> list[Any]:
    """Run ``statement`` once; its rows (none for DML without RETURNING)."""
    found = await _driver(session)
    if found is None:
        result = await session.execute(statement, dict(params))
        rows = not isinstance(result, CursorResult) or result.returns_rows
        return list(result.all()) if rows else []
    kind, driver, adapter, dialect, conn = found
    stmt = prepared(statement, dialect, tuple(params) if statement.is_insert else None)
    sql, args = stmt.bind(params)
    started = time.perf_counter()
    try:
        if kind == "sqlite3":
            raw = driver.execute(sql, args).fetchall()
        elif kind == "aiosqlite":
            raw = await driver.execute_fetchall(sql, args)  # one trip to its thread
        else:
            raw = await driver.fetch(sql, *args)
    except Exception as error:
        raise await _failed(error, kind, adapter, dialect, sql, conn) from error
    if _WATCHERS:
        _watched(sql, args, started)
    return stmt.rows(raw)


def _autocommit_driver(raw: Any) -> tuple[Any, Any] | None:
    """(SQLAlchemy's adapter, the asyncpg connection) of a pooled connection with no
    transaction open; None otherwise (another driver, a transaction open, or SQLAlchemy's
    adapter changed)."""
    adapter: Any = raw.dbapi_connection
    driver: Any = raw.driver_connection
    if not type(driver).__module__.startswith("asyncpg"):
        return None
    if getattr(adapter, "_transaction", _UNSET) is not None:
        return None
    return adapter, driver


async def fetch_autocommit(
    conn: AsyncConnection, statement: Any, params: Mapping[str, Any]
) -> list[Any] | None:
    """Run ``statement`` as its own transaction (the server's implicit one: a single round
    trip, committed when it returns) on a connection with no transaction open; its rows.
    asyncpg only: None where that is not possible (the caller uses a transaction)."""
    if not ENABLED or conn.in_transaction() or conn.dialect.name != "postgresql":
        return None
    found = _autocommit_driver(await conn.get_raw_connection())
    if found is None:
        return None
    adapter, driver = found
    dialect = conn.dialect
    stmt = prepared(statement, dialect, tuple(params) if statement.is_insert else None)
    sql, args = stmt.bind(params)
    started = time.perf_counter()
    try:
        raw_rows = await driver.fetch(sql, *args)
    except Exception as error:
        raise await _failed(error, "asyncpg", adapter, dialect, sql, conn) from error
    if _WATCHERS:
        _watched(sql, args, started)
    return stmt.rows(raw_rows)


async def fetch_autocommit_pooled(
    engine: AsyncEngine, statement: Any, params: Mapping[str, Any]
) -> list[Any] | None:
    """fetch_autocommit on a connection of ``engine``'s pool checked out for this one
    statement: check-out, statement and check-in in ONE greenlet hop (AsyncEngine.connect,
    get_raw_connection and close take three, plus an AsyncConnection: ~0.15 ms a call on a
    2-core VM, a quarter of an enqueue alone). Check-out goes through the pool's events
    (the pre-ping) and SQLAlchemy's error wrapping, as ``engine.connect()`` does. asyncpg
    only: None where that is not possible (the caller uses a transaction)."""
    if not ENABLED or engine.dialect.name != "postgresql":
        return None
    dialect = engine.dialect
    stmt = prepared(statement, dialect, tuple(params) if statement.is_insert else None)
    sql, args = stmt.bind(params)
    return await fetch_autocommit_pooled_bound(engine, stmt, sql, args)


async def fetch_autocommit_pooled_bound(
    engine: AsyncEngine, stmt: Prepared, sql: str, args: Sequence[Any]
) -> list[Any] | None:
    """fetch_autocommit_pooled of ``stmt``'s SQL with arguments bound already (by the
    caller, from ``stmt.positions()``)."""
    if not ENABLED or engine.dialect.name != "postgresql":
        return None
    raw_rows = await greenlet_spawn(_autocommit_in_greenlet, engine.sync_engine, sql, args)
    return None if raw_rows is _UNSET else stmt.rows(raw_rows)


def _autocommit_in_greenlet(sync_engine: Any, sql: str, args: Sequence[Any]) -> Any:
    with sync_engine.connect() as conn:
        found = _autocommit_driver(conn.connection)
        if found is None:
            return _UNSET
        adapter, driver = found
        started = time.perf_counter()
        try:
            rows = await_only(driver.fetch(sql, *args))
        except Exception as error:
            raised, invalidated = _translated(error, "asyncpg", adapter, conn.dialect, sql)
            if invalidated:
                with contextlib.suppress(Exception):
                    conn.invalidate(raised.orig if isinstance(raised, sa_exc.DBAPIError) else None)
            raise raised from error
        if _WATCHERS:
            _watched(sql, args, started)
        return rows


async def execute_many(
    session: AsyncSession, statement: Any, rows: Sequence[Mapping[str, Any]]
) -> None:
    """Run ``statement`` (DML without RETURNING) once per parameter set, in one call."""
    if not rows:
        return
    found = await _driver(session)
    if found is None:
        await session.execute(statement, [dict(r) for r in rows])
        return
    kind, driver, adapter, dialect, conn = found
    keys = tuple(rows[0]) if statement.is_insert else None
    sql, args = prepared(statement, dialect, keys).bind_many(rows)
    started = time.perf_counter()
    try:
        if kind == "sqlite3":
            driver.executemany(sql, args)
        else:  # aiosqlite, asyncpg
            await driver.executemany(sql, args)
    except Exception as error:
        raise await _failed(error, kind, adapter, dialect, sql, conn) from error
    if _WATCHERS:
        _watched(sql, args, started)


# --- a bare sqlite3 connection (the caller's own transaction) ----------------------------


def sqlite3_fetch(
    conn: sqlite3.Connection, dialect: Dialect, statement: Any, params: Mapping[str, Any]
) -> list[Any]:
    """``fetch`` on a ``sqlite3`` connection of the caller's, inside its transaction (no
    session: Database.run_write's ``here``); errors as SQLAlchemy's exceptions."""
    stmt = prepared(statement, dialect, tuple(params) if statement.is_insert else None)
    sql, args = stmt.bind(params)
    return stmt.rows(sqlite3_fetch_raw(conn, dialect, sql, args))


def sqlite3_fetch_raw(
    conn: sqlite3.Connection, dialect: Dialect, sql: str, args: Sequence[Any]
) -> list[Any]:
    """sqlite3_fetch of SQL with its arguments bound already: the driver's rows, as they
    come (the caller reads them, e.g. with its Prepared's ``rows``)."""
    started = time.perf_counter()
    try:
        raw = conn.execute(sql, args).fetchall()
    except sqlite3.Error as error:
        raise sqlite3_error(error, sql, dialect) from error
    if _WATCHERS:
        _watched(sql, args, started)
    return raw


def sqlite3_execute_many(
    conn: sqlite3.Connection,
    dialect: Dialect,
    statement: Any,
    rows: Sequence[Mapping[str, Any]],
) -> None:
    """``execute_many`` on a ``sqlite3`` connection of the caller's."""
    if not rows:
        return
    keys = tuple(rows[0]) if statement.is_insert else None
    sql, args = prepared(statement, dialect, keys).bind_many(rows)
    started = time.perf_counter()
    try:
        conn.executemany(sql, args)
    except sqlite3.Error as error:
        raise sqlite3_error(error, sql, dialect) from error
    if _WATCHERS:
        _watched(sql, args, started)


def sqlite3_error(error: sqlite3.Error, sql: str, dialect: Dialect | None) -> Exception:
    """A ``sqlite3`` error as ``session.execute`` raises it ("database is locked" is an
    ``sqlalchemy.exc.OperationalError``)."""
    return sa_exc.DBAPIError.instance(sql, None, error, sqlite3.Error, dialect=dialect)
