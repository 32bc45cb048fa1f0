"""The conformance suite: every queue statement, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import os
import random
import sqlite3
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event, func, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

from app import db as db_module
from app.db import Database
from app.models import AnalysisNotification, NotificationType, PendingAnalysis, Processor
from app.models.types import utcnow
from app.services import hotpath, notifications, queue
from app.services.queue import CancelOutcome, FailOutcome, RetryOutcome, TaskSpec
from tests.helpers import notes_of, task_row

PID = "proc-a"
OTHER = "proc-b"


@pytest.fixture(autouse=True, params=["driver", "core"])
def execution_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every statement proven both ways: the hot ones on the bare driver (app.services.hotpath,
    what the daemon runs) and everything through ``session.execute``."""
    monkeypatch.setattr(hotpath, "ENABLED", request.param == "driver")
    return str(request.param)


async def enqueue(db: Database, **spec: object) -> int:
    spec.setdefault("kind", "chapter_analysis")
    spec.setdefault("user_id", "alice")
    async with db.write_transaction() as s:
        return (await queue.enqueue_task(s, **spec)).id


async def claim(
    db: Database, limit: int = 10, pid: str = PID, **kw: object
) -> list[queue.ClaimedTask]:
    async with db.write_transaction() as s:
        return await queue.claim_tasks(s, processor_id=pid, limit=limit, lease_seconds=30, **kw)


# --- enqueue -------------------------------------------------------------------------------


async def test_enqueue_task_inserts_a_pending_row(db: Database) -> None:
    task_id = await enqueue(db, payload={"text": "hi"}, priority=7, project_id="p", chapter_id="c")
    row = await task_row(db, task_id)
    assert (row.status, row.kind, row.priority, row.queue) == (
        "pending",
        "chapter_analysis",
        7,
        "default",
    )
    assert row.payload == {"text": "hi"}
    assert (row.retry_count, row.attempts, row.max_retries, row.timeout_seconds) == (0, 0, 3, 600)
    assert (row.user_id, row.project_id, row.chapter_id) == ("alice", "p", "c")
    assert row.scheduled_at.tzinfo is not None and row.locked_by is None
    assert abs((row.scheduled_at - utcnow()).total_seconds()) < 5
    assert await notes_of(db, task_id) == []


async def test_enqueue_is_part_of_the_callers_transaction(db: Database) -> None:
    async with db.write_sessionmaker() as s:
        await s.begin()
        await queue.enqueue_task(s, kind="k")
        await s.rollback()
    async with db.read_transaction() as s:
        assert (await s.execute(select(PendingAnalysis.id))).all() == []


async def test_enqueue_many_with_a_pinned_clock(db: Database) -> None:
    """Several rows in one multi-VALUES insert with a host-side time (a pinned clock here;
    SQLite always): each time is a per-row parameter (a shared one broke asyncpg)."""
    at = datetime(2026, 1, 1, tzinfo=UTC)
    specs = [{"kind": "noop"}, {"kind": "noop", "idempotency_key": "k1"}, {"kind": "noop"}]
    async with db.write_transaction() as s:
        rows = await queue.enqueue_tasks(
            s, [*specs, {"kind": "noop", "idempotency_key": "k2"}], now=at
        )
    for r in rows:
        row = await task_row(db, r.id)
        assert (row.created_at, row.updated_at, row.scheduled_at) == (at, at, at)


async def test_idempotency_key_returns_the_existing_task(db: Database) -> None:
    async with db.write_transaction() as s:
        first = await queue.enqueue_task(s, kind="k", idempotency_key="key-1")
    async with db.write_transaction() as s:
        again = await queue.enqueue_task(s, kind="k", idempotency_key="key-1", priority=9)
    assert first.created and not again.created and first.id == again.id
    assert (await task_row(db, first.id)).priority == 5


async def test_enqueue_tasks_keeps_input_order_and_mixes_keys(db: Database) -> None:
    async with db.write_transaction() as s:
        existing = await queue.enqueue_task(s, kind="k", idempotency_key="dup")
    specs = [
        TaskSpec(kind="k", payload={"n": 0}),
        {"kind": "k", "payload": {"n": 1}, "idempotency_key": "dup"},
        TaskSpec(kind="k", payload={"n": 2}, idempotency_key="new"),
        TaskSpec(kind="k", payload={"n": 3}),
    ]
    async with db.write_transaction() as s:
        results = await queue.enqueue_tasks(s, specs)
    assert [r.created for r in results] == [True, False, True, True]
    assert results[1].id == existing.id
    payloads = [(await task_row(db, r.id)).payload for r in results]
    assert payloads == [{"n": 0}, {}, {"n": 2}, {"n": 3}]


