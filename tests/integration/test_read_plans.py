"""The reads behind /status, /metrics, GET /tasks and the dashboard go through indexes, with
100,000 finished tasks, on both engines: no read walks the table, no task list sorts more than
the few pending or running tasks, and the finished counts come from an index alone.

The statements checked are the ones the service functions really send (captured on their way
to the driver) and are explained with the same parameters, as in test_claim_plan. The planner
is left alone after ANALYZE (VACUUM ANALYZE on PostgreSQL, as autovacuum would run). The data
is tests/scale.py's history, a tenth of the size that docs/operations.md measures.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import event

from app.db import Database
from app.services import notifications, queue, stats
from tests import pg, scale
from tests.conftest import ENGINES
from tests.scale import Recorder

ROWS = 100_000
TABLES = ("pending_analysis", "analysis_notifications")
PK = "pk"
COMPLETED_AT = "ix_pending_analysis_completed_at"
FINISHED = "ix_pending_analysis_finished"
CLAIM = {"ix_pending_analysis_claim", "ix_pending_analysis_claim_any"}
RUNNING = {"ix_pending_analysis_lease", "ix_pending_analysis_locked_by"}


@dataclass
class Access:
    """How a statement reads the two big tables: the indexes, and what it may not do."""

    indexes: set[str] = field(default_factory=set)
    index_only: set[str] = field(default_factory=set)
    # SQLite: a temp b-tree for ORDER BY (rows sorted instead of read in order).
    sorts_rows: bool = False
    # PostgreSQL (EXPLAIN ANALYZE): the most rows one node read, kept or filtered out, and the
    # most rows one Sort sorted. The planner may sort a few rows rather than read in order.
    rows_read: int = 0
    rows_sorted: int = 0


_SQLITE = re.compile(
    rf"^(?P<op>SCAN|SEARCH) (?P<table>{'|'.join(TABLES)})\b"
    r"(?: USING (?P<covering>COVERING )?INDEX (?P<index>\w+)| USING (?P<pk>INTEGER PRIMARY KEY))?"
)


def _sqlite_access(lines: list[str], *, ordered_scan: bool) -> Access:
    """``ordered_scan``: a plain SCAN of the table is allowed (a list newest first reads the
    rowid b-tree backwards and stops after ``limit`` rows)."""
    access = Access()
    for line in lines:
        if "TEMP B-TREE FOR ORDER BY" in line:
            access.sorts_rows = True
        match = _SQLITE.match(line)
        if match is None:
            continue
        if match["index"]:
            access.indexes.add(match["index"])
            if match["covering"]:
                access.index_only.add(match["index"])
        elif match["pk"] or ordered_scan:
            access.indexes.add(PK)
        else:
            raise AssertionError(f"full scan of {match['table']}: {lines}")
    return access


def _pg_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _pg_nodes(child)


def _pg_access(plan: dict[str, Any]) -> Access:
    access = Access()
    for node in _pg_nodes(plan):
        if node.get("Relation Name") in TABLES and node["Node Type"] == "Seq Scan":
            raise AssertionError(f"sequential scan: {node}")
        loops = node.get("Actual Loops", 1)
        read = sum(node.get(k, 0) for k in ("Actual Rows", "Rows Removed by Filter")) * loops
        if "Scan" in node["Node Type"]:
            access.rows_read = max(access.rows_read, read)
        if node["Node Type"] == "Sort":
            access.rows_sorted = max(access.rows_sorted, node["Actual Rows"] * loops)
        index = node.get("Index Name")
        if index is None:
            continue
        name = PK if index.startswith("pk_") else index
        access.indexes.add(name)
        if node["Node Type"] == "Index Only Scan":
            access.index_only.add(name)
    return access


async def _explain(db: Database, statement: str, params: Any, ordered_scan: bool) -> Access:
    async with db.engine.connect() as conn:
        driver = (await conn.get_raw_connection()).driver_connection
        assert driver is not None
        if db.dialect == "postgresql":
            rows = await driver.fetch("EXPLAIN (ANALYZE, FORMAT JSON) " + statement, *params)
            doc = rows[0][0]
            return _pg_access((json.loads(doc) if isinstance(doc, str) else doc)[0]["Plan"])
        cursor = await driver.execute("EXPLAIN QUERY PLAN " + statement, params)
        lines = [str(row[3]) for row in await cursor.fetchall()]
        return _sqlite_access(lines, ordered_scan=ordered_scan)


async def _reads(
    db: Database, call: Callable[[], Awaitable[object]], ordered: bool = False
) -> list[Access]:
    """How each statement of ``call`` that touches the big tables reads them."""
    with Recorder(db) as recorder:
        await call()
    found = []
    for statement, params in recorder.statements:
        if any(table in statement for table in TABLES):
            found.append(await _explain(db, statement, params, ordered))
    assert found, "no statement captured"
    return found


@pytest.fixture(scope="module", params=ENGINES)
def history_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """One filled database per engine for the whole module (the tests only read it)."""
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("reads") / "reads.db"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        url, name = f"sqlite+aiosqlite:///{path}", None
    else:
        name = pg.new_name()
        url = pg.create_database(name, template=request.getfixturevalue("pg_template"))

    async def fill() -> None:
        db = Database.from_url(url)
        try:
            await scale.fill(db, ROWS)
        finally:
            await db.dispose()

    try:
        pg.run_in_thread(fill)
        yield url
    finally:
        if name is not None:
            pg.drop_database(name)


@pytest.fixture
async def history(history_url: str) -> AsyncIterator[Database]:
    db = Database.from_url(history_url)
    try:
        yield db
    finally:
        await db.dispose()


def _listing(db: Database, **kw: Any) -> Callable[[], Awaitable[object]]:
    async def run() -> object:
        async with db.read_transaction() as s:
            return await queue.list_tasks(s, **kw)

    return run


async def test_status_and_metrics_counts_read_indexes(history: Database) -> None:
    db = history
    stats.forget(db)
    base, live = await _reads(db, lambda: stats.task_counts(db))
    # The base: every finished task from the finished index alone, minus the recent ones.
    assert FINISHED in base.index_only and base.indexes <= {FINISHED, COMPLETED_AT}, base
    # Each call: pending through a claim index, running through its partial index, and
    # the tasks finished since the base's cut-off through the completed_at range.
    assert live.indexes & CLAIM and live.indexes & RUNNING and COMPLETED_AT in live.indexes
    assert live.indexes <= CLAIM | RUNNING | {COMPLETED_AT}, live
    [with_kind] = await _reads(db, lambda: stats.task_counts(db, with_kind=True))
    assert with_kind.indexes <= CLAIM | RUNNING | {COMPLETED_AT}, with_kind
    # A user's counts read that user's tasks through the user index.
    stats.forget(db)
    scoped = await _reads(db, lambda: stats.task_counts(db, user_id="user-7"))
    assert all("ix_pending_analysis_user_id" in a.indexes for a in scoped), scoped
    # The rest of /status and /metrics (the base taken): the last hour through completed_at,
    # the oldest due pending task through a claim index.
    await stats.task_counts(db)
    for access in [
        *await _reads(db, lambda: stats.summary(db)),
        *await _reads(db, lambda: stats.timeline(db)),
        *await _reads(db, lambda: stats.recent_histograms(db, (1.0,), (0.01,))),
    ]:
        assert access.indexes and access.indexes <= CLAIM | RUNNING | {COMPLETED_AT}, access
    counted = await stats.task_counts(db)
    assert sum(counted.values()) == ROWS + scale.PENDING_ROWS + scale.PROCESSING_ROWS


@pytest.mark.parametrize(
    ("filters", "index"),
    [
        ({}, PK),
        ({"before_id": ROWS // 100}, PK),
        ({"status": "failed"}, "ix_pending_analysis_failed"),
        ({"status": "failed", "before_id": ROWS // 100}, "ix_pending_analysis_failed"),
        ({"status": "cancelled"}, "ix_pending_analysis_cancelled"),
        ({"status": "completed"}, PK),
        ({"kind": "reindex"}, "ix_pending_analysis_kind"),
        ({"kind": "nope"}, "ix_pending_analysis_kind"),
        ({"kind": "reindex", "before_id": ROWS // 100}, "ix_pending_analysis_kind"),
        ({"chapter_id": "chapter-4242"}, "ix_pending_analysis_chapter_id"),
        ({"project_id": "project-42"}, "ix_pending_analysis_project_id"),
        ({"user_id": "user-7"}, "ix_pending_analysis_user_id"),
        ({"user_id": "user-7", "before_id": ROWS // 100}, "ix_pending_analysis_user_id"),
        ({"user_id": "user-7", "status": "failed"}, None),
    ],
    ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else str(v),
)
async def test_task_lists_read_a_page_in_index_order(
    history: Database, filters: dict[str, Any], index: str | None
) -> None:
    """GET /tasks, newest first: one filter's index (ending with id) or the primary key, read
    in order, first page and deep cursor page alike (PostgreSQL may rather sort the few rows
    of a small group: a bound on the rows read and sorted)."""
    ordered = not ({"kind", "chapter_id", "project_id", "user_id"} & set(filters))
    [access] = await _reads(history, _listing(history, limit=50, **filters), ordered=ordered)
    assert not access.sorts_rows, access
    assert access.rows_read <= ROWS // 50 and access.rows_sorted <= 200, access
    if index is not None:
        assert access.indexes == {index}, access
    else:  # two filters: either one's index (PostgreSQL may combine them)
        assert access.indexes and access.indexes <= {
            "ix_pending_analysis_user_id",
            "ix_pending_analysis_failed",
            FINISHED,
        }, access


async def test_dashboard_reads_read_indexes(history: Database) -> None:
    """The dashboard's other calls: running tasks (few: a partial index, a small sort), a
    task's notifications, the caller's unread count (an admin's: every user's, from the
    partial index over unread notifications)."""
    db = history
    [running] = await _reads(db, _listing(db, status="processing", limit=200))
    assert running.indexes and running.indexes <= RUNNING, running

    async def feed() -> object:
        async with db.read_transaction() as s:
            await notifications.list_for_user(s, user_id=None, task_id=ROWS - 5, limit=50)
            return await notifications.unread_count(s, user_id=None)

    by_task, unread = await _reads(db, feed)
    assert by_task.indexes == {"ix_analysis_notifications_task_id"}, by_task
    assert unread.indexes == {"ix_analysis_notifications_unread"}, unread


async def test_queue_overview_reads_the_live_indexes(history: Database) -> None:
    """GET /queues (polled by the dashboard): pending and running counts per queue through
    their partial indexes, never the finished history."""
    db = history

    async def overview() -> object:
        async with db.read_transaction() as s:
            return await queue.queue_overview(s)

    accesses = await _reads(db, overview)
    assert accesses and all(a.indexes and a.indexes <= CLAIM | RUNNING for a in accesses), accesses


@pytest.mark.parametrize(
    ("scope", "filters", "page_index"),
    [
        (None, {"task_id": ROWS - 5}, "ix_analysis_notifications_task_id"),
        ("user-7", {}, "ix_analysis_notifications_user_id"),
        ("user-7", {"after_id": 2 * ROWS - 500}, "ix_analysis_notifications_user_id"),
    ],
    ids=["dashboard-task", "user-newest", "user-after-id"],
)
async def test_a_feed_page_with_its_unread_count_reads_indexes(
    history: Database,
    monkeypatch: pytest.MonkeyPatch,
    scope: str | None,
    filters: dict[str, Any],
    page_index: str | None,
) -> None:
    """GET /notifications' one statement (page and unread count together): the count from
    an index over the user's unread rows; a user's page as a range of the (user_id, id)
    index read in order, stopping after the page (no sort of the user's notifications);
    the dashboard's task page through the task index."""
    from app.services import hotpath

    monkeypatch.setattr(hotpath, "ENABLED", False)  # the session's way: the Recorder sees it
    with Recorder(history) as recorder:
        await notifications.page_for_user(history, user_id=scope, **filters)
    [(statement, params)] = recorder.statements
    access = await _explain(history, statement, params, False)
    feed = {"ix_analysis_notifications_unread", "ix_analysis_notifications_feed"}
    assert access.indexes - {page_index} <= feed and access.indexes & feed, access
    assert page_index in access.indexes, access
    # Sorted: the page's rows at most (the outer ORDER BY). An admin's count reads every
    # user's unread notifications (the partial index's whole length).
    assert access.rows_sorted <= 50, access
    assert scope is None or access.rows_read <= 100, access
    if history.dialect == "sqlite":
        plan = await scale.explain(history, statement, params)
        assert plan.count("TEMP B-TREE") <= 1, plan  # the outer ORDER BY of <= 50 rows


class _Undo(Exception):
    """Raised to roll a write transaction back."""


@pytest.mark.parametrize("scope", ["user-7", None], ids=["user", "admin"])
async def test_read_all_reads_only_unread_notifications(
    history: Database, scope: str | None
) -> None:
    """POST /notifications/read-all: the user's (or, for an admin, every user's) unread rows
    through the unread indexes, never the notification history (on SQLite an ORDER BY id
    there had it read the user's every notification; on PostgreSQL `is_read IS false`
    matched no index)."""
    sent: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE ANALYSIS_NOTIFICATIONS"):
            sent.append((statement, params))

    engine = history.engine.sync_engine
    event.listen(engine, "before_cursor_execute", capture)
    try:
        async with history.write_transaction() as s:
            await notifications.mark_all_read(s, user_id=scope)
            raise _Undo
    except _Undo:
        pass
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    [(statement, params)] = sent
    plan = await scale.explain(history, statement, params)
    unread = {"ix_analysis_notifications_unread", "ix_analysis_notifications_feed"}
    assert any(index in plan for index in unread), plan
    if history.dialect == "postgresql":
        assert "Seq Scan" not in plan, plan
    else:
        assert "SCAN analysis_notifications\n" not in plan + "\n", plan
        assert "ix_analysis_notifications_user_id" not in plan, plan
