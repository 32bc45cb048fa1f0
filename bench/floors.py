"""Floors: the daemon's claim / complete / enqueue SQL run by bare drivers, no framework.

The same statements as the daemon, in the same transactions. A claim takes up to ``batch``
pending rows in ONE ``UPDATE … WHERE id IN (SELECT … ORDER BY priority DESC, scheduled_at,
id LIMIT k [FOR UPDATE SKIP LOCKED]) RETURNING`` (paused queues left out; on PostgreSQL the
pick runs per priority, highest first, as the daemon's does) and writes their
``started`` notifications; a completion writes every result of the batch in ONE fenced
``UPDATE … FROM`` plus their ``completed`` notifications (PostgreSQL: behind the feed's
advisory lock). As the daemon sends them:

- PostgreSQL: the claim and its notifications are ONE autocommitted statement (the UPDATE
  and the INSERT as CTEs, ``queue._claim_alone_statement``), and so is a batch's completion
  with its notifications (``queue._complete_alone_statement``): one round trip each;
- SQLite: a batch's completions and the claim of the next batch share ONE ``BEGIN
  IMMEDIATE`` … ``COMMIT`` (the daemon's completer claims for the slots its batch freed).

Commits use the daemon's durability settings (SQLite WAL + synchronous=NORMAL; PostgreSQL
as the server is configured).

Drain and pick-up floors run as separate worker processes, like the daemon::

    python -m bench.floors drain  --driver aiosqlite --target /path/db.sqlite --count 5000
    python -m bench.floors pickup --driver asyncpg --target postgresql://… --count 50

A worker prints ``READY`` once connected, then one JSON line when done. This module imports
no application code, so a worker's memory is the bare driver's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

LEASE_SECONDS = 30.0
#: Same key as app.services.notifications.FEED_LOCK_KEY (the runner checks they agree).
FEED_LOCK_KEY = 0x6170_6E6F_7469_6679
SQLITE_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=NORMAL",
    "PRAGMA busy_timeout=5000",
    "PRAGMA foreign_keys=ON",
)
DRIVERS = ("sqlite3", "aiosqlite", "asyncpg")
PICKUP_POLL_SECONDS = 0.001

Row = Sequence[Any]

# --- SQL -----------------------------------------------------------------------------------

SQLITE_INSERT = (
    "INSERT INTO pending_analysis (kind, queue, status, priority, payload, retry_count,"
    " max_retries, attempts, timeout_seconds, user_id, scheduled_at, created_at, updated_at,"
    " cancel_requested, token_usage)"
    " VALUES (?, 'default', 'pending', 5, ?, 0, 3, 0, 600, ?, ?, ?, ?, 0, 0)"
)
SQLITE_CLAIM = (
    "UPDATE pending_analysis SET status = 'processing', attempts = attempts + 1,"
    " started_at = ?, updated_at = ?, locked_by = ?, lease_expires_at = ?"
    " WHERE id IN (SELECT id FROM pending_analysis"
    " WHERE status = 'pending' AND priority IN (10, 9, 8, 7, 6, 5, 4, 3, 2, 1)"
    " AND scheduled_at <= ? AND queue NOT IN (SELECT name FROM queue_states WHERE paused IS NOT 0)"
    " ORDER BY priority DESC, scheduled_at, id LIMIT ?)"
    " RETURNING id, kind, payload, attempts, user_id, project_id, chapter_id"
)
SQLITE_NOTE = (
    "INSERT INTO analysis_notifications (user_id, project_id, chapter_id, task_id, type,"
    " title, message, data, is_read, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?)"
)
PG_INSERT = (
    "INSERT INTO pending_analysis (kind, queue, status, priority, payload, retry_count,"
    " max_retries, attempts, timeout_seconds, user_id, scheduled_at, created_at, updated_at,"
    " cancel_requested, token_usage)"
    " VALUES ($1, 'default', 'pending', 5, $2::jsonb, 0, 3, 0, 600, $3, now(), now(), now(),"
    " false, 0)"
)
#: The engine's own ceiling for a bulk enqueue: the same rows, made by the database itself
#: in one INSERT … SELECT (no driver, no client encoding, no transfer), ``bulk_size`` per
#: transaction. No client can insert faster than this into the same table and indexes.
SQLITE_ROWS_MADE_HERE = (
    "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i + 1 < ?)"
    " INSERT INTO pending_analysis (kind, queue, status, priority, payload, retry_count,"
    " max_retries, attempts, timeout_seconds, user_id, scheduled_at, created_at, updated_at,"
    " cancel_requested, token_usage)"
    " SELECT 'bench_noop', 'default', 'pending', 5, json_object('n', ? + i), 0, 3, 0, 600,"
    " 'bench', ?, ?, ?, 0, 0 FROM n"
)
PG_ROWS_MADE_HERE = (
    "INSERT INTO pending_analysis (kind, queue, status, priority, payload, retry_count,"
    " max_retries, attempts, timeout_seconds, user_id, scheduled_at, created_at, updated_at,"
    " cancel_requested, token_usage)"
    " SELECT 'bench_noop', 'default', 'pending', 5, jsonb_build_object('n', $1 + i), 0, 3, 0,"
    " 600, 'bench', now(), now(), now(), false, 0 FROM generate_series(0, $2 - 1) AS g(i)"
)
#: The claim and its ``started`` notifications in one statement (queue._claim_alone_statement):
#: $1 worker, $2 lease seconds, $3 limit, $4 the feed's lock key.
PG_CLAIM = (
    "WITH claimed AS (UPDATE pending_analysis SET status = 'processing',"
    " attempts = attempts + 1, started_at = now(), updated_at = now(), locked_by = $1,"
    " lease_expires_at = now() + make_interval(secs => $2)"
    # the pick as the daemon's (queue._due_in_order): per priority, highest first
    " WHERE id IN (SELECT due.id FROM generate_series(10, 1, -1) AS p(priority)"
    " JOIN LATERAL (SELECT id FROM pending_analysis"
    " WHERE priority = p.priority AND status = 'pending' AND scheduled_at <= now()"
    " AND queue NOT IN (SELECT name FROM queue_states WHERE paused IS NOT false)"
    " ORDER BY scheduled_at, id LIMIT $3 FOR UPDATE SKIP LOCKED) AS due ON true LIMIT $3)"
    " RETURNING id, kind, payload, attempts, user_id, project_id, chapter_id, priority,"
    " scheduled_at),"
    " started_notes AS (INSERT INTO analysis_notifications (user_id, project_id, chapter_id,"
    " task_id, type, title, message, data, is_read, created_at)"
    " SELECT user_id, project_id, chapter_id, id, 'started', 'Analysis started',"
    " 'Attempt ' || attempts::text || ' of ' || kind || ' started.',"
    " jsonb_build_object('task_id', id, 'kind', kind, 'attempt', attempts), false, now()"
    " FROM claimed WHERE (SELECT pg_advisory_xact_lock($4)::text) = ''"
    " ORDER BY priority DESC, scheduled_at, id)"
    " SELECT id, kind, payload, attempts, user_id, project_id, chapter_id FROM claimed"
)
#: A batch's completions and their ``completed`` notifications in one statement
#: (queue._complete_alone_statement): the rows locked in id order, the fenced UPDATE, the
#: notifications of the rows it wrote. $1-$4 the ends (id, attempt, result, duration), $5
#: the worker; $6-$11 the notifications (user, project, chapter, task, message, data); $12
#: the feed's lock key; $13 the ends' token counts.
PG_COMPLETE = (
    # the fence's values as columns of the MATERIALIZED ends, as the daemon's statement
    # carries them (its docstring: as constants the planner's choice went quadratic)
    "WITH ends AS MATERIALIZED (SELECT u.*, 'processing'::varchar AS expected,"
    " $5::varchar AS owner FROM"
    " unnest($1::bigint[], $2::int[], $3::jsonb[], $4::float8[], $13::int[])"
    " AS u(id, attempt, result, duration, tokens)),"
    " locked AS (SELECT ends.* FROM ends JOIN pending_analysis AS t ON t.id = ends.id"
    " AND t.status = ends.expected AND t.locked_by = ends.owner ORDER BY t.id"
    " FOR UPDATE OF t),"
    " done AS (UPDATE pending_analysis AS t SET status = 'completed', result = locked.result,"
    " error = NULL, completed_at = now(), updated_at = now(), locked_by = NULL,"
    " lease_expires_at = NULL, duration_seconds = locked.duration,"
    " token_usage = CASE WHEN t.token_usage > 2147483647 - locked.tokens THEN 2147483647"
    " ELSE t.token_usage + locked.tokens END FROM locked"
    " WHERE t.id = locked.id AND t.status = locked.expected AND t.locked_by = locked.owner"
    " AND t.attempts = locked.attempt RETURNING t.id),"
    " completed_notes AS (INSERT INTO analysis_notifications (user_id, project_id,"
    " chapter_id, task_id, type, title, message, data, is_read, created_at)"
    " SELECT n.u, n.p, n.c, n.t, 'completed', 'Analysis completed', n.m, n.d, false, now()"
    " FROM unnest($6::text[], $7::text[], $8::text[], $9::bigint[], $10::text[],"
    " $11::jsonb[]) AS n(u, p, c, t, m, d)"
    " WHERE (SELECT pg_advisory_xact_lock($12)::text) = '' AND n.t IN (SELECT id FROM done))"
    " SELECT id FROM done"
)
_SQLITE_COMPLETE: dict[int, str] = {}


def sqlite_complete_sql(n: int) -> str:
    """The one-statement completion of ``n`` jobs (SQLite ≥ 3.33: UPDATE … FROM VALUES)."""
    sql = _SQLITE_COMPLETE.get(n)
    if sql is None:
        values = ", ".join(["(?, ?, ?, ?)"] * n)
        sql = (
            "UPDATE pending_analysis SET status = 'completed', result = v.column2,"
            " error = NULL, completed_at = ?, updated_at = ?, locked_by = NULL,"
            " lease_expires_at = NULL, duration_seconds = v.column4"
            f" FROM (VALUES {values}) AS v"
            " WHERE pending_analysis.id = v.column1 AND pending_analysis.attempts = v.column3"
            " AND pending_analysis.status = 'processing' AND pending_analysis.locked_by = ?"
            " RETURNING pending_analysis.id, kind, NULL, attempts, user_id, project_id,"
            " chapter_id"
        )
        _SQLITE_COMPLETE[n] = sql
    return sql


def sqlite_time(offset: float = 0.0) -> str:
    """Now (plus ``offset`` seconds) as the application stores it on SQLite."""
    return (datetime.now(UTC) + timedelta(seconds=offset)).strftime("%Y-%m-%d %H:%M:%S.%f")


# --- what a job and its notifications look like ----------------------------------------------

STARTED = ("started", "Analysis started")
COMPLETED = ("completed", "Analysis completed")


def run_noop(payload: Any) -> dict[str, Any]:
    """The floor's handler: decode the payload, return the no-op result."""
    data = json.loads(payload) if isinstance(payload, str) else payload
    return {"n": data.get("n")}


