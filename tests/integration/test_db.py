"""Engines: SQLite pragmas, BEGIN IMMEDIATE, folder creation, the database clock."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import select, text

from app.db import Database, later_sql, now_sql


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_sqlite_pragmas(db: Database) -> None:
    async with db.read_transaction() as s:
        values = [
            (await s.execute(text(f"PRAGMA {name}"))).scalar_one()
            for name in ("journal_mode", "synchronous", "busy_timeout", "foreign_keys")
        ]
    assert values == ["wal", 1, 5000, 1]


async def test_sqlite_folder_is_created(tmp_path: Path) -> None:
    db = Database.from_url(f"sqlite+aiosqlite:///{tmp_path}/a/b/q.db")
    try:
        async with db.write_transaction() as s:
            await s.execute(text("CREATE TABLE t (x INTEGER)"))
    finally:
        await db.dispose()
    assert (tmp_path / "a" / "b" / "q.db").is_file()


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_write_transactions_lock_up_front_and_reads_do_not(
    db: Database, database_url: str
) -> None:
    other = sqlite3.connect(database_url.split("///", 1)[1], timeout=0, isolation_level=None)
    try:
        async with db.read_transaction() as s:
            await s.execute(text("SELECT count(*) FROM pending_analysis"))
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
        async with db.write_transaction() as s:
            await s.execute(text("SELECT count(*) FROM pending_analysis"))
            with pytest.raises(sqlite3.OperationalError, match="database is locked"):
                other.execute("BEGIN IMMEDIATE")
    finally:
        other.close()


async def test_database_clock_is_aware_utc(db: Database) -> None:
    async with db.read_transaction() as s:
        now = (await s.execute(select(now_sql(db.dialect)))).scalar_one()
        later = (await s.execute(select(later_sql(db.dialect, 90)))).scalar_one()
        if db.dialect == "postgresql":
            server = (await s.execute(text("SELECT now()"))).scalar_one()
            assert now == server
    assert now.utcoffset() is not None and now.utcoffset().total_seconds() == 0
    assert 89 <= (later - now).total_seconds() <= 91
