"""Every SQL recipe in docs/operations.md runs on its engines against a real schema."""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from app.db import Database, sqlite_path
from app.models import PendingAnalysis
from app.models.types import utcnow
from app.services import queue

DOC = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
BLOCK = re.compile(r"```sql\n-- engine: (both|sqlite|postgresql)\n(.*?)```", re.S)
RECIPES = BLOCK.findall(DOC.read_text())


def test_the_document_has_recipes_for_both_engines() -> None:
    engines = [engine for engine, _ in RECIPES]
    assert engines.count("both") >= 2 and engines.count("sqlite") >= 6
    assert engines.count("sqlite") == engines.count("postgresql")


async def _seed(db: Database) -> None:
    async with db.write_transaction() as s:
        await queue.register_processor(
            s, processor_id="p", hostname="h", pid=1, version="v", concurrency=2
        )
        await queue.enqueue_tasks(
            s,
            [
                {"kind": "chapter_analysis", "user_id": f"u{i % 2}", "max_retries": 0}
                for i in range(6)
            ],
        )
        await queue.enqueue_task(
            s, kind="noop", queue="ingest", scheduled_at=utcnow() - timedelta(minutes=5)
        )
    async with db.write_transaction() as s:
        claimed = await queue.claim_tasks(
            s, processor_id="p", limit=5, lease_seconds=30, queues=["default"]
        )
        for t in claimed[:2]:
            await queue.complete_task(
                s,
                task_id=t.id,
                processor_id="p",
                attempt=1,
                result={},
                duration_seconds=0.5,
                token_usage=7,
            )
        for t in claimed[2:4]:
            await queue.fail_task(
                s,
                task_id=t.id,
                processor_id="p",
                attempt=1,
                error="Boom: bad\ntrace",
                retry_delay=1,
            )
        await s.execute(
            update(PendingAnalysis)
            .where(PendingAnalysis.id == claimed[4].id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=5))
        )


async def _run(db: Database, sql: str) -> list[tuple[object, ...]]:
    statements = [part.strip() for part in sql.split(";") if part.strip()]
    async with db.engine.connect() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        rows: list[tuple[object, ...]] = []
        for statement in statements:
            if db.dialect == "postgresql":
                rows = [tuple(r) for r in await raw.fetch(statement)]
            else:
                cursor = await raw.execute(statement)
                rows = [tuple(r) for r in await cursor.fetchall()]
        return rows


async def test_every_recipe_runs(db: Database) -> None:
    await _seed(db)
    ran = 0
    for engine, sql in RECIPES:
        if engine in ("both", db.dialect):
            await _run(db, sql)
            ran += 1
    assert ran == sum(1 for engine, _ in RECIPES if engine in ("both", db.dialect))
    # the requeue recipe really requeued the two failed chapter analyses
    async with db.read_transaction() as s:
        failed = (
            await s.execute(select(func.count()).where(PendingAnalysis.status == "failed"))
        ).scalar_one()
    assert failed == 0


@pytest.mark.parametrize(
    "title", ["Queue depth", "stuck in processing", "Top failure", "Live and dead"]
)
async def test_key_recipes_return_the_expected_rows(db: Database, title: str) -> None:
    await _seed(db)
    section = DOC.read_text().split(title, 1)[1]
    sql = next(body for engine, body in BLOCK.findall(section) if engine in ("both", db.dialect))
    rows = await _run(db, sql)
    if title == "Queue depth":
        assert sorted((str(q), str(st), int(str(n))) for q, st, n in rows) == [
            ("default", "completed", 2),
            ("default", "failed", 2),
            ("default", "pending", 1),
            ("default", "processing", 1),
            ("ingest", "pending", 1),
        ]
    elif title == "stuck in processing":
        assert len(rows) == 1
    elif title == "Top failure":
        assert [(r[0], r[1], int(str(r[2]))) for r in rows] == [
            ("chapter_analysis", "Boom: bad", 2)
        ]
    else:
        assert [r[-1] for r in rows] == ["live"]