def stamp_result() -> dict[str, Any]:
    """The pick-up floor's handler: the time it started."""
    return {"t": time.time()}


def _message(kind: tuple[str, str], row: Row) -> str:
    if kind is STARTED:
        return f"Attempt {row[3]} of {row[1]} started."
    return "Finished."


def _note_data(row: Row) -> str:
    return json.dumps({"task_id": row[0], "kind": row[1], "attempt": row[3]})


def sqlite_notes(kind: tuple[str, str], rows: Sequence[Row], now: str) -> list[tuple[Any, ...]]:
    """executemany parameters for the notifications of ``rows`` (claim/complete RETURNING)."""
    return [
        (r[4], r[5], r[6], r[0], kind[0], kind[1], _message(kind, r), _note_data(r), now)
        for r in rows
    ]


# --- sqlite3 -----------------------------------------------------------------------------------


def sqlite3_connect(path: str, synchronous: str = "NORMAL") -> sqlite3.Connection:
    """A connection with the daemon's pragmas, in autocommit (we BEGIN ourselves);
    ``synchronous`` as the daemon's SQLITE_SYNCHRONOUS."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=30, check_same_thread=False)
    for pragma in SQLITE_PRAGMAS:
        conn.execute(pragma)
    conn.execute(f"PRAGMA synchronous={synchronous}")
    return conn


Done = Sequence[tuple[Row, dict[str, Any], float]]  # (claimed row, result, duration)


def _sqlite_claim_params(worker: str, limit: int) -> tuple[tuple[Any, ...], str]:
    now = sqlite_time()
    return (now, now, worker, sqlite_time(LEASE_SECONDS), now, limit), now


def _sqlite_complete_params(worker: str, done: Done) -> tuple[list[Any], str]:
    now = sqlite_time()
    params: list[Any] = [now, now]
    for row, result, duration in done:
        params += [row[0], json.dumps(result), row[3], duration]
    params.append(worker)
    return params, now


def sqlite3_claim(conn: sqlite3.Connection, worker: str, limit: int) -> list[Row]:
    """Claim up to ``limit`` jobs and write their notifications; one transaction."""
    return sqlite3_complete_and_claim(conn, worker, (), limit)[1]


def sqlite3_complete(conn: sqlite3.Connection, worker: str, done: Done) -> int:
    """Write a batch's results (one statement) and notifications; one transaction."""
    return sqlite3_complete_and_claim(conn, worker, done, 0)[0]