async def test_bulk_enqueue_keeps_order_in_a_statement_a_chunk(db: Database) -> None:
    """2,500 rows: ids come back in input order, and the rows go out in one statement per
    chunk of PIPELINE_ROWS on PostgreSQL (INSERT … SELECT FROM jsonb_array_elements), in
    ONE on SQLite (INSERT … SELECT FROM json_each), never one per row."""
    chunks = -(-2500 // queue.PIPELINE_ROWS) if db.dialect == "postgresql" else 1
    assert len(await _enqueue_2500_in_order(db)) == chunks


@pytest.mark.parametrize("engine_name", ["postgresql"])
async def test_postgresql_splits_a_bulk_document_past_its_payload_bytes(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """jsonb refuses an array past 256 MB (and numbers take ~6x their text there): a
    document is cut at PG_DOCUMENT_BYTES of payload, the ids still in input order, in a
    session and alone."""
    monkeypatch.setattr(queue, "PG_DOCUMENT_BYTES", 100 * len('{"n": 100}'))
    assert len(await _enqueue_2500_in_order(db)) > -(-2500 // queue.PIPELINE_ROWS)
    alone = await queue.enqueue_tasks_alone(
        db, [{"kind": "k", "payload": {"n": n}} for n in range(300)]
    )
    assert [r.id for r in alone] == sorted(r.id for r in alone)
    payloads = [(await task_row(db, r.id)).payload for r in alone]
    assert payloads == [{"n": n} for n in range(300)]


async def test_a_chunked_enqueue_mixes_keys_across_chunks(db: Database) -> None:
    """More rows than a chunk, keys among them: every position gets its own task in input
    order, a known key its existing task (created=False), a key repeated in the call the
    first one's task, and the plain rows their ids in input order."""
    async with db.write_transaction() as s:
        existing = await queue.enqueue_task(s, kind="k", idempotency_key="known")
    count = queue.PIPELINE_ROWS * 2 + 17
    keys = {5: "known", 40: "a", queue.PIPELINE_ROWS + 3: "a", count - 1: "b"}
    specs = [
        {"kind": "k", "payload": {"n": n}, **({"idempotency_key": keys[n]} if n in keys else {})}
        for n in range(count)
    ]
    async with db.write_transaction() as s:
        results = await queue.enqueue_tasks(s, specs)
    created = [n for n, r in enumerate(results) if r.created]
    assert created == [n for n in range(count) if n not in (5, queue.PIPELINE_ROWS + 3)]
    assert results[5].id == existing.id
    assert results[queue.PIPELINE_ROWS + 3].id == results[40].id
    plain = [results[n].id for n in range(count) if n not in keys]
    assert plain == sorted(plain)
    async with db.read_transaction() as s:
        rows = dict((await s.execute(select(PendingAnalysis.id, PendingAnalysis.payload))).all())
    assert len(rows) == count - 1  # the known key's task, and one row per new position
    assert all(rows[results[n].id] == {"n": n} for n in created)


async def test_a_chunked_enqueue_is_all_or_none(db: Database) -> None:
    """A bad spec past the first chunks raises InvalidTaskError with none of the call's
    rows inserted (on PostgreSQL, after the earlier chunks went to the server); the
    caller's transaction goes on (its own earlier row is kept) and commits."""
    count = queue.PIPELINE_ROWS * 3
    specs: list[dict[str, Any]] = [{"kind": "k", "payload": {"n": n}} for n in range(count)]
    specs[count - 10] = {"kind": "k", "priority": 99}
    async with db.write_transaction() as s:
        mine = await queue.enqueue_task(s, kind="mine")
        with pytest.raises(queue.InvalidTaskError, match="priority"):
            await queue.enqueue_tasks(s, specs)
        after = await queue.enqueue_task(s, kind="after")
    assert sorted(await _raw_rows(db)) == [mine.id, after.id]


async def test_a_chunked_enqueue_cancelled_anywhere_leaves_a_clean_session(db: Database) -> None:
    """A bulk enqueue cancelled at any point of its chunks (the caller's timeout, a client
    gone) stops with no statement left running on the session: the caller's transaction
    rolls back (or, cancelled while its COMMIT was on the way, commits: all of the rows),
    the connection serves the next transaction, and no call leaves part of its rows."""
    specs = [{"kind": "k", "payload": {"n": n}} for n in range(queue.PIPELINE_ROWS * 3)]
    await _cancel_everywhere(db, specs, 40)


async def test_an_enqueue_cancelled_anywhere_leaves_a_clean_connection(db: Database) -> None:
    """An enqueue cancelled at any point (the caller's timeout, a client gone) leaves the
    connection clean: the caller's transaction rolls back (or, cancelled while its COMMIT
    was on the way, commits all of the rows). Cancelled while SQLite's BEGIN IMMEDIATE was
    queued on aiosqlite's thread, the connection went back to the pool with the BEGIN still
    to run, and the next transaction on it failed ("cannot start a transaction within a
    transaction")."""
    await _cancel_everywhere(db, [{"kind": "k", "payload": {"n": n}} for n in range(200)], 25)


async def _cancel_everywhere(db: Database, specs: list[dict[str, Any]], steps: int) -> None:
    for step in range(steps):

        async def enqueue() -> None:
            async with db.write_transaction() as s:
                await queue.enqueue_tasks(s, specs)

        task = asyncio.create_task(enqueue())
        for _ in range(step):
            await asyncio.sleep(0)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        assert len(await _raw_rows(db)) in (0, len(specs)), step
        async with db.write_transaction() as s:
            await s.execute(text("DELETE FROM pending_analysis"))
    async with db.write_transaction() as s:
        last = await queue.enqueue_tasks(s, specs)
    assert len(await _raw_rows(db)) == len(last)


_RAW_COLUMNS = (
    "kind, queue, status, priority, payload, max_retries, timeout_seconds, user_id, project_id,"
    " chapter_id, idempotency_key, scheduled_at, created_at, updated_at, retry_count, attempts,"
    " token_usage, cancel_requested, locked_by, lease_expires_at"
)


async def _raw_rows(db: Database) -> dict[int, tuple[Any, ...]]:
    async with db.read_transaction() as s:
        found = await s.execute(text(f"SELECT id, {_RAW_COLUMNS} FROM pending_analysis"))
        return {row[0]: tuple(row[1:]) for row in found}


def _count_begins(db: Database) -> list[int]:
    """How many transactions SQLAlchemy begins on the engine (the list's length)."""
    begins: list[int] = []
    event.listen(db.engine.sync_engine, "begin", lambda _conn: begins.append(1))
    return begins


async def test_an_enqueue_alone_stores_what_an_enqueue_in_a_session_does(
    db: Database, execution_path: str
) -> None:
    """enqueue_task_alone (a transaction of its own: PostgreSQL's one autocommitted
    statement, SQLite's bare connection) writes the very same raw row as enqueue_task in a
    session, committed when it returns; no session transaction on the driver path."""
    at = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    spec: dict[str, Any] = {
        "kind": "k",
        "payload": {"b": [1, 2.5, None, True], "a": 'é ✓ "q" \\ \n'},
        "priority": 8,
        "queue": "ingest",
        "max_retries": 7,
        "timeout_seconds": 42,
        "scheduled_at": at + timedelta(hours=1),
        "user_id": "ü",
        "project_id": "p",
        "chapter_id": "c",
    }
    async with db.write_transaction() as s:
        in_session = await queue.enqueue_task(s, now=at, **spec)
    begins = _count_begins(db)
    alone = await queue.enqueue_task_alone(db, now=at, **spec)
    assert len(begins) == (0 if execution_path == "driver" else 1)
    assert alone.created and alone.id == in_session.id + 1
    raw = await _raw_rows(db)
    assert raw[alone.id] == raw[in_session.id]
    # The database's clock when none is pinned, as enqueue_task.
    unpinned = await queue.enqueue_task_alone(db, kind="k")
    row = await task_row(db, unpinned.id)
    assert (row.status, row.priority, row.queue, row.user_id) == ("pending", 5, "default", None)
    assert abs((row.created_at - utcnow()).total_seconds()) < 5
    assert row.scheduled_at == row.created_at


async def test_enqueue_tasks_alone_keeps_order_and_keys_in_one_transaction(
    db: Database, execution_path: str
) -> None:
    """Many specs: ONE transaction of their own, ids in input order (PostgreSQL: the one
    document statement, autocommitted; without the hot path, a statement per chunk of
    PIPELINE_ROWS); with idempotency keys, an ordinary write transaction that answers
    created=False for a known key."""
    inserts: list[str] = []

    def count(sql: str) -> None:
        if sql.lstrip().upper().startswith("INSERT INTO PENDING_ANALYSIS"):
            inserts.append(sql)

    event.listen(db.engine.sync_engine, "before_cursor_execute", lambda *a: count(a[2]))
    with hotpath.watch(lambda sql, _args, _seconds: count(sql)):
        ids = await queue.enqueue_tasks_alone(
            db, [{"kind": "k", "payload": {"n": n}} for n in range(300)]
        )
    chunked = db.dialect == "postgresql" and execution_path == "core"
    assert len(inserts) == (-(-300 // queue.PIPELINE_ROWS) if chunked else 1)
    assert [r.created for r in ids] == [True] * 300
    payloads = {r.id: (await task_row(db, r.id)).payload for r in ids}
    assert list(payloads.values()) == [{"n": n} for n in range(300)]
    first = await queue.enqueue_task_alone(db, kind="k", idempotency_key="dup")
    mixed = await queue.enqueue_tasks_alone(
        db,
        [
            TaskSpec(kind="k", payload={"n": 0}),
            {"kind": "k", "idempotency_key": "dup", "priority": 9},
            TaskSpec(kind="k", idempotency_key="new"),
        ],
    )
    assert [r.created for r in mixed] == [True, False, True]
    assert mixed[1].id == first.id and (await task_row(db, first.id)).priority == 5
    assert await queue.enqueue_tasks_alone(db, []) == []


async def _refuse_kind(db: Database, kind: str) -> None:
    """A trigger that makes the database itself refuse any row of this kind: a statement
    that passes every check in Python and still fails in SQL."""
    async with db.write_transaction() as s:
        if db.dialect == "sqlite":
            await s.execute(
                text(
                    "CREATE TRIGGER refuse BEFORE INSERT ON pending_analysis "
                    f"WHEN NEW.kind = '{kind}' BEGIN SELECT RAISE(ABORT, 'refused by trigger'); END"
                )
            )
        else:
            await s.execute(
                text(
                    "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                    f"IF NEW.kind = '{kind}' THEN RAISE EXCEPTION 'refused by trigger'; END IF; "
                    "RETURN NEW; END $$"
                )
            )
            await s.execute(
                text(
                    "CREATE TRIGGER refuse BEFORE INSERT ON pending_analysis "
                    "FOR EACH ROW EXECUTE FUNCTION refuse()"
                )
            )


async def test_an_enqueue_alone_that_fails_keeps_nothing(db: Database, execution_path: str) -> None:
    """A bad spec (a priority out of range, a lone surrogate no UTF-8 can hold) is refused
    before any SQL; a statement the database refuses (here by a trigger) leaves no row and
    no open transaction: the next enqueue on the same connection goes through."""
    with pytest.raises(queue.InvalidTaskError, match="priority"):
        await queue.enqueue_task_alone(db, kind="k", priority=11)
    with pytest.raises(queue.InvalidTaskError, match="lone surrogate"):
        await queue.enqueue_task_alone(db, kind="k", user_id="u\ud800")
    await _refuse_kind(db, "refused")
    with pytest.raises(Exception, match="refused by trigger"):
        await queue.enqueue_task_alone(db, kind="refused")
    with pytest.raises(Exception, match="refused by trigger"):
        await queue.enqueue_tasks_alone(db, [{"kind": "k"}, {"kind": "refused"}])
    assert await _raw_rows(db) == {}
    done = await queue.enqueue_task_alone(db, kind="k")
    assert list(await _raw_rows(db)) == [done.id]


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_enqueues_alone_keep_the_wal_short(db: Database, execution_path: str) -> None:
    """The bare connection's commits never checkpoint; every HERE_CHECKPOINT_EVERY of them
    the Database checkpoints while no writer of its own runs, so a process whose every
    write is an enqueue alone still keeps its WAL near SQLite's 1,000-page threshold (one
    that did not would pass 4,000 pages here: six or seven a commit)."""
    wal = f"{db.engine.url.database}-wal"
    for n in range(700):
        await queue.enqueue_task_alone(db, kind="k", payload={"n": n})
    pages = await asyncio.to_thread(os.path.getsize, wal) // 4096
    assert pages < 2_500, pages
    assert len(await _raw_rows(db)) == 700


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_an_enqueue_alone_cut_short_never_leaves_a_job_behind(
    db: Database, execution_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every call under a timeout that fires while a (slow) checkpoint runs: a call that
    returned made exactly one job, a call cut short made none; the checkpoint runs before
    a transaction, never between a commit and the call's return."""
    monkeypatch.setattr(db_module, "HERE_CHECKPOINT_EVERY", 2)
    real = db_module._HereWriter.checkpoint

    def slow_checkpoint(self: Any) -> None:
        time.sleep(0.4)
        real(self)

    monkeypatch.setattr(db_module._HereWriter, "checkpoint", slow_checkpoint)
    returned = cut = 0
    for _ in range(7):
        try:
            await asyncio.wait_for(queue.enqueue_task_alone(db, kind="k"), timeout=0.2)
            returned += 1
        except TimeoutError:
            cut += 1
        await asyncio.sleep(0.3)  # the cut-short checkpoint's thread finishes
    assert len(await _raw_rows(db)) == returned
    assert returned >= 2 and (cut > 0) == (execution_path == "driver")


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_a_checkpoint_that_fails_is_logged_and_tried_again_later(
    db: Database,
    execution_path: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A checkpoint that cannot run never fails an enqueue; it is a WARNING, and the next
    try comes after HERE_CHECKPOINT_EVERY more commits, not before every transaction."""
    monkeypatch.setattr(db_module, "HERE_CHECKPOINT_EVERY", 3)
    tries = 0

    def broken(self: Any) -> None:
        nonlocal tries
        tries += 1
        raise sqlite3.OperationalError("unable to open database file")

    monkeypatch.setattr(db_module._HereWriter, "checkpoint", broken)
    caplog.set_level(logging.WARNING, logger=db_module.logger.name)
    for _ in range(10):
        await queue.enqueue_task_alone(db, kind="k")
    assert len(await _raw_rows(db)) == 10
    expected = 3 if execution_path == "driver" else 0  # before the 4th, 7th and 10th
    assert tries == expected
    failures = [r for r in caplog.records if "checkpoint of" in r.getMessage()]
    assert len(failures) == expected and all(r.levelname == "WARNING" for r in failures)


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_a_large_payload_is_not_written_on_the_event_loop(
    db: Database, execution_path: str
) -> None:
    """SQLite: a payload above HERE_MAX_PAYLOAD_CHARS goes the usual way (a driver thread),
    both forms; a small one takes the bare connection on the loop (hot path on)."""
    big = {"text": "x" * (queue.HERE_MAX_PAYLOAD_CHARS + 1)}
    first = await queue.enqueue_task_alone(db, kind="k", payload=big)
    row = await queue.enqueue_task_alone_row(db, queue.TaskSpec(kind="k", payload=big))
    assert db._here is not None and db._here._connections == {}
    small = await queue.enqueue_task_alone(db, kind="k", payload={"n": 1})
    assert len(db._here._connections) == (1 if execution_path == "driver" else 0)
    ids = {first.id, small.id}
    if execution_path == "driver":
        assert row is not None and row.payload == big
        ids.add(row.id)
    else:
        assert row is None  # the hot path off: the caller enqueues in a transaction
    assert set(await _raw_rows(db)) == ids


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_an_enqueue_alone_after_dispose_opens_no_bare_connection(
    db: Database, execution_path: str
) -> None:
    """A Database used again after dispose() writes the usual way (its engine reconnects);
    the bare connection dispose() closed is not opened again, unmanaged."""
    await queue.enqueue_task_alone(db, kind="k")
    await db.dispose()
    done = await queue.enqueue_task_alone(db, kind="k")
    assert db._here is None or db._here._connections == {}
    assert done.id in await _raw_rows(db)


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_an_enqueue_alone_waits_for_another_processs_lock(
    db: Database, execution_path: str
) -> None:
    """The bare connection never waits for the write lock: while another connection holds
    it, the enqueue takes the usual path, which waits (the event loop keeps turning), and
    commits once the lock is free."""
    other = sqlite3.connect(db.engine.url.database or "", isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        pending = asyncio.create_task(queue.enqueue_task_alone(db, kind="k"))
        await asyncio.sleep(0.3)
        assert not pending.done()
        other.execute("COMMIT")
        done = await asyncio.wait_for(pending, timeout=10)
    finally:
        other.close()
    assert list(await _raw_rows(db)) == [done.id]


@pytest.mark.parametrize("engine_name", ["sqlite"])
@pytest.mark.parametrize("form", ["chunked", "executemany"])
async def test_sqlite_bulk_enqueue_other_forms_keep_order(
    db: Database, form: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite splits its document only past SQLITE_DOCUMENT_BYTES of payload (ids still in
    input order across the statements); before SQLite 3.38 one executemany does it."""
    if form == "chunked":
        monkeypatch.setattr(queue, "SQLITE_DOCUMENT_BYTES", 1000 * len('{"n": 1000}'))
    else:
        monkeypatch.setattr(queue, "SQLITE_JSON_ARROWS", False)
    assert len(await _enqueue_2500_in_order(db)) == (3 if form == "chunked" else 1)


async def _enqueue_2500_in_order(db: Database) -> list[str]:
    """Enqueue 2,500 rows in one call, check their ids and rows; the INSERTs it sent."""
    statements: list[str] = []

    def count(sql: str) -> None:
        if sql.lstrip().upper().startswith("INSERT INTO PENDING_ANALYSIS"):
            statements.append(sql)

    def on_cursor(conn: object, cursor: object, sql: str, *args: object) -> None:
        count(sql)

    event.listen(db.engine.sync_engine, "before_cursor_execute", on_cursor)
    try:
        with hotpath.watch(lambda sql, _args, _seconds: count(sql)):
            async with db.write_transaction() as s:
                results = await queue.enqueue_tasks(
                    s, [{"kind": "k", "payload": {"n": n}} for n in range(2500)]
                )
    finally:
        event.remove(db.engine.sync_engine, "before_cursor_execute", on_cursor)
    assert [r.created for r in results] == [True] * 2500
    async with db.read_transaction() as s:
        rows = dict((await s.execute(select(PendingAnalysis.id, PendingAnalysis.payload))).all())
    assert [rows[r.id] for r in results] == [{"n": n} for n in range(2500)]
    return statements


async def test_bulk_enqueue_writes_every_field_of_every_row(db: Database) -> None:
    """Each row of a bulk enqueue gets its own fields and its own id, after ids were used
    and deleted (SQLite never gives a deleted row's id again), beside rows another
    transaction enqueued."""
    async with db.write_transaction() as s:
        old = await queue.enqueue_tasks(s, [{"kind": "k"} for _ in range(5)])
        await s.execute(
            PendingAnalysis.__table__.delete().where(PendingAnalysis.id.in_([r.id for r in old]))
        )
    later = datetime(2030, 1, 1, tzinfo=UTC)
    specs = [
        {
            "kind": f"kind-{n % 3}",
            "payload": {"n": n, "text": 'é ✓ "q"' if n == 4 else "x"},
            "priority": 1 + n % 10,
            "queue": "q2" if n % 2 else "default",
            "max_retries": n % 4,
            "timeout_seconds": 10 + n,
            "scheduled_at": later + timedelta(seconds=n) if n % 3 == 0 else None,
            "user_id": f"u{n}" if n % 2 else None,
            "project_id": f"p{n}" if n % 4 else None,
            "chapter_id": f"c{n}" if n % 5 else None,
        }
        for n in range(12)
    ]
    async with db.write_transaction() as s:
        results = await queue.enqueue_tasks(s, specs)
    assert min(r.id for r in results) > max(r.id for r in old)
    assert len({r.id for r in results}) == len(specs)
    for spec, result in zip(specs, results, strict=True):
        row = await task_row(db, result.id)
        got = {name: getattr(row, name) for name in spec if name != "scheduled_at"}
        assert got == {k: v for k, v in spec.items() if k != "scheduled_at"}
        assert (row.status, row.attempts, row.retry_count) == ("pending", 0, 0)
        if spec["scheduled_at"] is not None:
            assert row.scheduled_at == spec["scheduled_at"]
        else:
            assert abs((row.scheduled_at - row.created_at).total_seconds()) < 1


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_bulk_enqueue_stores_the_same_text_as_one_enqueue(db: Database) -> None:
    """SQLite's bulk document carries each payload as the JSON text the column type binds
    (not re-serialised by SQLite), and times in the stored format: the raw columns of a
    bulk row equal those of the same task enqueued alone."""
    at = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    spec = {
        "kind": "k",
        "payload": {"b": [1, 2.5, None, True], "a": 'é ✓ "q" \\ \n', "u": "\\u0000 as text"},
        "scheduled_at": at,
        "user_id": "ü",
    }
    async with db.write_transaction() as s:
        [alone] = await queue.enqueue_tasks(s, [spec], now=at)
        bulk = await queue.enqueue_tasks(s, [spec, spec], now=at)
    columns = "kind, queue, status, priority, payload, max_retries, timeout_seconds, user_id,"
    columns += " project_id, chapter_id, scheduled_at, created_at, updated_at, typeof(priority)"
    async with db.read_transaction() as s:
        raw = {
            row[0]: tuple(row[1:])
            for row in await s.execute(text(f"SELECT id, {columns} FROM pending_analysis"))
        }
    assert raw[bulk[0].id] == raw[alone.id] == raw[bulk[1].id]
    assert raw[alone.id][4] == json.dumps(spec["payload"])


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_sqlite_bulk_enqueue_honours_an_engines_own_json_serializer(
    database_url: str,
) -> None:
    """The bulk insert reuses the JSON text TaskSpec's validation made only where the
    engine serializes JSON as json.dumps does; an application's engine with its own
    json_serializer stores its text, as that engine's one-row INSERT does."""
    # An engine of the default serializer enqueues first, so the one-row statements are
    # compiled for it before the other engine uses them (compiled statements were once
    # shared by dialect name, and the second engine stored the first one's JSON text).
    plain = Database(create_async_engine(database_url))
    try:
        await queue.enqueue_task_alone(plain, kind="k", payload={"a": [1, 2]})
        await queue.enqueue_task_alone_row(plain, TaskSpec(kind="k"))
        async with plain.read_transaction() as s:
            warmed = (await s.execute(text("SELECT max(id) FROM pending_analysis"))).scalar()
    finally:
        await plain.dispose()
    compact = functools.partial(json.dumps, separators=(",", ":"))
    db = Database(create_async_engine(database_url, json_serializer=compact))
    try:
        async with db.write_transaction() as s:
            ids = [
                r.id
                for r in await queue.enqueue_tasks(s, [{"kind": "k", "payload": {"a": [1, 2]}}] * 2)
            ]
        # The one-row enqueues on the bare connection too (queue._SpecArgs is not used).
        alone = await queue.enqueue_task_alone(db, kind="k", payload={"a": [1, 2]})
        row = await queue.enqueue_task_alone_row(db, TaskSpec(kind="k", payload={"a": [1, 2]}))
        async with db.read_transaction() as s:
            later = {"after": warmed}
            stored = (
                await s.execute(
                    text("SELECT DISTINCT payload FROM pending_analysis WHERE id > :after"), later
                )
            ).all()
            count = (
                await s.execute(
                    text("SELECT count(*) FROM pending_analysis WHERE id > :after"), later
                )
            ).scalar()
    finally:
        await db.dispose()
    assert len(ids) == 2
    assert alone.created
    assert (row is not None) == hotpath.ENABLED  # None: the hot path is off (the caller's way)
    assert row is None or row.payload == {"a": [1, 2]}
    assert count == 3 + hotpath.ENABLED
    assert stored == [('{"a":[1,2]}',)]


async def test_an_engine_with_its_own_json_serializer_enqueues_alone(database_url: str) -> None:
    """queue._SpecArgs binds the payload as validation encoded it, so an engine with its
    own json_serializer takes the usual bind: enqueue_task_alone and
    enqueue_task_alone_row still write (and answer) the task, on both engines."""
    compact = functools.partial(json.dumps, separators=(",", ":"))
    db = Database(create_async_engine(database_url, json_serializer=compact))
    try:
        alone = await queue.enqueue_task_alone(db, kind="k", payload={"a": [1, 2]}, user_id="u")
        row = await queue.enqueue_task_alone_row(db, TaskSpec(kind="k", payload={"b": "é"}))
        first = await task_row(db, alone.id)
    finally:
        await db.dispose()
    assert alone.created and first.payload == {"a": [1, 2]} and first.user_id == "u"
    assert (row is not None) == hotpath.ENABLED  # None: the hot path is off (the caller's way)
    assert row is None or (row.payload == {"b": "é"} and row.id == alone.id + 1)


async def test_bulk_enqueue_stores_each_payload_as_validated(db: Database) -> None:
    """A TaskSpec carries its payload's JSON text from validation; the bulk insert stores
    that text, on both engines: every payload comes back equal, unicode and escapes
    included, and a spec made once and enqueued twice stores the same payload twice."""
    payloads: list[dict[str, Any]] = [
        {"n": n, "s": 'é ✓ "q" \\ \n \u2028', "nested": {"list": [1, 2.5, None, True, {}]}}
        for n in range(3)
    ]
    spec = TaskSpec(kind="k", payload={"same": "spec"})
    async with db.write_transaction() as s:
        results = await queue.enqueue_tasks(
            s, [*({"kind": "k", "payload": p} for p in payloads), spec, spec]
        )
    stored = [(await task_row(db, r.id)).payload for r in results]
    assert stored == [*payloads, {"same": "spec"}, {"same": "spec"}]
    assert spec.payload_json == json.dumps({"same": "spec"})

    class Subclass(dict[str, Any]):
        pass

    assert TaskSpec(kind="k", payload=Subclass(a=1)).payload_json == '{"a": 1}'


async def test_bulk_enqueue_of_a_string_utf8_cannot_hold_inserts_nothing(db: Database) -> None:
    """A lone surrogate in a column's string (only the library can pass one; JSON bodies
    cannot) fails the whole call before any SQL, as it fails a single enqueue: never a row
    stored with text that cannot be read back."""
    specs = [{"kind": "k"}, {"kind": "k", "user_id": "u\ud800"}, {"kind": "k"}]
    with pytest.raises(queue.InvalidTaskError, match="lone surrogate"):
        async with db.write_transaction() as s:
            await queue.enqueue_tasks(s, specs)
    async with db.read_transaction() as s:
        assert (await s.execute(select(func.count()).select_from(PendingAnalysis))).scalar() == 0


@pytest.mark.parametrize(
    "bad",
    [
        {"priority": 0},
        {"priority": 11},
        {"timeout_seconds": 0},
        {"max_retries": -1},
        {"kind": ""},
        {"queue": ""},
        {"payload": [1, 2]},
        {"payload": {"x": float("nan")}},
        {"user_id": "u" * 256},
        {"kind": "k" * 101},
        {"queue": "q" * 101},
        {"project_id": ""},
        {"chapter_id": "c" * 256},
        {"idempotency_key": ""},
        {"payload": {"x": object()}},
        {"payload": {"x": "a\x00b"}},
        {"payload": {"a\x00": 1}},
        {"kind": "k\x00"},
        {"queue": "q\x00"},
        {"user_id": "u\x00"},
        {"project_id": "\x00"},
        {"chapter_id": "c\x00"},
        {"idempotency_key": "key\x00"},
        {"max_retries": 2**31},  # the columns are 32-bit integers
        {"timeout_seconds": 2**31},
        {"max_retries": "3"},  # not an integer: a clear error, not a TypeError
        {"kind": 5},  # not strings: never stored as their JSON text
        {"queue": ("q",)},
        {"user_id": ["a"]},
        {"project_id": {"a": 1}},
        {"chapter_id": 7},
        {"idempotency_key": b"k"},
        {"priority": 5.0},
        {"priority": True},  # a bool is an int to Python, not to the API or the CLI
        {"max_retries": False},
    ],
)
def test_invalid_specs_are_rejected(bad: dict[str, object]) -> None:
    spec: dict[str, object] = {"kind": "k", **bad}
    with pytest.raises(queue.InvalidTaskError):
        TaskSpec(**spec)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "good",
    [
        {"payload": {"text": "\\u0000 written out"}},  # a backslash, then u0000: no NUL
        {"kind": "k" * 100, "user_id": "u" * 255, "idempotency_key": "x"},
        {"payload": {"nested": [{"a": None}, 1.5, "é"]}},
    ],
)
def test_valid_specs_are_accepted(good: dict[str, object]) -> None:
    spec = TaskSpec(**{"kind": "k", **good})  # type: ignore[arg-type]
    row = spec.row()
    expected = {f.name: getattr(spec, f.name) for f in dataclasses.fields(TaskSpec) if f.init}
    expected["sched"] = expected.pop("scheduled_at")
    assert row == expected  # every field of the spec, nothing else


# --- claim -----------------------------------------------------------------------------------


async def test_claim_orders_by_priority_then_schedule_then_id(db: Database) -> None:
    now = utcnow()
    low = await enqueue(db, priority=2, scheduled_at=now - timedelta(seconds=30))
    high_late = await enqueue(db, priority=9, scheduled_at=now - timedelta(seconds=1))
    high_early = await enqueue(db, priority=9, scheduled_at=now - timedelta(seconds=10))
    mid_a = await enqueue(db, priority=5, scheduled_at=now - timedelta(seconds=5))
    mid_b = await enqueue(db, priority=5, scheduled_at=now - timedelta(seconds=5))
    claimed = await claim(db, limit=3)
    assert [t.id for t in claimed] == [high_early, high_late, mid_a]
    rest = await claim(db, limit=5)
    assert [t.id for t in rest] == [mid_b, low]


async def test_claim_sets_the_lease_and_writes_started(db: Database) -> None:
    task_id = await enqueue(db, payload={"a": 1})
    [task] = await claim(db)
    assert (task.id, task.attempt, task.payload, task.user_id) == (task_id, 1, {"a": 1}, "alice")
    row = await task_row(db, task_id)
    assert (row.status, row.locked_by, row.attempts) == ("processing", PID, 1)
    assert row.lease_expires_at is not None and row.started_at is not None
    assert 25 < (row.lease_expires_at - utcnow()).total_seconds() <= 31
    assert await notes_of(db, task_id) == [("started", "alice")]


async def test_claim_respects_limit_schedule_and_queues(db: Database) -> None:
    future = await enqueue(db, scheduled_at=utcnow() + timedelta(hours=1))
    other_q = await enqueue(db, queue="ingest")
    default_q = await enqueue(db)
    assert await claim(db, limit=0) == []
    assert [t.id for t in await claim(db, queues=["ingest"])] == [other_q]
    assert [t.id for t in await claim(db, queues=["default"])] == [default_q]
    assert await claim(db) == []
    later = await claim(db, now=utcnow() + timedelta(hours=2))
    assert [t.id for t in later] == [future]


@pytest.mark.parametrize("form", ["session", "alone"])
async def test_a_row_python_cannot_read_is_claimed_alone_never_holding_the_rest(
    db: Database, form: str
) -> None:
    """Rows edited by hand into values Python cannot read (a payload that is not JSON, or
    nests 3,000 deep; a schedule before year 1) are claimed beside a plain one: the
    unreadable payload is flagged for the executor to fail, the odd schedule orders first,
    and the plain row comes back whole. Decoding the whole result had failed the claim
    (SQLite: rolled back and retried for ever; PostgreSQL: committed, run by nobody)."""
    bad = await enqueue(db, priority=9)
    odd = await enqueue(db, payload={"odd": 1}, priority=8)
    plain = await enqueue(db, payload={"plain": 1}, priority=7)
    async with db.write_transaction() as s:
        if db.dialect == "postgresql":
            deep = "(repeat('{\"a\":', 3000) || '1' || repeat('}', 3000))::jsonb"
            await s.execute(text(f"UPDATE pending_analysis SET payload = {deep} WHERE id = {bad}"))
            when = "'4000-01-01 00:00:00+00 BC'"
        else:
            await s.execute(text(f"UPDATE pending_analysis SET payload = '{{not' WHERE id = {bad}"))
            when = "'0000-01-01 00:00:00'"
        await s.execute(text(f"UPDATE pending_analysis SET scheduled_at = {when} WHERE id = {odd}"))
    if form == "alone":
        found = await _claim_alone(db)
        if found is None:  # SQLite: no such form
            return
    else:
        found = await claim(db)
    by_id = {t.id: t for t in found}
    assert sorted(by_id) == sorted([bad, odd, plain])
    assert by_id[bad].unreadable is not None and by_id[bad].unreadable.startswith(
        "the payload stored in this row is not readable JSON: "
    )
    assert (by_id[odd].unreadable, by_id[odd].payload) == (None, {"odd": 1})
    assert by_id[odd].scheduled_at.year == 1
    assert (by_id[plain].unreadable, by_id[plain].payload) == (None, {"plain": 1})
    assert abs((by_id[plain].scheduled_at - utcnow()).total_seconds()) < 60
    assert [r[0] for r in await _started_notes(db)] == sorted([bad, odd, plain])


async def test_a_claim_carries_a_cancel_requested_by_hand_while_pending(db: Database) -> None:
    """A pending row whose cancel_requested was set by hand comes back flagged from the
    claim (the executor then cancels it without running it); the others do not."""
    flagged = await enqueue(db, priority=9)
    plain = await enqueue(db, priority=8)
    async with db.write_transaction() as s:
        await s.execute(
            text(f"UPDATE pending_analysis SET cancel_requested = true WHERE id = {flagged}")
        )
    found = {t.id: t.cancel_requested for t in await claim(db)}
    assert found == {flagged: True, plain: False}


async def test_the_next_due_time_of_a_schedule_no_one_can_tell_is_none(db: Database) -> None:
    """A pending task scheduled by hand for a time that cannot be told (PostgreSQL's
    'infinity'; SQLite text Python cannot read) gives no next due time: no error at every
    ask, no timer for 'now' again and again. A readable later task still does."""
    odd = await enqueue(db)
    when = "'infinity'" if db.dialect == "postgresql" else "'tomorrow'"
    async with db.write_transaction() as s:
        await s.execute(text(f"UPDATE pending_analysis SET scheduled_at = {when} WHERE id = {odd}"))
    async with db.read_transaction() as s:
        assert await queue.next_due_in(s) is None
    await enqueue(db, scheduled_at=utcnow() + timedelta(minutes=5))
    async with db.read_transaction() as s:
        seconds = await queue.next_due_in(s)
    assert seconds is not None and 290 < seconds <= 300


async def test_a_job_whose_schedule_python_cannot_read_still_ends(db: Database) -> None:
    """A schedule edited by hand to a date no datetime holds: its job's failure (with a
    retry) and its completion are written (the end read scheduled_at back into Python, and
    the completer retried the failing write for ever)."""
    retried = await enqueue(db)
    completed = await enqueue(db)
    when = "'4000-01-01 00:00:00+00 BC'" if db.dialect == "postgresql" else "'0000-01-01 00:00:00'"
    async with db.write_transaction() as s:
        await s.execute(text(f"UPDATE pending_analysis SET scheduled_at = {when}"))
    assert sorted(t.id for t in await claim(db)) == [retried, completed]
    async with db.write_transaction() as s:
        assert await queue.fail_task(
            s, task_id=retried, processor_id=PID, attempt=1, error="e", retry_delay=1
        )
        assert await queue.complete_task(
            s, task_id=completed, processor_id=PID, attempt=1, result={"a": 1}
        )
    async with db.read_transaction() as s:
        rows = await s.execute(text("SELECT id, status, retry_count FROM pending_analysis"))
        states = sorted(tuple(r) for r in rows.all())
    assert states == sorted([(retried, "pending", 1), (completed, "completed", 0)])


async def _claim_alone(db: Database, **kw: Any) -> list[queue.ClaimedTask] | None:
    kw.setdefault("limit", 10)
    async with db.engine.connect() as conn:
        return await queue.claim_tasks_alone(conn, processor_id=PID, lease_seconds=30, **kw)


async def _started_notes(db: Database) -> list[tuple[Any, ...]]:
    N = AnalysisNotification
    async with db.read_transaction() as s:
        rows = await s.execute(
            select(N.task_id, N.type, N.title, N.message, N.data, N.user_id, N.project_id)
            .where(N.type == "started")
            .order_by(N.task_id)
        )
        return [tuple(r) for r in rows.all()]


@pytest.mark.parametrize("engine_name", ["postgresql"])
async def test_a_claim_alone_is_one_statement_equal_to_claim_tasks(
    db: Database, execution_path: str
) -> None:
    """PostgreSQL's one-statement claim (the daemon's claim loop): the same rows, order,
    lease and filters as claim_tasks, and the very same started notifications."""
    ids = [await enqueue(db, priority=p, project_id="p1") for p in (3, 9, 5, 9)]
    await enqueue(db, queue="ingest")
    await enqueue(db, kind="other_kind")
    if execution_path == "core":  # hotpath off: the caller claims in a transaction
        assert await _claim_alone(db) is None
        return
    got = await _claim_alone(db, limit=3, exclude_queues=["ingest"], exclude_kinds=["other_kind"])
    assert got is not None
    assert [(t.id, t.attempt) for t in got] == [(ids[1], 1), (ids[3], 1), (ids[2], 1)]
    row = await task_row(db, ids[1])
    assert (row.status, row.locked_by) == ("processing", PID)
    assert row.lease_expires_at is not None
    assert 25 < (row.lease_expires_at - utcnow()).total_seconds() <= 31
    alone = await _started_notes(db)
    # The same claim through claim_tasks (in a transaction) writes the same notifications.
    [last] = await claim(db, limit=1, exclude_queues=["ingest"], exclude_kinds=["other_kind"])
    assert last.id == ids[0]
    by_python = [n for n in await _started_notes(db) if n[0] == ids[0]]
    assert len(alone) == 3 and len(by_python) == 1

    def shape(note: tuple[Any, ...]) -> tuple[Any, ...]:
        _task_id, kind, title, message, data, user, project = note
        return (kind, title, message, tuple(sorted(data)), user, project)

    assert {shape(n) for n in alone} == {shape(n) for n in by_python}
    assert all(n[4] == {"task_id": n[0], "kind": "chapter_analysis", "attempt": 1} for n in alone)
    assert await _claim_alone(db, queues=["nope"]) == []


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_a_bare_sqlite3_claim_equals_claim_tasks(db: Database, execution_path: str) -> None:
    """SQLite's claim on a bare sqlite3 connection (the daemon's claim loop, through
    run_write's ``here``): the same rows, order, lease and filters as claim_tasks, and the
    very same started notifications. With the hot path off, the session's claim runs."""
    ids = [await enqueue(db, priority=p, project_id="p1") for p in (3, 9, 5, 9)]
    await enqueue(db, queue="ingest")
    await enqueue(db, kind="other_kind")
    filters: dict[str, Any] = {"exclude_queues": ["ingest"], "exclude_kinds": ["other_kind"]}
    ran = []

    async def in_session(s: Any) -> list[queue.ClaimedTask]:
        ran.append("session")
        return await queue.claim_tasks(s, processor_id=PID, limit=3, lease_seconds=30, **filters)

    def bare(conn: Any, dialect: Any) -> list[queue.ClaimedTask]:
        ran.append("bare")
        return queue.claim_tasks_sqlite3(
            conn, dialect, processor_id=PID, limit=3, lease_seconds=30, **filters
        )

    got = await db.run_write(in_session, here=bare)
    assert ran == ["bare" if execution_path == "driver" else "session"]
    assert [(t.id, t.attempt) for t in got] == [(ids[1], 1), (ids[3], 1), (ids[2], 1)]
    assert got[0].payload == {} and got[0].project_id == "p1"
    row = await task_row(db, ids[1])
    assert (row.status, row.locked_by, row.attempts) == ("processing", PID, 1)
    assert row.lease_expires_at is not None
    assert 25 < (row.lease_expires_at - utcnow()).total_seconds() <= 31
    bare_notes = await _started_notes(db)
    [last] = await claim(db, limit=1, **filters)
    assert last.id == ids[0]
    by_session = [n for n in await _started_notes(db) if n[0] == ids[0]]
    assert len(bare_notes) == 3 and len(by_session) == 1

    def shape(note: tuple[Any, ...]) -> tuple[Any, ...]:
        _task_id, kind, title, message, data, user, project = note
        return (kind, title, message, tuple(sorted(data)), user, project)

    assert {shape(n) for n in bare_notes} == {shape(n) for n in by_session}
    assert all(
        n[4] == {"task_id": n[0], "kind": "chapter_analysis", "attempt": 1} for n in bare_notes
    )
    nothing = await db.run_write(
        in_session,
        here=lambda c, d: queue.claim_tasks_sqlite3(
            c, d, processor_id=PID, limit=5, lease_seconds=30, queues=["nope"]
        ),
    )
    assert nothing == []


async def test_a_claim_alone_waits_for_the_feed_lock(db: Database, execution_path: str) -> None:
    """It takes the feed's advisory lock, like every notification writer (ids commit in
    order); SQLite has no such statement (None: claim in a transaction)."""
    task_id = await enqueue(db)
    if db.dialect == "sqlite" or execution_path == "core":
        assert await _claim_alone(db) is None
        return
    async with db.write_transaction() as holder:
        await holder.execute(select(func.pg_advisory_xact_lock(notifications.FEED_LOCK_KEY)))
        claim = asyncio.ensure_future(_claim_alone(db))
        await asyncio.sleep(0.3)
        assert not claim.done()
    got = await asyncio.wait_for(claim, 10)
    assert got is not None and [t.id for t in got] == [task_id]


async def test_claim_never_hands_a_task_to_two_daemons(db: Database) -> None:
    ids = {await enqueue(db) for _ in range(6)}
    a = await claim(db, limit=4, pid=PID)
    b = await claim(db, limit=4, pid=OTHER)
    assert len(a) == 4 and len(b) == 2
    assert {t.id for t in a} | {t.id for t in b} == ids
    assert not {t.id for t in a} & {t.id for t in b}


# --- leases -----------------------------------------------------------------------------------


async def test_renew_leases_extends_only_held_pairs_and_reports_cancels(db: Database) -> None:
    ids = [await enqueue(db) for _ in range(3)]
    held = await claim(db)
    async with db.write_transaction() as s:
        assert await queue.request_cancel(s, ids[1]) is CancelOutcome.REQUESTED
    later = utcnow() + timedelta(seconds=100)
    pairs = [(t.id, t.attempt) for t in held] + [(ids[2], 99)]
    async with db.write_transaction() as s:
        renewal = await queue.renew_leases(
            s, processor_id=PID, tasks=pairs, lease_seconds=30, now=later
        )
    assert renewal.renewed == frozenset(ids)
    assert renewal.cancel_requested == frozenset({ids[1]})
    row = await task_row(db, ids[0])
    assert row.lease_expires_at == later + timedelta(seconds=30)
    async with db.write_transaction() as s:
        stale = await queue.renew_leases(s, processor_id=OTHER, tasks=pairs, lease_seconds=30)
    assert stale.renewed == frozenset()


async def test_release_returns_tasks_without_charging(db: Database) -> None:
    a, b = await enqueue(db), await enqueue(db)
    held = await claim(db)
    async with db.write_transaction() as s:
        await queue.request_cancel(s, b)
    async with db.write_transaction() as s:
        n = await queue.release_tasks(s, processor_id=PID, tasks=[(t.id, t.attempt) for t in held])
    assert n == 2
    row_a, row_b = await task_row(db, a), await task_row(db, b)
    assert (row_a.status, row_a.attempts, row_a.retry_count, row_a.locked_by) == (
        "pending",
        0,
        0,
        None,
    )
    assert row_b.status == "cancelled" and row_b.completed_at is not None
    assert await notes_of(db, b) == [("started", "alice"), ("cancelled", "alice")]
    assert [t.id for t in await claim(db)] == [a]


# --- outcomes ---------------------------------------------------------------------------------


async def test_token_usage_saturates_at_the_columns_maximum(
    db: Database, execution_path: str
) -> None:
    """Token usage adds up across attempts in a 32-bit column: a total beyond it is stored
    as the maximum (PostgreSQL would refuse the whole write, and the job's end with it);
    one attempt's figure out of range is brought into it. Every end path: a failure, a
    completion in a transaction, the one-statement completion."""
    top = queue.MAX_INT
    task_id = await enqueue(db, max_retries=3)
    [t] = await claim(db)
    async with db.write_transaction() as s:
        failed = await queue.fail_task(
            s,
            task_id=t.id,
            processor_id=PID,
            attempt=t.attempt,
            error="x",
            retry_delay=0,
            token_usage=top - 5,
        )
    assert failed is FailOutcome.RETRYING
    assert (await task_row(db, task_id)).token_usage == top - 5
    [t] = await claim(db)
    async with db.write_transaction() as s:
        assert await queue.complete_task(
            s, task_id=t.id, processor_id=PID, attempt=t.attempt, result=None, token_usage=100
        )
    assert (await task_row(db, task_id)).token_usage == top
    other = await enqueue(db)
    [u] = await claim(db)
    items = [_finished(u, None, 0.1, 10**30)]
    async with db.engine.connect() as conn:
        statuses = await queue.complete_tasks_alone(conn, processor_id=PID, items=items)
    if statuses is None:  # not the one-statement path here: the transaction's
        async with db.write_transaction() as s:
            await queue.finish_tasks(s, processor_id=PID, items=items)
    row = await task_row(db, other)
    assert (row.status, row.token_usage) == ("completed", top)


async def test_complete_task_writes_result_and_notification(db: Database) -> None:
    task_id = await enqueue(db)
    [t] = await claim(db)
    async with db.write_transaction() as s:
        ok = await queue.complete_task(
            s,
            task_id=t.id,
            processor_id=PID,
            attempt=t.attempt,
            result={"words": 3},
            duration_seconds=0.5,
            token_usage=42,
        )
    assert ok
    row = await task_row(db, task_id)
    assert (row.status, row.result, row.locked_by, row.lease_expires_at) == (
        "completed",
        {"words": 3},
        None,
        None,
    )
    assert (row.duration_seconds, row.token_usage) == (0.5, 42)
    assert row.completed_at is not None
    assert await notes_of(db, task_id) == [("started", "alice"), ("completed", "alice")]


async def _completed_notes(db: Database) -> list[tuple[Any, ...]]:
    N = AnalysisNotification
    async with db.read_transaction() as s:
        rows = await s.execute(
            select(N.task_id, N.title, N.message, N.data, N.user_id, N.project_id)
            .where(N.type == "completed")
            .order_by(N.task_id)
        )
        return [tuple(r) for r in rows.all()]


def _finished(t: queue.ClaimedTask, result: Any, duration: float, tokens: int) -> queue.Finished:
    return queue.Finished(
        t.id,
        t.attempt,
        queue.Finish.COMPLETE,
        result=result,
        duration_seconds=duration,
        token_usage=tokens,
        ref=t.ref,
    )


async def test_completions_alone_are_one_statement_equal_to_finish_tasks(
    db: Database, execution_path: str
) -> None:
    """PostgreSQL's one-statement completion (the daemon's completer): the same rows and the
    very same notifications as finish_tasks; the fence rejects a stale attempt (no row, no
    notification); elsewhere, or for any other end, None (the caller uses a transaction)."""
    ids = [await enqueue(db, project_id="p1") for _ in range(4)]
    a, b, c, d = await claim(db, limit=4)
    assert [a.id, b.id, c.id, d.id] == ids
    stale = queue.Finished(
        c.id, c.attempt + 1, queue.Finish.COMPLETE, duration_seconds=1, ref=c.ref
    )
    items = [_finished(a, {"n": 1}, 0.25, 7), _finished(b, [1, "two"], 1.5, 0), stale]
    async with db.engine.connect() as conn:
        statuses = await queue.complete_tasks_alone(conn, processor_id=PID, items=items)
        fail = queue.Finished(d.id, d.attempt, queue.Finish.FAIL, error="x", ref=d.ref)
        assert await queue.complete_tasks_alone(conn, processor_id=PID, items=[fail]) is None
        twice = [items[0], queue.Finished(a.id, 9, queue.Finish.COMPLETE, ref=a.ref)]
        assert await queue.complete_tasks_alone(conn, processor_id=PID, items=twice) is None
    if db.dialect == "sqlite" or execution_path == "core":
        assert statuses is None
        return
    assert statuses == ["completed", "completed", None]
    for task, result, duration, tokens in ((a, {"n": 1}, 0.25, 7), (b, [1, "two"], 1.5, 0)):
        row = await task_row(db, task.id)
        assert (row.status, row.result, row.locked_by, row.lease_expires_at, row.error) == (
            "completed",
            result,
            None,
            None,
            None,
        )
        assert (row.duration_seconds, row.token_usage) == (duration, tokens)
        assert row.completed_at is not None and row.completed_at == row.updated_at
    assert (await task_row(db, c.id)).status == "processing"
    alone = await _completed_notes(db)
    assert [n[0] for n in alone] == [a.id, b.id]
    # the same end through finish_tasks (in a transaction) writes the same notification
    async with db.write_transaction() as s:
        await queue.finish_tasks(s, processor_id=PID, items=[_finished(d, None, 0.25, 7)])
    by_python = [n for n in await _completed_notes(db) if n[0] == d.id]
    assert [n[1:] for n in by_python] == [
        (t, m, {**data, "task_id": d.id}, u, p) for _, t, m, data, u, p in alone[:1]
    ]


@pytest.mark.parametrize("engine_name", ["postgresql"])
async def test_completions_alone_wait_for_the_feed_lock(db: Database, execution_path: str) -> None:
    await enqueue(db)
    [t] = await claim(db)

    async def complete() -> list[queue.TaskStatus | None] | None:
        async with db.engine.connect() as conn:
            return await queue.complete_tasks_alone(
                conn, processor_id=PID, items=[_finished(t, None, 0.1, 0)]
            )

    if execution_path == "core":
        assert await complete() is None
        return
    async with db.write_transaction() as holder:
        await holder.execute(select(func.pg_advisory_xact_lock(notifications.FEED_LOCK_KEY)))
        completing = asyncio.ensure_future(complete())
        await asyncio.sleep(0.3)
        assert not completing.done()
    assert await asyncio.wait_for(completing, 10) == ["completed"]


async def test_stale_holder_cannot_write(db: Database) -> None:
    task_id = await enqueue(db)
    [t] = await claim(db)
    async with db.write_transaction() as s:
        rescued = await queue.rescue_expired(s, now=utcnow() + timedelta(seconds=60))
    assert rescued.rescued == (task_id,)
    [again] = await claim(db, pid=OTHER)
    assert again.attempt == 2
    async with db.write_transaction() as s:
        assert not await queue.complete_task(
            s, task_id=t.id, processor_id=PID, attempt=t.attempt, result="stale"
        )
        assert (
            await queue.fail_task(
                s, task_id=t.id, processor_id=PID, attempt=t.attempt, error="x", retry_delay=1
            )
            is None
        )
        assert not await queue.cancel_task(s, task_id=t.id, processor_id=PID, attempt=t.attempt)
        assert not await queue.update_progress(
            s, task_id=t.id, processor_id=PID, attempt=t.attempt, current=1, total=2
        )
        # the same daemon id with the old attempt is fenced too
        assert not await queue.complete_task(
            s, task_id=t.id, processor_id=OTHER, attempt=t.attempt, result="stale"
        )
    row = await task_row(db, task_id)
    assert (row.status, row.locked_by, row.attempts, row.result) == ("processing", OTHER, 2, None)


async def test_fail_task_retries_with_backoff_then_fails(db: Database) -> None:
    task_id = await enqueue(db, max_retries=1)
    [t] = await claim(db)
    now = utcnow()
    async with db.write_transaction() as s:
        outcome = await queue.fail_task(
            s, task_id=t.id, processor_id=PID, attempt=1, error="boom", retry_delay=20, now=now
        )
    assert outcome is FailOutcome.RETRYING
    row = await task_row(db, task_id)
    assert (row.status, row.retry_count, row.error, row.locked_by) == ("pending", 1, "boom", None)
    assert row.scheduled_at == now + timedelta(seconds=20)
    assert await claim(db) == []
    [t2] = await claim(db, now=now + timedelta(seconds=21))
    async with db.write_transaction() as s:
        outcome = await queue.fail_task(
            s, task_id=t2.id, processor_id=PID, attempt=2, error="boom again", retry_delay=20
        )
    assert outcome is FailOutcome.FAILED
    row = await task_row(db, task_id)
    assert (row.status, row.retry_count, row.attempts, row.error) == ("failed", 1, 2, "boom again")
    assert row.completed_at is not None
    assert [n for n, _ in await notes_of(db, task_id)] == [
        "started",
        "retrying",
        "started",
        "failed",
    ]


async def test_notifications_carry_the_error_without_its_traceback(db: Database) -> None:
    """The end user's frontend gets the exception and its message; the task keeps the
    traceback for the operator (it showed the server's paths to every user)."""
    task_id = await enqueue(db, max_retries=1)
    error = 'ValueError: bad input\n\nTraceback (most recent call last):\n  File "/srv/app/x.py"'
    for attempt in (1, 2):
        [t] = await claim(db, now=utcnow() + timedelta(seconds=60 * attempt))
        async with db.write_transaction() as s:
            await queue.fail_task(
                s, task_id=t.id, processor_id=PID, attempt=attempt, error=error, retry_delay=1
            )
    assert (await task_row(db, task_id)).error == error
    async with db.read_transaction() as s:
        rows = await s.execute(
            select(
                AnalysisNotification.type, AnalysisNotification.message, AnalysisNotification.data
            )
            .where(AnalysisNotification.task_id == task_id, AnalysisNotification.type != "started")
            .order_by(AnalysisNotification.id)
        )
        notes = rows.all()
    assert [(kind, data["error"]) for kind, _, data in notes] == [
        ("retrying", "ValueError: bad input"),
        ("failed", "ValueError: bad input"),
    ]
    assert notes[1][1] == "ValueError: bad input"


async def test_permanent_failure_skips_retries(db: Database) -> None:
    task_id = await enqueue(db, max_retries=5)
    [t] = await claim(db)
    async with db.write_transaction() as s:
        outcome = await queue.fail_task(
            s,
            task_id=t.id,
            processor_id=PID,
            attempt=1,
            error="bad input",
            retry_delay=1,
            permanent=True,
        )
    assert outcome is FailOutcome.FAILED
    assert (await task_row(db, task_id)).retry_count == 0


async def test_a_failure_after_a_cancel_request_is_not_retried(db: Database) -> None:
    task_id = await enqueue(db, max_retries=3)
    [t] = await claim(db)
    async with db.write_transaction() as s:
        assert await queue.request_cancel(s, task_id) is CancelOutcome.REQUESTED
    async with db.write_transaction() as s:
        outcome = await queue.fail_task(
            s, task_id=t.id, processor_id=PID, attempt=1, error="boom", retry_delay=0
        )
    assert outcome is FailOutcome.CANCELLED
    row = await task_row(db, task_id)
    assert (row.status, row.retry_count, row.error, row.locked_by) == (
        "cancelled",
        0,
        "boom",
        None,
    )
    assert row.completed_at is not None
    assert await claim(db) == []
    assert [n for n, _ in await notes_of(db, task_id)] == ["started", "cancelled"]


async def test_a_snooze_after_a_cancel_request_cancels(db: Database) -> None:
    task_id = await enqueue(db)
    [t] = await claim(db)
    async with db.write_transaction() as s:
        await queue.request_cancel(s, task_id)
    async with db.write_transaction() as s:
        assert await queue.snooze_task(s, task_id=t.id, processor_id=PID, attempt=1, seconds=0)
    row = await task_row(db, task_id)
    assert (row.status, row.attempts, row.locked_by) == ("cancelled", 1, None)
    assert await claim(db) == []
    assert [n for n, _ in await notes_of(db, task_id)] == ["started", "cancelled"]


async def test_cancel_task_by_its_daemon(db: Database) -> None:
    task_id = await enqueue(db)
    [t] = await claim(db)
    async with db.write_transaction() as s:
        assert await queue.cancel_task(s, task_id=t.id, processor_id=PID, attempt=1)
    assert (await task_row(db, task_id)).status == "cancelled"
    assert [n for n, _ in await notes_of(db, task_id)] == ["started", "cancelled"]


async def test_update_progress_and_notify(db: Database) -> None:
    task_id = await enqueue(db)
    [t] = await claim(db)
    claimed_at = (await task_row(db, task_id)).updated_at
    await asyncio.sleep(0.01)
    async with db.write_transaction() as s:
        assert await queue.update_progress(
            s, task_id=t.id, processor_id=PID, attempt=1, current=1, total=4, message="tokenizing"
        )
    # a client polling for changes watches updated_at: progress moves it
    assert (await task_row(db, task_id)).updated_at > claimed_at
    async with db.write_transaction() as s:
        assert await queue.update_progress(
            s, task_id=t.id, processor_id=PID, attempt=1, current=2, total=4, notify=True
        )
    row = await task_row(db, task_id)
    assert (row.progress_current, row.progress_total, row.progress_message) == (2, 4, None)
    async with db.read_transaction() as s:
        note = (
            await s.scalars(
                select(AnalysisNotification).where(AnalysisNotification.type == "progress")
            )
        ).one()
    assert note.data is not None and note.data["percent"] == 50.0 and note.message == "50 %"


# --- user requests ----------------------------------------------------------------------------


async def test_request_cancel_each_state(db: Database) -> None:
    pending = await enqueue(db)
    running = await enqueue(db, priority=9)
    [t] = await claim(db, limit=1)
    assert t.id == running
    async with db.write_transaction() as s:
        assert await queue.request_cancel(s, pending) is CancelOutcome.CANCELLED
        assert await queue.request_cancel(s, running) is CancelOutcome.REQUESTED
        assert await queue.request_cancel(s, pending) is CancelOutcome.FINISHED
        assert await queue.request_cancel(s, 10_000) is CancelOutcome.NOT_FOUND
    assert (await task_row(db, pending)).status == "cancelled"
    row = await task_row(db, running)
    assert (row.status, row.cancel_requested) == ("processing", True)
    assert [n for n, _ in await notes_of(db, pending)] == ["cancelled"]


async def test_retry_task_only_from_failed_or_cancelled(db: Database) -> None:
    task_id = await enqueue(db, max_retries=0)
    async with db.write_transaction() as s:
        assert await queue.retry_task(s, task_id) is RetryOutcome.NOT_RETRYABLE
        assert await queue.retry_task(s, 10_000) is RetryOutcome.NOT_FOUND
    [t] = await claim(db)
    async with db.write_transaction() as s:
        await queue.fail_task(
            s, task_id=t.id, processor_id=PID, attempt=1, error="e", retry_delay=1
        )
    async with db.write_transaction() as s:
        assert await queue.retry_task(s, task_id) is RetryOutcome.RETRIED
    row = await task_row(db, task_id)
    assert (row.status, row.retry_count, row.attempts, row.error, row.completed_at) == (
        "pending",
        0,
        0,
        None,
        None,
    )
    async with db.read_transaction() as s:  # SQL NULL, as at enqueue (not the JSON null)
        stored = select(PendingAnalysis.id).where(
            PendingAnalysis.id == task_id, PendingAnalysis.result.is_(None)
        )
        assert (await s.execute(stored)).scalar_one() == task_id
    assert [t.id for t in await claim(db)] == [task_id]


# --- maintenance ------------------------------------------------------------------------------


async def test_rescue_expired_requeues_or_fails(db: Database) -> None:
    live = await enqueue(db)
    dead = await enqueue(db, max_retries=2)
    poison = await enqueue(db, max_retries=0)
    await claim(db)
    async with db.write_transaction() as s:
        await s.execute(
            update(PendingAnalysis)
            .where(PendingAnalysis.id != live)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )
    async with db.write_transaction() as s:
        result = await queue.rescue_expired(s)
    assert (result.rescued, result.failed) == ((dead,), (poison,))
    row = await task_row(db, dead)
    assert (row.status, row.retry_count, row.locked_by) == ("pending", 1, None)
    assert row.error is not None and "lease expired" in row.error
    row = await task_row(db, poison)
    assert row.status == "failed" and row.error is not None and "lease expired" in row.error
    assert (await task_row(db, live)).status == "processing"
    assert [n for n, _ in await notes_of(db, dead)] == ["started", "retrying"]
    assert [n for n, _ in await notes_of(db, poison)] == ["started", "failed"]


async def test_counters_at_the_32_bit_limit_never_fail_a_claim_or_a_rescue(db: Database) -> None:
    """max_retries at MAX_INT (the library takes it), and attempts and retry_count edited to
    MAX_INT by hand: the claim and the rescue go on (PostgreSQL's 32-bit ``+ 1`` had failed
    every sweep of the rescuer, and every claim, for all jobs, for good)."""
    many = await enqueue(db, max_retries=queue.MAX_INT)
    edited = await enqueue(db)
    async with db.write_transaction() as s:
        await s.execute(
            update(PendingAnalysis)
            .where(PendingAnalysis.id == edited)
            .values(attempts=queue.MAX_INT, retry_count=queue.MAX_INT, max_retries=queue.MAX_INT)
        )
    assert sorted(t.id for t in await claim(db)) == sorted([many, edited])
    assert (await task_row(db, edited)).attempts == queue.MAX_INT
    async with db.write_transaction() as s:
        result = await queue.rescue_expired(s, now=utcnow() + timedelta(minutes=5))
    assert (sorted(result.rescued), result.failed) == (sorted([many, edited]), ())
    assert (await task_row(db, many)).retry_count == 1
    row = await task_row(db, edited)
    assert (row.status, row.retry_count) == ("pending", queue.MAX_INT)


async def test_a_processing_row_without_a_lease_is_rescued(db: Database) -> None:
    """A row in processing with no lease and no owner (edited by hand) is rescued like an
    expired one; it was stuck there for good (its cancel never applied, retry refused)."""
    orphan = await enqueue(db)
    await claim(db)
    async with db.write_transaction() as s:
        await s.execute(
            update(PendingAnalysis)
            .where(PendingAnalysis.id == orphan)
            .values(locked_by=None, lease_expires_at=None)
        )
    async with db.write_transaction() as s:
        result = await queue.rescue_expired(s)
    assert result.rescued == (orphan,)
    row = await task_row(db, orphan)
    assert (row.status, row.retry_count, row.locked_by) == ("pending", 1, None)


async def test_a_cancel_answers_what_it_did_while_the_job_changes_state(db: Database) -> None:
    """The job flips between pending and processing in other transactions (a snooze loop)
    while a cancel is asked for: the answer is always what happened to the row (it read
    the row and changed it in separate statements, and on PostgreSQL answered 'requested'
    with no flag set, or 'finished' for a job that never finished)."""
    for round_ in range(30):
        task_id = await enqueue(db)
        stop = asyncio.Event()

        async def flip(task_id: int = task_id, stop: asyncio.Event = stop) -> None:
            turn = 0
            while not stop.is_set():
                turn += 1
                async with db.write_transaction() as s:
                    await s.execute(
                        update(PendingAnalysis)
                        .where(
                            PendingAnalysis.id == task_id,
                            PendingAnalysis.status.in_(["pending", "processing"]),
                        )
                        .values(status="processing" if turn % 2 else "pending")
                    )
                await asyncio.sleep(0)

        flipper = asyncio.create_task(flip())
        await asyncio.sleep(0.001 * (round_ % 5))
        async with db.write_transaction() as s:
            outcome = await queue.request_cancel(s, task_id)
        stop.set()
        await flipper
        row = await task_row(db, task_id)
        if outcome is CancelOutcome.CANCELLED:
            assert row.status == "cancelled"
        else:
            assert outcome is CancelOutcome.REQUESTED, (round_, outcome, row.status)
            assert row.cancel_requested is True


async def test_prune_finished_in_batches(db: Database) -> None:
    ids = [await enqueue(db, max_retries=0) for _ in range(5)]
    held = await claim(db)
    async with db.write_transaction() as s:
        for t in held[:3]:
            await queue.complete_task(s, task_id=t.id, processor_id=PID, attempt=1, result=None)
        await queue.fail_task(
            s, task_id=held[3].id, processor_id=PID, attempt=1, error="e", retry_delay=1
        )
    later = utcnow() + timedelta(days=1)
    async with db.write_transaction() as s:
        assert (
            await queue.prune_finished(
                s, completed_before=later, failed_before=utcnow() - timedelta(days=1), batch_size=2
            )
            == 2
        )
    async with db.write_transaction() as s:
        assert (
            await queue.prune_finished(
                s, completed_before=later, failed_before=utcnow() - timedelta(days=1), batch_size=2
            )
            == 1
        )
        assert (
            await queue.prune_finished(
                s, completed_before=later, failed_before=utcnow() - timedelta(days=1)
            )
            == 0
        )
    async with db.read_transaction() as s:
        left = set((await s.scalars(select(PendingAnalysis.id))).all())
        notes = set((await s.scalars(select(AnalysisNotification.task_id))).all())
    assert left == {held[3].id, held[4].id} and left == set(ids) - {t.id for t in held[:3]}
    assert notes <= left


async def test_notifications_feed_read_and_prune(db: Database) -> None:
    a = await enqueue(db, user_id="alice")
    await enqueue(db, user_id="bob")
    await claim(db)
    async with db.read_transaction() as s:
        mine = await notifications.list_for_user(s, user_id="alice")
        assert [n.task_id for n in mine] == [a]
        assert await notifications.unread_count(s, user_id="alice") == 1
        assert await notifications.unread_count(s, user_id=None) == 2
        everyone = await notifications.list_for_user(s, user_id=None, after_id=0)
    assert [n.id for n in everyone] == sorted(n.id for n in everyone)
    async with db.write_transaction() as s:
        assert not await notifications.mark_read(s, mine[0].id, user_id="bob")
        assert await notifications.mark_read(s, mine[0].id, user_id="alice")
        assert await notifications.mark_all_read(s, user_id="bob") == 1
    async with db.write_transaction() as s:
        assert await notifications.prune_read(s, read_before=utcnow() + timedelta(seconds=5)) == 2


class _Undo(Exception):
    """Raised to roll a write transaction back."""


async def _deadlocks_among(
    db: Database, *works: Callable[[Any], Awaitable[None]], seconds: float = 4
) -> tuple[list[str], list[int]]:
    """Run each of ``works`` over and over, each time in a write transaction rolled back
    afterwards, all at once for ``seconds``: the deadlocks PostgreSQL broke, and how many
    rounds each work completed."""
    deadlocks: list[str] = []
    until = time.monotonic() + seconds

    async def repeat(work: Callable[[Any], Awaitable[None]]) -> int:
        rounds = 0
        while time.monotonic() < until:
            try:
                async with db.write_transaction() as s:
                    await work(s)
                    raise _Undo
            except _Undo:
                rounds += 1
            except DBAPIError as exc:
                if db_module.sqlstate(exc) != "40P01":
                    raise
                deadlocks.append(str(exc.orig))
        return rounds

    rounds = await asyncio.gather(*(repeat(work) for work in works))
    return deadlocks, list(rounds)


@pytest.mark.parametrize("engine_name", ["postgresql"])
@pytest.mark.parametrize("execution_path", ["core"], indirect=True)  # session statements
async def test_taking_back_started_notes_while_a_user_reads_all_does_not_deadlock(
    db: Database,
) -> None:
    """A daemon deletes the `started` notes of jobs handed back before they ran (a user's
    unread notifications) while that user marks all read: the delete locked the rows in
    task order, read-all in the feed index's order (newest first), and PostgreSQL broke
    the cycles with 'deadlock detected' (9 in 10 s in the review; a second's stall each,
    the completer holding its task rows). Both lock in id order now."""
    async with db.write_transaction() as s:
        await queue.enqueue_tasks(
            s, [{"kind": "chapter_analysis", "user_id": "u"} for _ in range(200)]
        )
    ids = [t.id for t in await claim(db, limit=200)]

    async def retract(s: Any) -> None:
        await notifications.retract_started(s, ids)

    async def read_all(s: Any) -> None:
        assert await notifications.mark_all_read(s, user_id="u") in (0, 200)

    deadlocks, rounds = await _deadlocks_among(db, retract, read_all, read_all)
    assert deadlocks == [] and min(rounds) > 10, (deadlocks[:1], rounds)
    async with db.write_transaction() as s:  # each does its work when alone
        await notifications.retract_started(s, ids[:5])
        assert await notifications.mark_all_read(s, user_id="u") == 195
    assert await notes_of(db, ids[0]) == [] and await notes_of(db, ids[5]) == [("started", "u")]


@pytest.mark.parametrize("engine_name", ["postgresql"])
@pytest.mark.parametrize("execution_path", ["core"], indirect=True)  # session statements
async def test_pruning_while_a_user_reads_all_does_not_deadlock(db: Database) -> None:
    """The pruner deleting finished tasks whose notifications their user never read, while
    that user (or an admin) marks all read: the cascade locked the notifications task by
    task (a claim's `started` notes, then the `completed` ones, interleave by task), read-all
    in id order, and PostgreSQL broke the cycles (from a review). The pruner deletes the
    notifications first, in id order."""
    async with db.write_transaction() as s:
        await queue.enqueue_tasks(
            s, [{"kind": "chapter_analysis", "user_id": "u"} for _ in range(200)]
        )
    held = await claim(db, limit=200)
    async with db.write_transaction() as s:
        for t in held:
            await queue.complete_task(
                s, task_id=t.id, processor_id=PID, attempt=t.attempt, result={}, duration_seconds=0
            )
    later = utcnow() + timedelta(hours=1)

    async def prune(s: Any) -> None:
        assert await queue.prune_finished(s, completed_before=later) in (0, 200)

    async def read_all(s: Any) -> None:
        assert await notifications.mark_all_read(s, user_id=None) in (0, 400)

    deadlocks, rounds = await _deadlocks_among(db, prune, read_all)
    assert deadlocks == [] and min(rounds) > 10, (deadlocks[:1], rounds)
    async with db.write_transaction() as s:
        assert await queue.prune_finished(s, completed_before=later) == 200
    async with db.read_transaction() as s:
        left = await s.scalar(select(func.count()).select_from(AnalysisNotification))
    assert left == 0


async def test_processor_rows(db: Database) -> None:
    async with db.write_transaction() as s:
        await queue.register_processor(
            s, processor_id=PID, hostname="h", pid=1, version="v", concurrency=3
        )
        assert await queue.touch_processor(s, processor_id=PID, in_flight=2, processed=5, failed=1)
        assert not await queue.touch_processor(
            s, processor_id="ghost", in_flight=0, processed=0, failed=0
        )
    async with db.write_transaction() as s:
        assert await queue.reap_processors(s, silent_seconds=60) == 0
        assert await queue.reap_processors(s, silent_seconds=-1) == 1
    async with db.read_transaction() as s:
        p = (await s.scalars(select(Processor))).one()
    assert (p.state, p.in_flight, p.processed, p.failed) == ("stopped", 0, 5, 1)


async def test_reads(db: Database) -> None:
    a = await enqueue(db, user_id="alice", chapter_id="c1")
    b = await enqueue(db, user_id="alice", chapter_id="c1", kind="other")
    c = await enqueue(db, user_id="bob", chapter_id="c1")
    async with db.read_transaction() as s:
        assert (await queue.get_task(s, a, user_id="bob")) is None
        assert (await queue.get_task(s, a, user_id="alice")) is not None
        page = await queue.list_tasks(s, user_id="alice", limit=1)
        assert [t.id for t in page] == [b]
        page2 = await queue.list_tasks(s, user_id="alice", before_id=page[-1].id)
        assert [t.id for t in page2] == [a]
        assert [t.id for t in await queue.list_tasks(s, kind="other")] == [b]
        latest = await queue.latest_for_chapter(s, "c1")
        assert latest is not None and latest.id == c
        mine = await queue.latest_for_chapter(s, "c1", user_id="alice")
        assert mine is not None and mine.id == b


@pytest.mark.parametrize("engine_name", ["postgresql"])
async def test_notification_ids_commit_in_order_on_postgres(db: Database) -> None:
    """A second writer waits for the first one's commit, so ids never commit out of order."""
    import asyncio

    first = await enqueue(db)
    second = await enqueue(db)
    async with db.write_sessionmaker() as s1:
        await s1.begin()
        await notifications.add(
            s1, [notifications.build(NotificationType.STARTED, _ref(first), "a")]
        )

        async def writer() -> None:
            async with db.write_transaction() as s2:
                await notifications.add(
                    s2, [notifications.build(NotificationType.STARTED, _ref(second), "b")]
                )

        blocked = asyncio.create_task(writer())
        await asyncio.sleep(0.3)
        assert not blocked.done()
        await s1.commit()
        await asyncio.wait_for(blocked, 5)
    async with db.read_transaction() as s:
        rows = (
            await s.execute(
                select(AnalysisNotification.id, AnalysisNotification.task_id).order_by(
                    AnalysisNotification.id
                )
            )
        ).all()
    assert [task for _, task in rows] == [first, second]


def _ref(task_id: int) -> notifications.TaskRef:
    return notifications.TaskRef(task_id, "chapter_analysis", "alice", None, None, 0)


@pytest.mark.parametrize("engine_name", ["postgresql"])
async def test_feed_poller_sees_every_notification_once_with_concurrent_writers(
    db: Database,
) -> None:
    import asyncio
    import random

    task_id = await enqueue(db)
    rng = random.Random(5)
    done = asyncio.Event()

    async def writer(n: int) -> None:
        for _ in range(n):
            async with db.write_transaction() as s:
                await notifications.add(
                    s, [notifications.build(NotificationType.PROGRESS, _ref(task_id), "w")]
                )
                await asyncio.sleep(rng.uniform(0, 0.01))  # commit later than others began

    seen: list[int] = []

    async def poller() -> None:
        while True:
            finished = done.is_set()
            async with db.read_transaction() as s:
                rows = await notifications.list_for_user(
                    s, user_id="alice", after_id=max(seen, default=0), limit=500
                )
            seen.extend(r.id for r in rows)
            if finished and not rows:
                return
            await asyncio.sleep(0.001)

    polling = asyncio.create_task(poller())
    await asyncio.gather(*(writer(25) for _ in range(4)))
    done.set()
    await polling
    async with db.read_transaction() as s:
        every = [
            r.id
            for r in await notifications.list_for_user(s, user_id="alice", after_id=0, limit=1000)
        ]
    assert len(every) == 100
    assert seen == every  # each exactly once, in order, none skipped


def test_nul_characters_are_refused_but_their_escape_written_as_text_is_kept() -> None:
    for bad in ({"text": "a\x00b"}, {"a\x00": 1}, {"deep": [{"x": "\x00"}]}):
        with pytest.raises(queue.InvalidTaskError):
            TaskSpec(kind="noop", payload=bad)
    for fine in ({"text": "\\u0000"}, {"text": "\\\\u0000 and \\\\\\\\u0000"}, {"\\u0000": 1}):
        assert TaskSpec(kind="noop", payload=fine).payload == fine


async def test_get_tasks_keeps_the_order_asked_with_gaps_and_repeats(db: Database) -> None:
    a, b = await enqueue(db), await enqueue(db)
    async with db.read_transaction() as s:
        got = await queue.get_tasks(s, [b, 999_999, a, b])
    assert [t.id if t is not None else None for t in got] == [b, None, a, b]


# --- the API's reads of their own ------------------------------------------------------------


async def test_read_task_answers_what_get_task_does(db: Database) -> None:
    """GET /tasks/{id}'s read of its own (bare driver, or a session): every column as
    get_task has it, for a pending task and a finished one; another user's task and an
    unknown id are None."""
    pending = await enqueue(db, payload={"text": "héllo ✓", "n": [1, 2.5]}, priority=9)
    done = await enqueue(db, project_id="p", chapter_id="c")
    async with db.write_transaction() as s:
        await s.execute(
            update(PendingAnalysis)
            .where(PendingAnalysis.id == done)
            .values(status="completed", result={"ok": True}, completed_at=utcnow())
        )
    for task_id in (pending, done):
        async with db.read_transaction() as s:
            expected = await queue.get_task(s, task_id)
        assert expected is not None
        for scope in (None, "alice"):
            row = await queue.read_task(db, task_id, user_id=scope)
            assert row is not None
            for column in queue.TASKS.c.keys():
                assert getattr(row, column) == getattr(expected, column), column
        assert await queue.read_task(db, task_id, user_id="bob") is None
    assert await queue.read_task(db, 10**12) is None


async def test_a_feed_page_and_its_unread_count_in_one_read(db: Database) -> None:
    """GET /notifications' one statement answers what list_for_user and unread_count do
    in a session, for every combination of filters, both directions, a page of none
    (the count still there), an admin's (every user's) and a user's."""
    users = ("alice", "bob", "alice", "alice")
    tasks = [await enqueue(db, user_id=user) for user in users]
    async with db.write_transaction() as s:
        for task_id, user in zip(tasks, users, strict=True):
            ref = notifications.TaskRef(task_id, "chapter_analysis", user, None, None, 1)
            await notifications.add(
                s,
                [
                    notifications.build(NotificationType.STARTED, ref, "s", extra="ü"),
                    notifications.build(NotificationType.COMPLETED, ref, "c"),
                ],
            )
    async with db.write_transaction() as s:
        first = (await notifications.list_for_user(s, user_id="alice", after_id=0, limit=1))[0]
        assert await notifications.mark_read(s, first.id, user_id="alice")
    async with db.read_transaction() as s:
        newest = (await notifications.list_for_user(s, user_id=None, limit=1))[0].id
    fields = [c.key for c in notifications.NOTIFICATIONS.c]
    for user in ("alice", None):
        for after_id in (None, 0, first.id, newest):
            for unread_only in (False, True):
                for task_id in (None, tasks[2]):
                    for limit in (1, 50):
                        kw: dict[str, Any] = {
                            "user_id": user,
                            "after_id": after_id,
                            "unread_only": unread_only,
                            "limit": limit,
                            "task_id": task_id,
                        }
                        async with db.read_transaction() as s:
                            want = await notifications.list_for_user(s, **kw)
                            unread = await notifications.unread_count(s, user_id=user)
                        rows, count = await notifications.page_for_user(db, **kw)
                        assert count == unread, kw
                        got = [[getattr(r, f) for f in fields] for r in rows]
                        assert got == [[getattr(n, f) for f in fields] for n in want], kw
    rows, count = await notifications.page_for_user(db, user_id="carol")
    assert (rows, count) == ([], 0)


async def test_a_streams_poll_reads_its_page_and_its_token_together(db: Database) -> None:
    """The SSE poll's one statement: the notifications after an id, oldest first, as
    list_for_user pages them (a user's, an admin's), and whether the token is still good:
    False once it is revoked or for an unknown token, with the page read all the same."""
    from app.services import auth

    async with db.write_transaction() as s:
        row, _ = await auth.create_token(s, user_id="alice")
        await s.flush()
        token_id = row.id
    tasks = [await enqueue(db, user_id=user) for user in ("alice", "bob", "alice")]
    async with db.write_transaction() as s:
        for task_id, user in zip(tasks, ("alice", "bob", "alice"), strict=True):
            ref = notifications.TaskRef(task_id, "chapter_analysis", user, None, None, 1)
            await notifications.add(s, [notifications.build(NotificationType.STARTED, ref, "s")])
    fields = [c.key for c in notifications.NOTIFICATIONS.c]
    for user in ("alice", None):
        for after_id in (0, 1, 10**9):
            for limit in (1, 100):
                async with db.read_transaction() as s:
                    want = await notifications.list_for_user(
                        s, user_id=user, after_id=after_id, limit=limit
                    )
                rows, active = await notifications.stream_page(
                    db, user_id=user, after_id=after_id, token_id=token_id, limit=limit
                )
                assert active
                got = [[getattr(r, f) for f in fields] for r in rows]
                assert got == [[getattr(n, f) for f in fields] for n in want]
    async with db.write_transaction() as s:
        assert await auth.revoke_token(s, token_id)
    rows, active = await notifications.stream_page(
        db, user_id="alice", after_id=0, token_id=token_id
    )
    assert not active and len(rows) == 2
    assert (await notifications.stream_page(db, user_id="x", after_id=0, token_id=10**9)) == (
        [],
        False,
    )


async def test_read_tasks_pages_as_list_tasks_does(db: Database) -> None:
    """GET /tasks' read of its own answers what list_tasks does in a session, for each
    filter alone, with the cursor, for a user and an admin; a chapter's latest too."""
    ids = [
        await enqueue(db, user_id=user, kind=kind, chapter_id=chapter, project_id="p")
        for user, kind, chapter in [
            ("alice", "chapter_analysis", "c1"),
            ("bob", "noop", "c1"),
            ("alice", "noop", "c2"),
            ("alice", "chapter_analysis", "c1"),
        ]
    ]
    await claim(db, limit=1)  # the oldest: processing
    columns = queue.TASKS.c.keys()
    for kw in [
        {},
        {"user_id": "alice"},
        {"status": "pending"},
        {"status": "processing", "user_id": "alice"},
        {"kind": "noop"},
        {"chapter_id": "c1", "user_id": "alice", "limit": 1},
        {"project_id": "p", "before_id": ids[2]},
        {"before_id": ids[-1], "limit": 2},
        {"kind": "none"},
    ]:
        async with db.read_transaction() as s:
            want = await queue.list_tasks(s, **kw)
        got = await queue.read_tasks(db, **kw)
        assert [[getattr(r, c) for c in columns] for r in got] == [
            [getattr(t, c) for c in columns] for t in want
        ], kw
    latest = await queue.read_tasks(db, chapter_id="c1", user_id="alice", limit=1)
    assert [t.id for t in latest] == [ids[3]]


async def test_a_repeated_cancel_of_a_running_job_is_requested_without_a_new_word(
    db: Database,
) -> None:
    """The daemons were told at the first request: a second one neither tells them again
    (each word runs every daemon's heartbeat) nor reads as finished."""
    task_id = await enqueue(db)
    await claim(db)
    async with db.write_transaction() as s:
        assert await queue.request_cancel(s, task_id) is CancelOutcome.REQUESTED
    sent: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        sent.append(statement)

    event.listen(db.engine.sync_engine, "before_cursor_execute", seen)
    try:
        async with db.write_transaction() as s:
            assert await queue.request_cancel(s, task_id) is CancelOutcome.REQUESTED
            assert not s.info.get("async_processor_wake_cancel")
    finally:
        event.remove(db.engine.sync_engine, "before_cursor_execute", seen)
    assert sent and not [sql for sql in sent if "pg_notify" in sql]


@pytest.mark.parametrize("engine_name", ["postgresql"])
async def test_concurrent_bulks_sharing_keys_in_other_orders_do_not_deadlock(
    db: Database,
) -> None:
    """Bulk enqueues that share idempotency keys in different orders took the unique index's
    locks row by row, and PostgreSQL broke the cycles with 'deadlock detected' (36 of 50
    transactions in the audit; a 500 from POST /tasks/bulk across API workers). The keys'
    advisory locks are taken in one order first; the rows keep the caller's order."""
    keys = [f"k{i}" for i in range(200)]

    async def bulk(seed: int) -> dict[str, int]:
        order = keys[:]
        random.Random(seed).shuffle(order)
        async with db.write_transaction() as s:
            done = await queue.enqueue_tasks(
                s, [{"kind": "k", "idempotency_key": key, "payload": {"s": seed}} for key in order]
            )
        return {key: r.id for key, r in zip(order, done, strict=True)}

    for _ in range(3):
        results = await asyncio.gather(*(bulk(seed) for seed in range(6)))
        assert all(r == results[0] for r in results)
        async with db.write_transaction() as s:  # the next round makes its keys anew
            await s.execute(update(PendingAnalysis).values(idempotency_key=None))
    # however many keys, a transaction holds at most KEY_LOCK_BUCKETS advisory locks (one
    # per key ran the shared lock table out past ~12,000 keys: "out of shared memory")
    async with db.write_transaction() as s:
        many = await queue.enqueue_tasks(
            s, [{"kind": "k", "idempotency_key": f"many-{i}"} for i in range(15_000)]
        )
        held = await s.execute(
            text(
                "SELECT count(*) FROM pg_locks"
                " WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
            )
        )
        assert held.scalar_one() == queue.KEY_LOCK_BUCKETS
    assert len({r.id for r in many}) == 15_000
    # the caller's order is the insert's order: ids follow the input, not the keys' locks
    async with db.write_transaction() as s:
        done = await queue.enqueue_tasks(
            s, [{"kind": "k", "idempotency_key": key} for key in ("z", "a", "m")]
        )
    assert [r.id for r in done] == sorted(r.id for r in done)


@pytest.mark.parametrize("engine_name", ["postgresql"])
async def test_a_key_whose_holder_is_deleted_mid_enqueue_is_enqueued(db: Database) -> None:
    """PostgreSQL: the keyed INSERT saw the key's holder (ON CONFLICT DO NOTHING), the
    pruner deleted it and committed, and the SELECT that looks holders up found nothing:
    the enqueue raised KeyError (a 500 from the API, seen under load). The key is free
    now, so the next round inserts it; holders found are locked against deletion until
    the caller's transaction ends."""
    async with db.write_transaction() as s:
        [old] = await queue.enqueue_tasks(s, [{"kind": "noop", "idempotency_key": "k-1"}])
        # statement-level: it fires after every INSERT, rows inserted or not, and holds the
        # enqueue between its INSERT and its SELECT while the delete commits
        await s.execute(
            text(
                "CREATE FUNCTION slow_insert() RETURNS trigger LANGUAGE plpgsql AS"
                " $$ BEGIN PERFORM pg_sleep(0.5); RETURN NULL; END $$"
            )
        )
        await s.execute(
            text(
                "CREATE TRIGGER slow_insert AFTER INSERT ON pending_analysis"
                " FOR EACH STATEMENT EXECUTE FUNCTION slow_insert()"
            )
        )

    async def enqueue() -> tuple[list[queue.EnqueuedTask], int | None]:
        async with db.write_transaction() as s:
            results = await queue.enqueue_tasks(
                s,
                [
                    {"kind": "noop", "idempotency_key": "k-1"},
                    {"kind": "noop", "idempotency_key": "k-2"},
                ],
            )
            row = await queue.get_task(s, results[0].id)
            return results, None if row is None else row.id

    async def prune() -> None:
        await asyncio.sleep(0.2)  # inside the enqueue's first INSERT
        async with db.write_transaction() as s:
            await s.execute(text("DELETE FROM pending_analysis WHERE id = :id"), {"id": old.id})

    (results, read_back), _ = await asyncio.gather(enqueue(), prune())
    assert results[0].created and results[0].id != old.id
    assert read_back == results[0].id
    async with db.read_transaction() as s:
        keys = (await s.execute(select(PendingAnalysis.id, PendingAnalysis.idempotency_key))).all()
    assert sorted(keys) == sorted([(results[0].id, "k-1"), (results[1].id, "k-2")])


@pytest.mark.parametrize("engine_name", ["postgresql"])
async def test_the_pruner_passes_over_a_holder_a_keyed_enqueue_has_locked(db: Database) -> None:
    """The keyed enqueue locks the key's holder FOR KEY SHARE until its caller commits; the
    pruner's batch skips it (SKIP LOCKED) rather than waiting on the caller's transaction
    (or deadlocking with it), and takes it at a later run."""
    from app.services.processor.pruner import Pruner

    async with db.write_transaction() as s:
        [old] = await queue.enqueue_tasks(s, [{"kind": "noop", "idempotency_key": "k-9"}])
    [t] = await claim(db)
    async with db.write_transaction() as s:
        await queue.complete_task(s, task_id=t.id, processor_id=PID, attempt=1, result=None)
        await s.execute(
            update(PendingAnalysis)
            .where(PendingAnalysis.id == old.id)
            .values(completed_at=utcnow() - timedelta(days=30))
        )
    pruner = Pruner(db, retention_days=14)
    async with db.write_transaction() as s:  # a caller's transaction, still open
        [again] = await queue.enqueue_tasks(s, [{"kind": "noop", "idempotency_key": "k-9"}])
        assert (again.id, again.created) == (old.id, False)
        pruned = await asyncio.wait_for(pruner.run_once(), 10)
        assert pruned.tasks == 0
    assert (await pruner.run_once()).tasks == 1
