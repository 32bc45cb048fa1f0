"""A million finished tasks: the fill the read-path plan test uses, and a measurement tool.

``python -m tests.scale [--rows N] [--engines sqlite,postgresql]`` fills a scratch database of
each engine (a SQLite file in a temp dir; a new PostgreSQL database on the test server,
dropped after), migrated with ``app.schema.upgrade``, then times every query behind admin
``/status`` (and its timeline), user ``/status``, ``GET /tasks`` (with and without filters,
first and deep cursor pages), ``/metrics`` and the dashboard's calls, through the same service
functions the routes call, and prints each statement's plan.

The history is one INSERT ... SELECT (generate_series on PostgreSQL, a recursive CTE on
SQLite): ids in completion order over the last 14 days (about 3,000 an hour), 97 % completed,
2 % failed, 1 % cancelled, four kinds plus a rare one, three queues, 1,000 users, 5,000
projects, 200,000 chapters, two notifications a task (the newest 20,000 tasks' unread); plus
1,000 pending and 20 processing tasks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import event, text

from app import schema
from app.db import Database
from app.services import hotpath, notifications, queue, stats
from tests import pg

SPAN_SECONDS = 14 * 24 * 3600
UNREAD_TASKS = 20_000
PENDING_ROWS = 1_000
PROCESSING_ROWS = 20

TASK_COLUMNS = (
    "kind, queue, status, priority, payload, result, retry_count, max_retries, attempts,"
    " timeout_seconds, token_usage, user_id, project_id, chapter_id, scheduled_at,"
    " created_at, started_at, completed_at, updated_at, duration_seconds, cancel_requested"
)
KIND = (
    "CASE WHEN {x} % 1000 = 0 THEN 'reindex' ELSE CASE {x} % 4 WHEN 0 THEN 'chapter_analysis'"
    " WHEN 1 THEN 'summarize' WHEN 2 THEN 'embed' ELSE 'translate' END END"
)
QUEUE = "CASE {x} % 4 WHEN 2 THEN 'ingest' WHEN 3 THEN 'mail' ELSE 'default' END"
STATUS = (
    "CASE WHEN {x} % 50 = 0 THEN 'failed' WHEN {x} % 100 = 1 THEN 'cancelled' ELSE 'completed' END"
)
IDS = "'user-' || ({x} % 1000), 'project-' || ({x} % 5000), 'chapter-' || ({x} % 200000)"


def _finished(x: str) -> str:
    return (
        f"{KIND.format(x=x)}, {QUEUE.format(x=x)}, {STATUS.format(x=x)}, 5, {{payload}},"
        f" {{result}}, 0, 3, 1, 600, 100, {IDS.format(x=x)}"
    )


PG_TASKS = (
    f"INSERT INTO pending_analysis ({TASK_COLUMNS})"
    f" SELECT {_finished('g')}, t - interval '3 s', t - interval '3 s', t - interval '2 s', t, t,"
    " (g % 100) / 10.0, false FROM (SELECT g,"
    " now() - make_interval(secs => (:n - g) * CAST(:step AS double precision)) AS t"
    " FROM generate_series(1, :n) AS g) AS s"
).format(payload="'{}'::jsonb", result="'{\"ok\": true}'::jsonb")
PG_OPEN = (
    f"INSERT INTO pending_analysis ({TASK_COLUMNS}, locked_by, lease_expires_at)"
    " SELECT 'chapter_analysis', 'default', CASE WHEN g <= :processing THEN 'processing'"
    " ELSE 'pending' END, 5, '{}'::jsonb, NULL, 0, 3, (g <= :processing)::int, 600, 0,"
    " 'user-' || (g % 1000), 'project-' || (g % 5000), 'chapter-' || (g % 200000),"
    " now() - make_interval(secs => g), now() - make_interval(secs => g),"
    " CASE WHEN g <= :processing THEN now() END, NULL, now(), NULL, false,"
    " CASE WHEN g <= :processing THEN 'proc-1' END,"
    " CASE WHEN g <= :processing THEN now() + interval '30 s' END"
    " FROM generate_series(1, :open) AS g"
)
# SQLite stores times as naive-UTC text, 'YYYY-MM-DD HH:MM:SS.ffffff' (string order is time
# order); {e} is a Unix time.
SQLITE_TIME = "(datetime({e}, 'unixepoch') || '.000000')"
NOW = "unixepoch('now')"


def _t(e: str) -> str:
    return SQLITE_TIME.format(e=e)


SQLITE_TASKS = (
    "WITH RECURSIVE g(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM g WHERE x < :n),"
    " s(x, e) AS (SELECT x, unixepoch('now') - CAST((:n - x) * :step AS INTEGER) FROM g)"
    f" INSERT INTO pending_analysis ({TASK_COLUMNS})"
    f" SELECT {_finished('x')}, {_t('e - 3')}, {_t('e - 3')}, {_t('e - 2')}, {_t('e')}, {_t('e')},"
    " (x % 100) / 10.0, 0 FROM s"
).format(payload="'{}'", result="'{\"ok\": true}'")
SQLITE_OPEN = (
    "WITH RECURSIVE g(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM g WHERE x < :open)"
    f" INSERT INTO pending_analysis ({TASK_COLUMNS}, locked_by, lease_expires_at)"
    " SELECT 'chapter_analysis', 'default', CASE WHEN x <= :processing THEN 'processing'"
    " ELSE 'pending' END, 5, '{}', NULL, 0, 3, x <= :processing, 600, 0,"
    " 'user-' || (x % 1000), 'project-' || (x % 5000), 'chapter-' || (x % 200000),"
    f" {_t(f'{NOW} - x')}, {_t(f'{NOW} - x')},"
    f" CASE WHEN x <= :processing THEN {_t(NOW)} END, NULL, {_t(NOW)}, NULL, 0,"
    " CASE WHEN x <= :processing THEN 'proc-1' END,"
    f" CASE WHEN x <= :processing THEN {_t(f'{NOW} + 30')} END"
    " FROM g"
)
# Two notifications a finished task: started, and how it ended.
NOTIFICATIONS = (
    "INSERT INTO analysis_notifications (user_id, project_id, chapter_id, task_id, type,"
    " title, message, is_read, created_at)"
    " SELECT user_id, project_id, chapter_id, id, v.type, 'title', 'message',"
    " id <= :read_below, completed_at"
    " FROM pending_analysis CROSS JOIN (SELECT 'started' AS type UNION ALL"
    " SELECT 'completed') AS v WHERE completed_at IS NOT NULL"
)


async def fill(db: Database, rows: int, *, with_notifications: bool = True) -> None:
    """``rows`` finished tasks (and their notifications), the open ones, then ANALYZE."""
    values = {
        "n": rows,
        "step": SPAN_SECONDS / rows,
        "open": PENDING_ROWS + PROCESSING_ROWS,
        "processing": PROCESSING_ROWS,
        "read_below": rows - UNREAD_TASKS,
    }
    statements = [PG_TASKS, PG_OPEN] if db.dialect == "postgresql" else [SQLITE_TASKS, SQLITE_OPEN]
    if with_notifications:
        statements.append(NOTIFICATIONS)
    if db.dialect == "postgresql":
        # One connection without the application's command timeout (the fill takes minutes);
        # VACUUM sets the visibility map, as autovacuum would.
        url = db.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        conn = await asyncpg.connect(url)
        try:
            async with conn.transaction():
                for statement in statements:
                    await conn.execute(_inline(statement, values))
            await conn.execute("VACUUM ANALYZE pending_analysis")
            await conn.execute("VACUUM ANALYZE analysis_notifications")
        finally:
            await conn.close()
        return
    async with db.write_transaction() as s:
        for statement in statements:
            await s.execute(text(statement), values)
    async with db.write_transaction() as s:
        await s.execute(text("ANALYZE"))


def _inline(statement: str, values: dict[str, float]) -> str:
    """``statement`` with its :name parameters written in as numbers."""
    return re.sub(
        r"(?<!:):(\w+)", lambda m: str(values[m[1]]) if m[1] in values else m[0], statement
    )


class Recorder:
    """The statements a block sends, with their parameters."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.statements: list[tuple[str, Any]] = []

    def _capture(self, conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            self.statements.append((statement, params))

    def __enter__(self) -> Recorder:
        event.listen(self.db.engine.sync_engine, "before_cursor_execute", self._capture)
        return self

    def __exit__(self, *_: object) -> None:
        event.remove(self.db.engine.sync_engine, "before_cursor_execute", self._capture)


async def explain(db: Database, statement: str, params: Any, *, analyze: bool = False) -> str:
    """The plan of ``statement``, as text (EXPLAIN QUERY PLAN on SQLite)."""
    async with db.engine.connect() as conn:
        driver = (await conn.get_raw_connection()).driver_connection
        assert driver is not None
        if db.dialect == "postgresql":
            options = "ANALYZE, BUFFERS, " if analyze else ""
            rows = await driver.fetch(f"EXPLAIN ({options}FORMAT TEXT) {statement}", *params)
            return "\n".join(r[0] for r in rows)
        cursor = await driver.execute("EXPLAIN QUERY PLAN " + statement, params)
        return "\n".join(str(r[3]) for r in await cursor.fetchall())


@contextmanager
def session_path() -> Iterator[None]:
    """Reads through a session (the Recorder sees only those), as a driver the hot path does
    not know takes them: the same SQL as on the bare driver."""
    saved, hotpath.ENABLED = hotpath.ENABLED, False
    try:
        yield
    finally:
        hotpath.ENABLED = saved


def calls(db: Database, rows: int) -> Iterator[tuple[str, Callable[[], Awaitable[object]]]]:
    """(name, call) for each read the routes and the dashboard make."""

    def listing(**kw: Any) -> Callable[[], Awaitable[object]]:
        async def run() -> object:
            async with db.read_transaction() as s:
                return await queue.list_tasks(s, **kw)

        return run

    def feed(**kw: Any) -> Callable[[], Awaitable[object]]:
        async def run() -> object:
            return await notifications.page_for_user(db, **kw)

        return run

    async def task() -> object:
        return await queue.read_task(db, rows - 5, user_id="user-7")

    async def latest() -> object:
        async with db.read_transaction() as s:
            return await queue.latest_for_chapter(s, "chapter-4242")

    async def retake() -> object:
        forget = getattr(stats, "forget", None)
        if forget is not None:  # the counts' cached base: what a retake costs
            forget(db)
        return await stats.summary(db)

    async def queues() -> object:
        async with db.read_transaction() as s:
            return await queue.queue_overview(s)

    deep = rows // 100  # a cursor 99 % of the way back through the history
    yield "/status summary (admin)", lambda: stats.summary(db)
    yield "/status summary (admin), counts retaken", retake
    yield "/status timeline (admin)", lambda: stats.timeline(db)
    yield "/status summary (user token)", lambda: stats.summary(db, user_id="user-7")
    yield "/status?project_id (admin)", lambda: stats.summary(db, project_id="project-42")
    yield "/metrics by_kind", lambda: stats.by_kind(db)
    yield "/metrics recent_histograms", lambda: stats.recent_histograms(db, (1.0,), (0.01,))
    yield "GET /tasks limit=50", listing(limit=50)
    yield "GET /tasks deep cursor", listing(limit=50, before_id=deep)
    yield "GET /tasks?status=failed", listing(status="failed", limit=50)
    yield "GET /tasks?status=failed deep", listing(status="failed", limit=50, before_id=deep)
    yield "GET /tasks?status=cancelled", listing(status="cancelled", limit=50)
    yield "GET /tasks?status=pending", listing(status="pending", limit=50)
    yield "dashboard /tasks?status=processing&limit=200", listing(status="processing", limit=200)
    yield "GET /tasks?kind=reindex (rare)", listing(kind="reindex", limit=50)
    yield "GET /tasks?kind=reindex deep", listing(kind="reindex", limit=50, before_id=deep)
    yield "GET /tasks?kind=nope (none)", listing(kind="nope", limit=50)
    yield "GET /tasks?kind=embed&status=failed", listing(kind="embed", status="failed", limit=50)
    yield "GET /tasks?chapter_id", listing(chapter_id="chapter-4242", limit=20)
    yield "GET /tasks?project_id", listing(project_id="project-42", limit=50)
    yield "GET /tasks?project_id deep", listing(project_id="project-42", limit=50, before_id=deep)
    yield "GET /tasks (user token)", listing(user_id="user-7", limit=50)
    yield "GET /tasks (user token) deep", listing(user_id="user-7", limit=50, before_id=deep)
    yield "GET /tasks?status=failed (user token)", listing(user_id="user-7", status="failed")
    yield "GET /tasks/{chapter}/latest", latest
    yield "GET /tasks/{id} (user token)", task
    yield "dashboard /notifications?task_id", feed(user_id=None, task_id=rows - 5, limit=50)
    yield "dashboard /queues", queues
    yield "GET /notifications (user token)", feed(user_id="user-7", limit=50)
    yield "GET /notifications?after_id (user)", feed(user_id="user-7", after_id=2 * rows - 500)


async def measure(db: Database, rows: int, repeat: int, plans: bool) -> list[dict[str, Any]]:
    """Median and best wall time of each call, and its statements' plans."""
    results = []
    for name, call in calls(db, rows):
        with Recorder(db) as recorder, session_path():
            await call()  # warm the cache and capture the statements
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            await call()
            times.append((time.perf_counter() - start) * 1000)
        entry: dict[str, Any] = {
            "name": name,
            "median_ms": round(statistics.median(times), 1),
            "best_ms": round(min(times), 1),
        }
        if plans:
            entry["plans"] = [
                {"sql": sql, "plan": await explain(db, sql, params)}
                for sql, params in recorder.statements
            ]
        results.append(entry)
        print(f"{db.dialect:10} {entry['median_ms']:9.1f} ms  {name}", flush=True)
    return results


async def run_engine(engine: str, rows: int, repeat: int, plans: bool) -> list[dict[str, Any]]:
    """Fill a scratch database of ``engine`` and measure it."""
    with tempfile.TemporaryDirectory() as tmp:
        if engine == "sqlite":
            url, name = f"sqlite+aiosqlite:///{Path(tmp) / 'scale.db'}", None
        else:
            name = pg.new_name("ap_scale")
            url = pg.create_database(name)
        try:
            await asyncio.to_thread(schema.upgrade, url)
            db = Database.from_url(url)
            try:
                start = time.perf_counter()
                await fill(db, rows)
                print(f"{engine}: filled in {time.perf_counter() - start:.1f} s", flush=True)
                return await measure(db, rows, repeat, plans)
            finally:
                await db.dispose()
        finally:
            if name is not None:
                pg.drop_database(name)


def main() -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--engines", default="sqlite,postgresql")
    parser.add_argument("--plans", action="store_true", help="print each statement's plan")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    report = {}
    for engine in args.engines.split(","):
        report[engine] = asyncio.run(run_engine(engine, args.rows, args.repeat, args.plans))
    if args.plans:
        for engine, results in report.items():
            for entry in results:
                print(f"\n=== {engine}: {entry['name']} ({entry['median_ms']} ms)")
                for p in entry["plans"]:
                    print(p["sql"].strip().replace("\n", " ")[:400])
                    print("  " + p["plan"].replace("\n", "\n  "))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