def sqlite3_complete_and_claim(
    conn: sqlite3.Connection, worker: str, done: Done, limit: int
) -> tuple[int, list[Row]]:
    """Write a batch's results and notifications, then claim up to ``limit`` jobs and write
    theirs, in ONE transaction, as the daemon's completer does. (jobs written, claimed)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        written = 0
        if done:
            params, now = _sqlite_complete_params(worker, done)
            rows: list[Row] = conn.execute(sqlite_complete_sql(len(done)), params).fetchall()
            conn.executemany(SQLITE_NOTE, sqlite_notes(COMPLETED, rows, now))
            written = len(rows)
        claimed: list[Row] = []
        if limit:
            claim, now = _sqlite_claim_params(worker, limit)
            claimed = conn.execute(SQLITE_CLAIM, claim).fetchall()
            if claimed:
                conn.executemany(SQLITE_NOTE, sqlite_notes(STARTED, claimed, now))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return written, claimed


def run_batch(rows: Sequence[Row]) -> list[tuple[Row, dict[str, Any], float]]:
    """The no-op handler over a claimed batch, each run timed."""
    done = []
    for row in rows:
        started = time.perf_counter()
        result = run_noop(row[2])
        done.append((row, result, time.perf_counter() - started))
    return done


def sqlite3_drain(path: str, worker: str, batch: int, synchronous: str = "NORMAL") -> int:
    """Claim, run and complete batches until nothing is pending; each batch's completion
    and the next claim share one transaction. Returns jobs done."""
    conn = sqlite3_connect(path, synchronous)
    done_count = 0
    try:
        rows = sqlite3_claim(conn, worker, batch)
        while rows:
            written, rows = sqlite3_complete_and_claim(conn, worker, run_batch(rows), batch)
            done_count += written
        return done_count
    finally:
        conn.close()


def sqlite3_pickup(path: str, worker: str, batch: int, count: int, timeout: float) -> int:
    """Wait for commits (``PRAGMA data_version`` every 1 ms), claim and stamp; until
    ``count`` jobs ran. Returns jobs done."""
    watch = sqlite3.connect(path, isolation_level=None, timeout=0)
    conn = sqlite3_connect(path)
    version = watch.execute("PRAGMA data_version").fetchone()[0]
    ready()
    done_count = 0
    deadline = time.monotonic() + timeout
    try:
        while done_count < count and time.monotonic() < deadline:
            time.sleep(PICKUP_POLL_SECONDS)
            current = watch.execute("PRAGMA data_version").fetchone()[0]
            if current == version:
                continue
            version = current
            while rows := sqlite3_claim(conn, worker, batch):
                done = [(row, stamp_result(), 0.0) for row in rows]
                done_count += sqlite3_complete(conn, worker, done)
        return done_count
    finally:
        watch.close()
        conn.close()


def sqlite3_enqueue(
    path: str, count: int, rows: int, bulk_size: int, synchronous: str = "NORMAL"
) -> tuple[float, float]:
    """(seconds for ``count`` single-row transactions, seconds for ``rows`` rows inserted
    ``bulk_size`` per transaction with executemany)."""
    conn = sqlite3_connect(path, synchronous)
    try:
        insert = SQLITE_INSERT + " RETURNING id"
        started = time.perf_counter()
        for i in range(count):
            now = sqlite_time()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(insert, ("bench_noop", json.dumps({"n": i}), "bench", now, now, now))
            conn.execute("COMMIT")
        single = time.perf_counter() - started
        started = time.perf_counter()
        for first in range(0, rows, bulk_size):
            now = sqlite_time()
            chunk = [
                ("bench_noop", json.dumps({"n": i}), "bench", now, now, now)
                for i in range(first, min(rows, first + bulk_size))
            ]
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(SQLITE_INSERT, chunk)
            conn.execute("COMMIT")
        return single, time.perf_counter() - started
    finally:
        conn.close()


def sqlite3_rows_made_here(path: str, rows: int, bulk_size: int) -> float:
    """Seconds for ``rows`` rows made by SQLite itself, ``bulk_size`` per transaction
    (SQLITE_ROWS_MADE_HERE)."""
    conn = sqlite3_connect(path)
    try:
        started = time.perf_counter()
        for first in range(0, rows, bulk_size):
            now = sqlite_time()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                SQLITE_ROWS_MADE_HERE, (min(bulk_size, rows - first), first, now, now, now)
            )
            conn.execute("COMMIT")
        return time.perf_counter() - started
    finally:
        conn.close()


# --- aiosqlite ---------------------------------------------------------------------------------


async def aiosqlite_connect(path: str) -> Any:
    """An aiosqlite connection with the daemon's pragmas, in autocommit."""
    import aiosqlite

    conn = await aiosqlite.connect(path, isolation_level=None, timeout=30)
    for pragma in SQLITE_PRAGMAS:
        await conn.execute(pragma)
    return conn


