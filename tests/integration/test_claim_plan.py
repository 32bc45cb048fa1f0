"""The claim reads the partial pending index, not the table, with 100,000 finished rows.

The statement whose plan is checked is the one ``queue.claim_tasks`` really sends: it is
captured on its way to the driver (inside a transaction that is rolled back), then
explained with the same parameters. The planner is left alone (no ``enable_seqscan``): it
must pick the index by itself after ANALYZE.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import event, text

from app.config import KeyLimit
from app.db import Database
from app.models.types import utcnow
from app.services import hotpath, notifications, queue

FINISHED_ROWS = 100_000
CLAIM = "ix_pending_analysis_claim"
CLAIM_ANY = "ix_pending_analysis_claim_any"
PK = "pk_pending_analysis"

COLUMNS = (
    "kind, queue, status, priority, payload, retry_count, max_retries, attempts,"
    " timeout_seconds, token_usage, scheduled_at, created_at, updated_at, completed_at,"
    " cancel_requested"
)
# Finished history: nine completed rows for each failed one, all with completed_at set.
STATUS = "CASE WHEN {x} % 10 = 0 THEN 'failed' ELSE 'completed' END"
# History spread over four queues (a deployment that uses queues), or all in "default".
SPREAD = (
    "CASE {x} % 4 WHEN 0 THEN 'default' WHEN 1 THEN 'ingest' WHEN 2 THEN 'mail' ELSE 'other' END"
)
PG_FILL = (
    f"INSERT INTO pending_analysis ({COLUMNS}) SELECT 'k', {{queue}}, {STATUS.format(x='g')},"
    " 5, '{{}}'::jsonb, 0, 3, 1, 600, 0, now(), now(), now(), now(), false"
    " FROM generate_series(1, :n) AS g"
)
# SQLite has no generate_series: a recursive CTE does the same, in one statement.
SQLITE_TIME = "'2026-01-01 00:00:00.000000'"
SQLITE_FILL = (
    "WITH RECURSIVE g(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM g WHERE x < :n)"
    f" INSERT INTO pending_analysis ({COLUMNS}) SELECT 'k', {{queue}}, {STATUS.format(x='x')},"
    f" 5, '{{{{}}}}', 0, 3, 1, 600, 0, {SQLITE_TIME}, {SQLITE_TIME}, {SQLITE_TIME},"
    f" {SQLITE_TIME}, 0 FROM g"
)
PENDING_QUEUES = ("default", "other") * 5  # a few pending rows in two queues
_COUNT = "SELECT status, count(*) FROM pending_analysis GROUP BY status"


async def _fill(db: Database, *, spread: bool) -> None:
    """100,000 finished rows in one statement, a few pending ones, then ANALYZE."""
    pg = db.dialect == "postgresql"
    variable = "g" if pg else "x"
    queue_expr = SPREAD.format(x=variable) if spread else "'default'"
    fill = (PG_FILL if pg else SQLITE_FILL).format(queue=queue_expr)
    async with db.write_transaction() as s:
        await s.execute(text(fill), {"n": FINISHED_ROWS})
        await queue.enqueue_tasks(s, [{"kind": "k", "queue": q} for q in PENDING_QUEUES])
    async with db.write_transaction() as s:
        await s.execute(text("ANALYZE pending_analysis" if pg else "ANALYZE"))
        counts: dict[str, int] = dict((await s.execute(text(_COUNT))).all())
    assert counts == {"completed": 90_000, "failed": 10_000, "pending": len(PENDING_QUEUES)}


async def _claim_sql(
    db: Database, *, limit: int = 5, expect: int | None = 5, **kw: Any
) -> tuple[str, Any]:
    """The exact statement claim_tasks sends, captured on its way to the driver."""
    seen: list[tuple[str, Any]] = []

    def capture(statement: str, params: Any, _seconds: float) -> None:
        if statement.lstrip().upper().startswith("UPDATE PENDING_ANALYSIS"):
            seen.append((statement, params))

    with hotpath.watch(capture):  # the claim goes to the driver directly (hotpath)
        async with db.write_sessionmaker() as s:
            await s.begin()
            claimed = await queue.claim_tasks(
                s, processor_id="p", limit=limit, lease_seconds=30, **kw
            )
            await s.rollback()
    if expect is not None:
        assert len(claimed) == expect  # the statement works on this data
    assert len(seen) == 1, seen
    return seen[0]


async def _sqlite_plan(db: Database, statement: str, params: Any) -> list[str]:
    async with db.engine.connect() as conn:
        driver = (await conn.get_raw_connection()).driver_connection
        assert driver is not None
        cursor = await driver.execute("EXPLAIN QUERY PLAN " + statement, params)
        return [str(row[3]) for row in await cursor.fetchall()]


async def _pg_plan(
    db: Database, statement: str, params: Any, *, generic: bool = False
) -> list[dict[str, Any]]:
    """The plan for these parameters, or (``generic``) the one a prepared statement switches
    to after a few executions, which knows no array's length (the daemon's statements are
    prepared once and run thousands of times)."""
    async with db.engine.connect() as conn:
        driver = (await conn.get_raw_connection()).driver_connection
        assert driver is not None
        if generic:
            # EXPLAIN with parameters plans for their values: explain EXECUTE of a
            # server-side prepared statement instead, its plan cache held to the generic plan.
            await driver.execute(f"PREPARE plan_probe AS {statement}")
            types = await driver.fetchval(
                "SELECT parameter_types::text[] FROM pg_prepared_statements"
                " WHERE name = 'plan_probe'"
            )
            # EXECUTE takes no parameters: its arguments as literals, written by the server.
            quoted = ", ".join(f"quote_nullable(${i}::{t}::text)" for i, t in enumerate(types, 1))
            literals = await driver.fetchrow(f"SELECT {quoted}", *params)
            args = ", ".join(f"{v}::{t}" for v, t in zip(literals, types, strict=True))
            await driver.execute("SET plan_cache_mode = force_generic_plan")
            rows = await driver.fetch(f"EXPLAIN (FORMAT JSON) EXECUTE plan_probe({args})")
            await driver.execute("DEALLOCATE plan_probe; RESET plan_cache_mode")
        else:
            rows = await driver.fetch("EXPLAIN (FORMAT JSON) " + statement, *params)
    doc = rows[0][0]
    doc = json.loads(doc) if isinstance(doc, str) else doc
    return list(_nodes(doc[0]["Plan"]))


def _nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _nodes(child)


_SQLITE_ACCESS = re.compile(
    r"^(?P<op>SCAN|SEARCH) pending_analysis\b"
    r"(?: USING (?:COVERING )?INDEX (?P<index>\w+)| USING (?P<pk>INTEGER PRIMARY KEY))?"
)


def _sqlite_indexes(plan: list[str]) -> set[str]:
    """Indexes the plan reads pending_analysis through; fails on a table scan."""
    used: set[str] = set()
    for line in plan:
        match = _SQLITE_ACCESS.match(line)
        if match is None:
            continue
        assert match["index"] or match["pk"], f"full scan of pending_analysis: {plan}"
        used.add(match["index"] or PK)
    return used


def _pg_indexes(plan: list[dict[str, Any]]) -> set[str]:
    """Indexes the plan reads pending_analysis through; fails on a sequential scan."""
    for node in plan:
        # queue_states holds one row per paused or resumed queue: scanning it is right.
        if node.get("Relation Name") != "queue_states":
            assert node["Node Type"] != "Seq Scan", f"sequential scan: {node}"
    # The pick (the LIMIT subquery; on PostgreSQL one per priority, under the limit of
    # the whole) reads pending rows in index order and stops after ``limit`` rows: no
    # sort below a Limit. (Sorting the ≤ limit picked ids for the outer semi-join is fine.)
    limits = [n for n in plan if n["Node Type"] == "Limit"]
    assert limits, plan
    for limit in limits:
        for node in _nodes(limit):
            assert node["Node Type"] != "Sort", f"the claim sorts, not reading in order: {node}"
    # Each priority's due range is a bound of the pending index's scan (priority = p AND
    # scheduled_at <= now), so no task scheduled for later is read.
    assert _pg_bounded_by_schedule(plan), plan
    return {n["Index Name"] for n in plan if "Index Name" in n}


async def _indexes(db: Database, queues: list[str] | None) -> set[str]:
    statement, params = await _claim_sql(db, queues=queues)
    if db.dialect == "postgresql":
        # The plan a prepared claim settles on (the daemon's) reads a pending index too.
        generic = _pg_indexes(await _pg_plan(db, statement, params, generic=True))
        assert len(generic - {PK}) == 1 and generic - {PK} <= {CLAIM, CLAIM_ANY}, generic
        return _pg_indexes(await _pg_plan(db, statement, params))
    plan = await _sqlite_plan(db, statement, params)
    used = _sqlite_indexes(plan)
    assert not any("TEMP B-TREE" in line for line in plan), plan  # read in index order
    return used


async def test_claim_uses_the_pending_indexes(db: Database) -> None:
    """No queue filter: the ordered pending index over all queues; a queue filter: the
    per-queue one. Never the table, never a sort."""
    await _fill(db, spread=True)
    assert await _indexes(db, None) - {PK} == {CLAIM_ANY}
    assert await _indexes(db, ["default"]) - {PK} == {CLAIM}


async def test_claim_stays_on_a_pending_index_when_history_is_all_one_queue(db: Database) -> None:
    """Table-wide statistics then say queue = 'default' matches nearly every row, so for a
    queue-filtered claim the two pending indexes cost the same (PostgreSQL takes either);
    either way the claim reads pending rows only, in order, whatever the history."""
    await _fill(db, spread=False)
    assert await _indexes(db, None) - {PK} == {CLAIM_ANY}
    used = await _indexes(db, ["default"]) - {PK}
    assert len(used) == 1 and used <= {CLAIM, CLAIM_ANY}, used


@pytest.mark.parametrize("engine_name", ["postgresql"])
async def test_completions_join_the_batch_by_primary_key(db: Database) -> None:
    """The completer's statements (one-statement and in a transaction) find each end's row
    by primary key. Statistics taken while nothing ran say one running row; if the fence's
    constants were visible the planner scanned the partial index over running rows once per
    end (quadratic in the rows a daemon holds). When the rows were locked in a subquery and
    joined to the ends again, it scanned the ends once per locked row."""
    await _fill(db, spread=False)
    async with db.write_transaction() as s:
        await queue.enqueue_tasks(s, [{"kind": "k"} for _ in range(150)])
    async with db.write_transaction() as s:
        held = await queue.claim_tasks(s, processor_id="p", limit=160, lease_seconds=30)
    items = [
        queue.Finished(t.id, t.attempt, queue.Finish.COMPLETE, duration_seconds=0.1, ref=t.ref)
        for t in held
    ]
    params = {
        "b_locked_by": "p",
        "b_now": utcnow(),
        "u_id": [i.task_id for i in items],
        "u_attempt": [i.attempt for i in items],
        "u_result": [None for _ in items],
        "u_duration": [0.1 for _ in items],
        "u_tokens": [0 for _ in items],
        **notifications.array_params([queue._completed_note(t.ref, 0.1) for t in held]),
    }
    async with db.engine.connect() as conn:
        dialect = conn.dialect
    for statement in (queue._complete_alone_statement(), queue._COMPLETE_UNNESTED):
        prepared = hotpath.prepared(statement, dialect)
        sql, args = prepared.bind(params)
        for generic in (False, True):
            _check_completion_plan(await _pg_plan(db, sql, args, generic=generic))


def _check_completion_plan(plan: list[dict[str, Any]]) -> None:
    reads = [n for n in plan if n.get("Relation Name") == "pending_analysis"]
    assert not [n for n in reads if n["Node Type"] == "Seq Scan"], plan
    assert {n["Index Name"] for n in reads if "Index Name" in n} == {PK}, plan
    # Nor is the batch scanned once per row of another row set (quadratic in the batch):
    # no nested loop rescans a CTE or the unnested arrays.
    for loop in (n for n in plan if n["Node Type"] == "Nested Loop"):
        inner = loop["Plans"][1]
        assert inner["Node Type"] not in ("CTE Scan", "Function Scan"), plan


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_sqlite_completions_find_each_row_by_primary_key(db: Database) -> None:
    """SQLite's one-statement completion (a json_each document) reads the document once and
    finds each end's row by primary key. Written with the fence's constants in the WHERE,
    SQLite read this daemon's running rows through their index and scanned the document
    once per row: quadratic, ~4 ms a completion in a batch of 124. (No history and no
    ANALYZE: the daemon never runs it on SQLite, and without statistics the index over
    running rows looked cheapest.)"""
    async with db.write_transaction() as s:
        await queue.enqueue_tasks(s, [{"kind": "k"} for _ in range(160)])
    async with db.write_transaction() as s:
        held = await queue.claim_tasks(s, processor_id="p", limit=160, lease_seconds=30)
    items = [
        queue.Finished(t.id, t.attempt, queue.Finish.COMPLETE, duration_seconds=0.1, ref=t.ref)
        for t in held
    ]
    seen: list[tuple[str, Any]] = []

    def capture(statement: str, params: Any, _seconds: float) -> None:
        if "json_each" in statement and "UPDATE pending_analysis" in statement:
            seen.append((statement, params))

    with hotpath.watch(capture):
        async with db.write_sessionmaker() as s:
            await s.begin()
            await queue.finish_tasks(s, processor_id="p", items=items)
            await s.rollback()
    assert len(held) == 160 and len(seen) == 1, (len(held), seen)
    plan = await _sqlite_plan(db, *seen[0])
    # (the quadratic plan: SEARCH pending_analysis USING INDEX ix_pending_analysis_locked_by,
    # then SCAN of the document inside it)
    assert _sqlite_indexes(plan) == {PK}, plan


LATER_ROWS = 20_000


def _later_fill(pg: bool, priority: str = "", kind: str = "k") -> str:
    """INSERT … SELECT of :n pending tasks of ``kind`` due tomorrow, of ``priority`` (by
    default half at 1, half at 10)."""
    tomorrow = "now() + interval '1 day'" if pg else "'2999-01-01 00:00:00.000000'"
    series = (
        "generate_series(1, :n) AS g"
        if pg
        else "(WITH RECURSIVE s(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM s WHERE x < :n)"
        " SELECT x FROM s)"
    )
    empty = "'{}'::jsonb" if pg else "'{}'"
    priority = priority or f"1 + (9 * ({'g' if pg else 'x'} % 2))"
    return (
        f"INSERT INTO pending_analysis ({COLUMNS}) SELECT '{kind}', 'default', 'pending',"
        f" {priority}, {empty}, 0, 3, 0, 600, 0, {tomorrow},"
        f" {tomorrow}, {tomorrow}, NULL, {'false' if pg else '0'} FROM {series}"
    )


async def _selects(db: Database, read: Any) -> list[tuple[str, Any]]:
    """The SELECTs of pending_analysis ``read(session)`` sends, in a rolled-back
    transaction."""
    seen: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if "pending_analysis" in statement and statement.lstrip().upper().startswith("SELECT"):
            seen.append((statement, params))

    event.listen(db.engine.sync_engine, "before_cursor_execute", capture)
    try:
        async with db.write_sessionmaker() as s:
            await s.begin()
            await read(s)
            await s.rollback()
    finally:
        event.remove(db.engine.sync_engine, "before_cursor_execute", capture)
    return seen


def _pg_bounded_by_schedule(plan: list[dict[str, Any]]) -> bool:
    """Whether every read of a pending index in PostgreSQL's plan has the schedule and one
    priority as bounds (``priority = p AND scheduled_at <= now()``)."""
    scans = [n for n in plan if n.get("Index Name") in (CLAIM, CLAIM_ANY)]
    return bool(scans) and all(
        "priority =" in n.get("Index Cond", "") and "scheduled_at <=" in n.get("Index Cond", "")
        for n in scans
    )


def _bounded_by_schedule(plan: Any) -> bool:
    """Whether SQLite's plan reads the pending index with the schedule as a bound of each
    priority's range (``SEARCH … (priority=? AND scheduled_at<?)``), not as a filter over
    every pending row."""
    searches = [line for line in plan if "ix_pending_analysis_claim" in line]
    return bool(searches) and all("priority=?" in s and "scheduled_at<" in s for s in searches)


async def test_claim_passes_no_task_scheduled_for_later(db: Database) -> None:
    """Tasks scheduled for tomorrow (a backlog of retries, a nightly batch enqueued early)
    are never read by a claim, whatever their priority: each priority's due range is a
    bound of the index scan. With the schedule a filter, a claim finding fewer due tasks
    than it asked for read every later task (100,000: SQLite ~12 ms a claim against 0.6,
    PostgreSQL ~4 ms against 1.3; there, with nearly every row pending, a scan of the
    table)."""
    pg = db.dialect == "postgresql"
    async with db.write_transaction() as s:
        await s.execute(text(_later_fill(pg)), {"n": LATER_ROWS})
        pairs = [(3, "default"), (7, "other")] * 3
        due = await queue.enqueue_tasks(
            s, [{"kind": "k", "priority": p, "queue": q} for p, q in pairs]
        )
    async with db.write_transaction() as s:
        await s.execute(text("ANALYZE pending_analysis" if pg else "ANALYZE"))
    for queues, found in ((None, 6), (["default"], 3), (["default", "other"], 6)):
        statement, params = await _claim_sql(db, queues=queues, limit=10, expect=found)
        if pg:
            for generic in (False, True):
                used = _pg_indexes(await _pg_plan(db, statement, params, generic=generic))
                assert used - {PK} <= {CLAIM, CLAIM_ANY} and used - {PK}, (queues, used)
        else:
            plan = await _sqlite_plan(db, statement, params)
            assert _bounded_by_schedule(plan), (queues, plan)
    # The reads for flow-limited kinds' turns (what a claim would take; a kind's due tasks
    # within its rate limit; within its per-key limit) are bounded the same way.
    key = KeyLimit("k", "chapter_id", 1)
    reads = [
        lambda s: queue.peek_due(s, limit=10),
        lambda s: queue.peek_due(s, limit=10, queues=["default"], exclude_kinds=["x"]),
        lambda s: queue.pick_limited(s, kind="k", limit=10),
        lambda s: queue.pick_limited(s, kind="k", limit=10, key=key),
    ]
    for read in reads:
        due_reads = [x for x in await _selects(db, read) if "scheduled_at <=" in x[0]]
        assert due_reads
        for statement, params in due_reads:
            if pg:
                for generic in (False, True):
                    plan = await _pg_plan(db, statement, params, generic=generic)
                    _pg_indexes_anywhere(plan)  # no table scan
                    assert _pg_bounded_by_schedule(plan), (statement, plan)
            else:
                plan = await _sqlite_plan(db, statement, params)
                assert _bounded_by_schedule(plan), (statement, plan)
    # When the next of them is due (the daemon's timer): one index seek per priority.
    for queues in (None, ["default"]):
        seen: list[tuple[str, Any]] = []

        def capture(_conn: Any, _cursor: Any, statement: str, params: Any, *_: Any) -> None:
            seen.append((statement, params))  # noqa: B023 (used before the loop moves on)

        event.listen(db.engine.sync_engine, "before_cursor_execute", capture)
        try:
            async with db.read_transaction() as s:
                seconds = await queue.next_due_in(s, queues=queues)
        finally:
            event.remove(db.engine.sync_engine, "before_cursor_execute", capture)
        assert seconds is not None and 3600 < seconds
        [(statement, params)] = [x for x in seen if "min(" in x[0]]
        if pg:
            nodes = await _pg_plan(db, statement, params)
            reads = [n for n in nodes if n.get("Relation Name") == "pending_analysis"]
            assert len(reads) == 10 and all(
                n["Node Type"].startswith("Index") and "scheduled_at" in n.get("Index Cond", "")
                for n in reads
            ), nodes
        else:
            lines = await _sqlite_plan(db, statement, params)
            searches = [x for x in lines if x.startswith("SEARCH pending_analysis")]
            assert len(searches) == 10 and all("scheduled_at>?" in x for x in searches), lines
    async with db.write_transaction() as s:
        claimed = await queue.claim_tasks(s, processor_id="p", limit=10, lease_seconds=30)
    # every due task, in claim order, and none of tomorrow's
    assert [(t.priority, t.id) for t in claimed] == sorted(
        ((t.priority, t.id) for t in claimed), key=lambda pair: (-pair[0], pair[1])
    )
    assert sorted(t.id for t in claimed) == sorted(d.id for d in due)


_HISTORY_INDEXES = {
    "ix_pending_analysis_kind",
    "ix_pending_analysis_chapter_id",
    "ix_pending_analysis_project_id",
    "ix_pending_analysis_user_id",
}


async def test_a_limited_kinds_pick_reads_no_finished_row(db: Database) -> None:
    """A kind with flow limits is picked (its due tasks, its running tasks per key) through
    the indexes over pending and running rows, never the kind's or the key's index, which
    hold every finished row: with 300,000 finished rows of the kind SQLite read them all,
    ~47 ms a pick (and ~57-156 ms for the running counts), every claim."""
    pg = db.dialect == "postgresql"
    fill = (PG_FILL if pg else SQLITE_FILL).format(queue="'default'")
    async with db.write_transaction() as s:
        await s.execute(text(fill), {"n": FINISHED_ROWS})
        await s.execute(
            text(
                "UPDATE pending_analysis SET chapter_id = 'c' || (id % 100),"
                " kind = CASE WHEN id % 5 < 2 THEN 'other' ELSE 'k' END"
            )
        )
        await queue.enqueue_tasks(s, [{"kind": "k", "chapter_id": f"c{i % 4}"} for i in range(8)])
        # and tasks of another kind due tomorrow at a higher priority (a review measured
        # PostgreSQL's custom plans ANDing the kind's index, its whole history, into a pick)
        await s.execute(text(_later_fill(pg, priority="10", kind="other")), {"n": LATER_ROWS})
    async with db.write_transaction() as s:
        await queue.claim_tasks(s, processor_id="p", limit=2, lease_seconds=30)
    async with db.write_transaction() as s:
        await s.execute(text("ANALYZE pending_analysis" if pg else "ANALYZE"))
    seen: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if "pending_analysis" in statement and statement.lstrip().upper().startswith("SELECT"):
            seen.append((statement, params))

    key = KeyLimit("k", "chapter_id", 1)
    event.listen(db.engine.sync_engine, "before_cursor_execute", capture)
    try:
        async with db.write_sessionmaker() as s:
            await s.begin()
            pick = await queue.pick_limited(s, kind="k", limit=3, key=key)
            await s.rollback()
    finally:
        event.remove(db.engine.sync_engine, "before_cursor_execute", capture)
    # the running tasks hold c0 and c1: one due task each of c2 and c3 may start
    assert len(pick.due) == 2, pick
    assert len(seen) >= 2, seen  # the due pick and the running tasks' keys
    for statement, params in seen:
        if pg:
            plan: Any = await _pg_plan(db, statement, params)
            used = _pg_indexes_anywhere(plan)
        else:
            plan = await _sqlite_plan(db, statement, params)
            used = _sqlite_indexes(plan)
        assert not used & _HISTORY_INDEXES, (statement, plan)


def _pg_indexes_anywhere(plan: list[dict[str, Any]]) -> set[str]:
    for node in plan:
        if node.get("Relation Name") == "pending_analysis":
            assert node["Node Type"] != "Seq Scan", f"sequential scan: {node}"
    return {n["Index Name"] for n in plan if "Index Name" in n}
