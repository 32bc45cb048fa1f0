"""The claim reads the partial pending index, not the table, with 100,000 finished rows."""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy import event, text

from app.db import Database
from app.services import queue

FINISHED_ROWS = 100_000


COLUMNS = (
    "kind, queue, status, priority, payload, retry_count, max_retries, attempts,"
    " timeout_seconds, token_usage, scheduled_at, created_at, updated_at, completed_at,"
    " cancel_requested"
)
STATUS = "CASE WHEN {x} % 10 = 0 THEN 'failed' ELSE 'completed' END"
PG_FILL = (
    f"INSERT INTO pending_analysis ({COLUMNS}) SELECT 'k', 'default', {STATUS.format(x='g')},"
    " 5, '{}'::jsonb, 0, 3, 1, 600, 0, now(), now(), now(), now(), false"
    " FROM generate_series(1, :n) AS g"
)
SQLITE_TIME = "'2026-01-01 00:00:00.000000'"
SQLITE_FILL = (
    "WITH RECURSIVE g(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM g WHERE x < :n)"
    f" INSERT INTO pending_analysis ({COLUMNS}) SELECT 'k', 'default', {STATUS.format(x='x')},"
    f" 5, '{{}}', 0, 3, 1, 600, 0, {SQLITE_TIME}, {SQLITE_TIME}, {SQLITE_TIME}, {SQLITE_TIME}, 0"
    " FROM g"
)


async def _fill_history(db: Database) -> None:
    fill = PG_FILL if db.dialect == "postgresql" else SQLITE_FILL
    async with db.write_transaction() as s:
        await s.execute(text(fill), {"n": FINISHED_ROWS})
        await queue.enqueue_tasks(s, [{"kind": "k", "queue": q} for q in ("default", "other") * 5])
    async with db.write_transaction() as s:
        await s.execute(
            text("ANALYZE pending_analysis" if db.dialect == "postgresql" else "ANALYZE")
        )


async def _claim_sql(db: Database, **kw: Any) -> tuple[str, Any]:
    """The exact statement claim_tasks sends, captured on its way to the driver."""
    seen: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE PENDING_ANALYSIS"):
            seen.append((statement, params))

    event.listen(db.engine.sync_engine, "before_cursor_execute", capture)
    try:
        async with db.write_sessionmaker() as s:
            async with s.begin():
                await queue.claim_tasks(s, processor_id="p", limit=5, lease_seconds=30, **kw)
                await s.rollback()
    finally:
        event.remove(db.engine.sync_engine, "before_cursor_execute", capture)
    return seen[0]


async def _plan(db: Database, statement: str, params: Any) -> str:
    async with db.engine.connect() as conn:
        raw = await conn.get_raw_connection()
        driver = raw.driver_connection
        if db.dialect == "postgresql":
            rows = await driver.fetch("EXPLAIN (FORMAT JSON) " + statement, *params)
            return json.dumps(json.loads(rows[0][0]) if isinstance(rows[0][0], str) else rows[0][0])
        cursor = await driver.execute("EXPLAIN QUERY PLAN " + statement, params)
        return "\n".join(str(r[3]) for r in await cursor.fetchall())


@pytest.mark.parametrize(
    ("queues", "index"),
    [(None, "ix_pending_analysis_claim_any"), (["default"], "ix_pending_analysis_claim")],
)
async def test_claim_uses_the_pending_index(
    db: Database, queues: list[str] | None, index: str
) -> None:
    await _fill_history(db)
    statement, params = await _claim_sql(db, queues=queues)
    plan = await _plan(db, statement, params)
    assert index in plan
    if db.dialect == "postgresql":
        assert '"Node Type": "Seq Scan"' not in plan
    else:
        assert not any(
            line.startswith("SCAN pending_analysis") and "INDEX" not in line
            for line in plan.splitlines()
        ), plan