async def aiosqlite_complete_and_claim(
    conn: Any, worker: str, done: Done, limit: int
) -> tuple[int, list[Row]]:
    """As sqlite3_complete_and_claim, one await per statement."""
    await conn.execute("BEGIN IMMEDIATE")
    try:
        written = 0
        if done:
            params, now = _sqlite_complete_params(worker, done)
            cursor = await conn.execute(sqlite_complete_sql(len(done)), params)
            rows: list[Row] = list(await cursor.fetchall())
            await conn.executemany(SQLITE_NOTE, sqlite_notes(COMPLETED, rows, now))
            written = len(rows)
        claimed: list[Row] = []
        if limit:
            claim, now = _sqlite_claim_params(worker, limit)
            cursor = await conn.execute(SQLITE_CLAIM, claim)
            claimed = list(await cursor.fetchall())
            if claimed:
                await conn.executemany(SQLITE_NOTE, sqlite_notes(STARTED, claimed, now))
        await conn.execute("COMMIT")
    except BaseException:
        await conn.execute("ROLLBACK")
        raise
    return written, claimed


async def _handler(payload: Any) -> dict[str, Any]:
    return run_noop(payload)


async def _run_batch(rows: Sequence[Row]) -> list[tuple[Row, dict[str, Any], float]]:
    """As run_batch, the handler awaited as a coroutine."""
    done = []
    for row in rows:
        started = time.perf_counter()
        result = await _handler(row[2])
        done.append((row, result, time.perf_counter() - started))
    return done


