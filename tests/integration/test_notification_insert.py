"""notifications.add: every row stored as ``build`` made it, in order, whichever statement
carries it (PostgreSQL's unnest; SQLite's json_each document, or the one-row INSERT for a
single row, before SQLite 3.38, and for values the document cannot carry)."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest
from sqlalchemy import select

from app.db import Database, sqlite_path
from app.models import AnalysisNotification, NotificationType
from app.services import hotpath, notifications, queue

N = AnalysisNotification


@pytest.fixture(autouse=True, params=["driver", "core"])
def execution_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(hotpath, "ENABLED", request.param == "driver")
    return str(request.param)


async def _tasks(db: Database, count: int) -> list[int]:
    async with db.write_transaction() as s:
        made = await queue.enqueue_tasks(
            s,
            [
                {"kind": "chapter_analysis", "user_id": f"u{i % 2}", "chapter_id": f"c{i}"}
                for i in range(count)
            ],
        )
    return [m.id for m in made]


def _rows(task_ids: list[int], **extra: Any) -> list[dict[str, Any]]:
    kinds = list(NotificationType)
    return [
        notifications.build(
            kinds[i % len(kinds)],
            notifications.TaskRef(t, "chapter_analysis", f"u{i % 2}", "p", f"c{i}", i + 1),
            f'message {i} \u2013 ünïcode "quoted" \\ back\nslash',
            duration_seconds=0.000123 * i,
            nested={"list": [1, 2.5, None, True], "empty": {}},
            **extra,
        )
        for i, t in enumerate(task_ids)
    ]


async def _stored(db: Database) -> list[dict[str, Any]]:
    async with db.read_transaction() as s:
        found = (await s.execute(select(N).order_by(N.id))).scalars().all()
    assert all(n.is_read is False and n.read_at is None for n in found)
    assert len({n.created_at for n in found}) <= 1  # one clock for the statement
    keys = ("user_id", "project_id", "chapter_id", "task_id", "type", "title", "message", "data")
    return [{k: getattr(n, k) for k in keys} for n in found]


def _expected(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**r, "type": NotificationType(r["type"])} for r in rows]


def _statements(db: Database) -> tuple[list[str], Any]:
    seen: list[str] = []
    return seen, hotpath.watch(lambda sql, _args, _seconds: seen.append(sql))


@pytest.mark.parametrize("count", [1, 2, 25])
async def test_add_stores_every_row_in_order(db: Database, count: int, execution_path: str) -> None:
    rows = _rows(await _tasks(db, count))
    seen, watching = _statements(db)
    with watching:
        async with db.write_transaction() as s:
            await notifications.add(s, rows)
    assert await _stored(db) == _expected(rows)
    if db.dialect == "sqlite" and execution_path == "driver":
        documents = [sql for sql in seen if "json_each" in sql]
        assert len(documents) == (1 if count > 1 else 0)


@pytest.mark.parametrize("engine_name", ["sqlite"])
@pytest.mark.parametrize("why", ["old sqlite", "nan", "nul"])
async def test_sqlite_rows_the_document_cannot_carry_go_one_by_one(
    db: Database, why: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before SQLite 3.38 (no ->>), for a value strict JSON has no text for (NaN, which
    the one-row INSERT has always stored as json.dumps writes it), and for a NUL in a
    string, the executemany."""
    if why == "old sqlite":
        monkeypatch.setattr(notifications, "SQLITE_JSON_ARROWS", False)
        rows = _rows(await _tasks(db, 3))
    elif why == "nul":  # an exception's text may hold one; ->> would cut the text there
        rows = _rows(await _tasks(db, 3))
        rows[1]["message"] = "bad\x00thing"
    else:
        rows = _rows(await _tasks(db, 3), ratio=float("nan"))
    seen, watching = _statements(db)
    with watching:
        async with db.write_transaction() as s:
            await notifications.add(s, rows)
    stored = await _stored(db)
    if why == "nan":
        assert all(r["data"]["ratio"] != r["data"]["ratio"] for r in stored)  # NaN
        for r in stored + rows:
            r["data"].pop("ratio")
    assert stored == _expected(rows)
    assert not [sql for sql in seen if "json_each" in sql]


@pytest.mark.parametrize("engine_name", ["sqlite"])
@pytest.mark.parametrize("count", [1, 4])
async def test_sqlite_add_on_a_bare_connection(db: Database, database_url: str, count: int) -> None:
    """add_sqlite3 (the daemon's claim on the bare connection) stores the same rows."""
    rows = _rows(await _tasks(db, count))
    path = sqlite_path(database_url)
    assert path is not None
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("BEGIN IMMEDIATE")
        notifications.add_sqlite3(conn, db.engine.sync_engine.dialect, rows)
        conn.execute("COMMIT")
    finally:
        conn.close()
    assert await _stored(db) == _expected(rows)


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_sqlite_document_refuses_what_utf8_cannot_hold(db: Database) -> None:
    """A lone surrogate fails the insert (as the one-row INSERT's binding does), and the
    transaction's other rows go with it: nothing stored mangled."""
    rows = _rows(await _tasks(db, 3))
    rows[1]["message"] = "bad \ud800 text"
    with pytest.raises(Exception, match=r"surrogate|encode"):
        async with db.write_transaction() as s:
            await notifications.add(s, rows)
    assert await _stored(db) == []