def _set_columns(sql: str) -> set[str]:
    """The columns an UPDATE's SET clause names."""
    clause = sql.split("SET", 1)[1].split("WHERE", 1)[0]
    return {part.split("=")[0].strip() for part in re.split(r",\s*(?![^()]*\))", clause)}


async def test_the_requeue_recipe_sets_what_tasks_retry_sets(db: Database) -> None:
    """Column for column, as its text says: a column the CLI's retry starts resetting
    (queue._retry_values) and the recipe does not is caught here, and the values agree."""
    section = DOC.read_text().split("## Requeue the failed jobs of a kind", 1)[1]
    recipes = dict(BLOCK.findall(section.split("\n## ", 1)[0]))
    expected = set(queue._retry_values(func.now()))
    for engine in ("sqlite", "postgresql"):
        assert _set_columns(recipes[engine]) == expected, engine
    await _seed(db)
    async with db.write_transaction() as s:
        # one more failed task, of another kind, left to the CLI's retry
        [other] = await queue.enqueue_tasks(s, [{"kind": "noop", "max_retries": 0}])
        await queue.claim_tasks(s, processor_id="p", limit=1, lease_seconds=30, only_ids=[other.id])
        await queue.fail_task(
            s, task_id=other.id, processor_id="p", attempt=1, error="x", retry_delay=1
        )
        failed = (
            await s.scalars(
                select(PendingAnalysis.id).where(
                    PendingAnalysis.status == "failed", PendingAnalysis.kind == "chapter_analysis"
                )
            )
        ).all()
    assert len(failed) == 2
    await _run(db, recipes[db.dialect])
    async with db.write_transaction() as s:
        assert await queue.retry_task(s, other.id) is queue.RetryOutcome.RETRIED
    columns = sorted(expected - {"scheduled_at", "updated_at"})
    async with db.read_transaction() as s:
        rows = {
            r.id: r
            for r in (
                await s.scalars(
                    select(PendingAnalysis).where(PendingAnalysis.id.in_([*failed, other.id]))
                )
            ).all()
        }
    by_cli = {c: getattr(rows[other.id], c) for c in columns}
    assert by_cli["status"] == "pending" and by_cli["result"] is None
    for task_id in failed:
        assert {c: getattr(rows[task_id], c) for c in columns} == by_cli, task_id
        assert rows[task_id].scheduled_at <= utcnow()


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_the_backup_recipe_copies_a_live_database(db: Database, tmp_path: Path) -> None:
    """`VACUUM INTO` (the recipe) copies a database that another connection commits to
    every few milliseconds, as a busy daemon does: one consistent snapshot, whole. (The
    shell's `.backup` it replaced started over at every commit and never finished.)"""
    await _seed(db)
    recipe = re.search(r'"VACUUM INTO \'(.+?)\'"', DOC.read_text())
    assert recipe is not None
    source = sqlite_path(db.engine.url)
    assert source is not None
    target = tmp_path / "backup.db"
    stop = threading.Event()

    def writer() -> None:
        con = sqlite3.connect(source, timeout=5, isolation_level=None)
        while not stop.is_set():
            con.execute("BEGIN IMMEDIATE")
            con.execute("UPDATE pending_analysis SET token_usage = token_usage + 1 WHERE id = 1")
            con.execute("COMMIT")
            time.sleep(0.002)
        con.close()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        src = sqlite3.connect(source, timeout=5, isolation_level=None)
        src.execute(f"VACUUM INTO '{target}'")
        src.close()
    finally:
        stop.set()
        thread.join()
    copy = sqlite3.connect(target)
    live = sqlite3.connect(source)
    try:
        assert copy.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        for table in ("pending_analysis", "analysis_notifications", "processors"):
            query = f"SELECT count(*) FROM {table}"
            assert copy.execute(query).fetchall() == live.execute(query).fetchall(), table
        sequence = "SELECT name, seq FROM sqlite_sequence ORDER BY name"
        assert copy.execute(sequence).fetchall() == live.execute(sequence).fetchall()
        assert copy.execute("SELECT version_num FROM alembic_version").fetchall()
    finally:
        copy.close()
        live.close()