async def aiosqlite_drain(path: str, worker: str, batch: int) -> int:
    """As sqlite3_drain; the handler is awaited as a coroutine."""
    conn = await aiosqlite_connect(path)
    done_count = 0
    try:
        _, rows = await aiosqlite_complete_and_claim(conn, worker, (), batch)
        while rows:
            done = await _run_batch(rows)
            written, rows = await aiosqlite_complete_and_claim(conn, worker, done, batch)
            done_count += written
        return done_count
    finally:
        await conn.close()


async def aiosqlite_enqueue(
    path: str, count: int, rows: int, bulk_size: int
) -> tuple[float, float]:
    """As sqlite3_enqueue."""
    conn = await aiosqlite_connect(path)
    try:
        insert = SQLITE_INSERT + " RETURNING id"
        started = time.perf_counter()
        for i in range(count):
            now = sqlite_time()
            await conn.execute("BEGIN IMMEDIATE")
            cursor = await conn.execute(
                insert, ("bench_noop", json.dumps({"n": i}), "bench", now, now, now)
            )
            await cursor.fetchall()
            await conn.execute("COMMIT")
        single = time.perf_counter() - started
        started = time.perf_counter()
        for first in range(0, rows, bulk_size):
            now = sqlite_time()
            chunk = [
                ("bench_noop", json.dumps({"n": i}), "bench", now, now, now)
                for i in range(first, min(rows, first + bulk_size))
            ]
            await conn.execute("BEGIN IMMEDIATE")
            await conn.executemany(SQLITE_INSERT, chunk)
            await conn.execute("COMMIT")
        return single, time.perf_counter() - started
    finally:
        await conn.close()


async def aiosqlite_claim_times(path: str, iterations: int, limit: int) -> list[float]:
    """Seconds taken by the claim statement alone, each in a transaction rolled back."""
    conn = await aiosqlite_connect(path)
    times = []
    try:
        for _ in range(iterations):
            now = sqlite_time()
            lease = sqlite_time(LEASE_SECONDS)
            await conn.execute("BEGIN IMMEDIATE")
            started = time.perf_counter()
            cursor = await conn.execute(SQLITE_CLAIM, (now, now, "floor", lease, now, limit))
            await cursor.fetchall()
            times.append(time.perf_counter() - started)
            await conn.execute("ROLLBACK")
        return times
    finally:
        await conn.close()


# --- asyncpg -----------------------------------------------------------------------------------


async def asyncpg_connect(dsn: str) -> Any:
    """A plain asyncpg connection (statements are prepared and cached by asyncpg)."""
    import asyncpg

    return await asyncpg.connect(dsn, timeout=10)


async def asyncpg_claim(conn: Any, worker: str, limit: int) -> list[Row]:
    """Claim up to ``limit`` jobs with their notifications: one autocommitted statement."""
    return list(await conn.fetch(PG_CLAIM, worker, LEASE_SECONDS, limit, FEED_LOCK_KEY))


async def asyncpg_complete(conn: Any, worker: str, done: Done) -> int:
    """Write a batch's results and notifications: one autocommitted statement."""
    rows = [d[0] for d in done]
    written = await conn.fetch(
        PG_COMPLETE,
        [r[0] for r in rows],
        [r[3] for r in rows],
        [json.dumps(d[1]) for d in done],
        [d[2] for d in done],
        worker,
        [r[4] for r in rows],
        [r[5] for r in rows],
        [r[6] for r in rows],
        [r[0] for r in rows],
        [_message(COMPLETED, r) for r in rows],
        [_note_data(r) for r in rows],
        FEED_LOCK_KEY,
        [0 for _ in rows],
    )
    return len(written)


async def asyncpg_drain(dsn: str, worker: str, batch: int) -> int:
    """Claim, run and complete batches until nothing is pending; returns jobs done."""
    conn = await asyncpg_connect(dsn)
    done_count = 0
    try:
        while rows := await asyncpg_claim(conn, worker, batch):
            done_count += await asyncpg_complete(conn, worker, await _run_batch(rows))
        return done_count
    finally:
        await conn.close()


async def asyncpg_pickup(
    dsn: str, worker: str, batch: int, count: int, limit_seconds: float
) -> int:
    """LISTEN on the insert trigger's channel, claim and stamp on each notification."""
    listener = await asyncpg_connect(dsn)
    conn = await asyncpg_connect(dsn)
    woke = asyncio.Event()
    await listener.add_listener("async_processor_tasks", lambda *_: woke.set())
    ready()
    done_count = 0
    deadline = time.monotonic() + limit_seconds
    try:
        while done_count < count:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                await asyncio.wait_for(woke.wait(), timeout=left)
            except TimeoutError:
                break
            woke.clear()
            while rows := await asyncpg_claim(conn, worker, batch):
                done = [(row, stamp_result(), 0.0) for row in rows]
                done_count += await asyncpg_complete(conn, worker, done)
        return done_count
    finally:
        await listener.close()
        await conn.close()


async def asyncpg_enqueue(dsn: str, count: int, rows: int, bulk_size: int) -> tuple[float, float]:
    """(seconds for ``count`` single-row transactions, seconds for ``rows`` rows inserted
    ``bulk_size`` per transaction with executemany)."""
    conn = await asyncpg_connect(dsn)
    try:
        insert = PG_INSERT + " RETURNING id"
        started = time.perf_counter()
        for i in range(count):
            async with conn.transaction():
                await conn.fetchval(insert, "bench_noop", json.dumps({"n": i}), "bench")
        single = time.perf_counter() - started
        started = time.perf_counter()
        for first in range(0, rows, bulk_size):
            chunk = [
                ("bench_noop", json.dumps({"n": i}), "bench")
                for i in range(first, min(rows, first + bulk_size))
            ]
            async with conn.transaction():
                await conn.executemany(PG_INSERT, chunk)
        return single, time.perf_counter() - started
    finally:
        await conn.close()


async def asyncpg_enqueue_alone(dsn: str, count: int, writers: int) -> float:
    """Seconds for ``count`` one-row inserts, each its own autocommitted statement (one
    round trip), spread over ``writers`` connections inserting at once."""
    conns = [await asyncpg_connect(dsn) for _ in range(writers)]
    try:
        insert = PG_INSERT + " RETURNING id"
        numbers = iter(range(count))

        async def writer(conn: Any) -> None:
            for i in numbers:
                await conn.fetchval(insert, "bench_noop", json.dumps({"n": i}), "bench")

        started = time.perf_counter()
        await asyncio.gather(*(writer(c) for c in conns))
        return time.perf_counter() - started
    finally:
        for conn in conns:
            await conn.close()


async def asyncpg_rows_made_here(dsn: str, rows: int, bulk_size: int) -> float:
    """Seconds for ``rows`` rows made by PostgreSQL itself, ``bulk_size`` per transaction
    (PG_ROWS_MADE_HERE, autocommitted: one statement, one transaction)."""
    conn = await asyncpg_connect(dsn)
    try:
        started = time.perf_counter()
        for first in range(0, rows, bulk_size):
            await conn.execute(PG_ROWS_MADE_HERE, first, min(bulk_size, rows - first))
        return time.perf_counter() - started
    finally:
        await conn.close()


async def rows_made_here(driver: str, target: str, rows: int, bulk_size: int) -> float:
    """The engine's bulk-enqueue ceiling through ``driver`` (sqlite3 or asyncpg)."""
    if driver == "sqlite3":
        return await asyncio.to_thread(sqlite3_rows_made_here, target, rows, bulk_size)
    return await asyncpg_rows_made_here(target, rows, bulk_size)


async def asyncpg_claim_times(dsn: str, iterations: int, limit: int) -> list[float]:
    """Seconds taken by the claim statement alone, each in a transaction rolled back."""
    conn = await asyncpg_connect(dsn)
    times = []
    try:
        for _ in range(iterations):
            tx = conn.transaction()
            await tx.start()
            started = time.perf_counter()
            await conn.fetch(PG_CLAIM, "floor", LEASE_SECONDS, limit, FEED_LOCK_KEY)
            times.append(time.perf_counter() - started)
            await tx.rollback()
        return times
    finally:
        await conn.close()


# --- entry points used by the runner -------------------------------------------------------------


async def enqueue_floor(
    driver: str, target: str, count: int, rows: int, bulk_size: int, synchronous: str = "NORMAL"
) -> tuple[float, float]:
    """Enqueue floor of ``driver`` against ``target`` (SQLite path or PostgreSQL DSN):
    seconds for ``count`` single enqueues, then for ``rows`` rows ``bulk_size`` at a time
    (``synchronous``: sqlite3's, for the SQLITE_SYNCHRONOUS variant)."""
    if driver == "sqlite3":
        return await asyncio.to_thread(sqlite3_enqueue, target, count, rows, bulk_size, synchronous)
    if driver == "aiosqlite":
        return await aiosqlite_enqueue(target, count, rows, bulk_size)
    return await asyncpg_enqueue(target, count, rows, bulk_size)


async def claim_floor(driver: str, target: str, iterations: int, limit: int) -> list[float]:
    """Claim-statement timings of ``driver`` (aiosqlite or asyncpg)."""
    if driver == "aiosqlite":
        return await aiosqlite_claim_times(target, iterations, limit)
    return await asyncpg_claim_times(target, iterations, limit)


# --- the worker process --------------------------------------------------------------------------


def ready() -> None:
    """Tell the runner this worker is connected and waiting."""
    print("READY", flush=True)


def rss_kb() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in kB."""
    found = {}
    with open(f"/proc/{os.getpid()}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0])
    return found


def _run(
    mode: str,
    driver: str,
    target: str,
    batch: int,
    count: int,
    timeout: float,
    synchronous: str = "NORMAL",
) -> int:
    worker = f"floor-{driver}-{os.getpid()}"
    runners: dict[tuple[str, str], Callable[[], int | Awaitable[int]]] = {
        ("drain", "sqlite3"): lambda: sqlite3_drain(target, worker, batch, synchronous),
        ("drain", "aiosqlite"): lambda: aiosqlite_drain(target, worker, batch),
        ("drain", "asyncpg"): lambda: asyncpg_drain(target, worker, batch),
        ("pickup", "sqlite3"): lambda: sqlite3_pickup(target, worker, batch, count, timeout),
        ("pickup", "asyncpg"): lambda: asyncpg_pickup(target, worker, batch, count, timeout),
    }
    runner = runners.get((mode, driver))
    if runner is None:
        raise SystemExit(f"no {mode} floor for driver {driver}")
    if mode == "drain":
        ready()
    outcome = runner()
    if isinstance(outcome, int):
        return outcome

    async def wait() -> int:
        return await outcome

    return asyncio.run(wait())


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.floors MODE --driver D --target T``: run one floor worker."""
    parser = argparse.ArgumentParser(prog="python -m bench.floors")
    parser.add_argument("mode", choices=("drain", "pickup"))
    parser.add_argument("--driver", choices=DRIVERS, required=True)
    parser.add_argument("--target", required=True, help="SQLite path or PostgreSQL DSN")
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--count", type=int, default=0, help="pickup: jobs to wait for")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument(
        "--synchronous", default="NORMAL", choices=("NORMAL", "FULL"), help="sqlite3's drain"
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    done = _run(
        args.mode, args.driver, args.target, args.batch, args.count, args.timeout, args.synchronous
    )
    report = {"done": done, "seconds": time.perf_counter() - started, **rss_kb()}
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
