"""finish_tasks writes a batch of completions in one statement on either engine (SQLite: a
json_each document; PostgreSQL: unnested arrays), fenced per row, with the same values the
one-row UPDATE writes; SQLite before 3.38 and results strict JSON cannot carry take the
executemany. Every form is checked row by row."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
from sqlalchemy import select

from app.db import Database
from app.models import AnalysisNotification, PendingAnalysis, TaskStatus
from app.services import hotpath, queue

T = PendingAnalysis
PID = "proc-a"
RESULTS: list[Any] = [
    {"summary": 'ünïcode \u2013 "quoted" \\ \n', "n": [1, 2.5, None, True]},
    None,
    [1, 2, 3],
    "plain text",
    12345678901234,
]


@pytest.fixture(autouse=True, params=["driver", "core"])
def execution_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(hotpath, "ENABLED", request.param == "driver")
    return str(request.param)


async def _held(db: Database, count: int) -> list[queue.ClaimedTask]:
    async with db.write_transaction() as s:
        await queue.enqueue_tasks(s, [{"kind": "k", "user_id": "u"} for _ in range(count)])
    async with db.write_transaction() as s:
        return await queue.claim_tasks(s, processor_id=PID, limit=count, lease_seconds=30)


def _complete(t: queue.ClaimedTask, result: Any, **kw: Any) -> queue.Finished:
    kw.setdefault("duration_seconds", 0.25)
    return queue.Finished(t.id, t.attempt, queue.Finish.COMPLETE, result=result, ref=t.ref, **kw)


async def _finish(db: Database, items: list[queue.Finished]) -> tuple[list[Any], list[str]]:
    sent: list[str] = []
    with hotpath.watch(lambda sql, _args, _seconds: sent.append(sql)):
        async with db.write_transaction() as s:
            statuses = await queue.finish_tasks(s, processor_id=PID, items=items)
    return statuses, [sql for sql in sent if "json_each" in sql and "UPDATE" in sql]


async def _rows(db: Database, ids: list[int]) -> dict[int, Any]:
    async with db.read_transaction() as s:
        found = (await s.execute(select(T).where(T.id.in_(ids)))).scalars().all()
    return {r.id: r for r in found}


@pytest.mark.parametrize("batch", ["completions only", "with a failure"])
async def test_a_batch_of_completions_is_written_row_by_row(
    db: Database, execution_path: str, batch: str
) -> None:
    """Completions only (each with its claimed task): SQLite's UPDATE returns what it wrote,
    no read first. With another kind of end: the rows are locked and read, then written."""
    held = await _held(db, len(RESULTS) + 2)
    done, stale, failed = held[: len(RESULTS)], held[-2], held[-1]
    items = [_complete(t, r) for t, r in zip(done, RESULTS, strict=True)]
    items[0] = _complete(done[0], RESULTS[0], token_usage=queue.MAX_INT)  # saturates below
    items[1] = _complete(done[1], None, duration_seconds=None)
    # another daemon's attempt of this job: the fence refuses it, and only it
    items.append(dataclasses.replace(_complete(stale, 1), attempt=stale.attempt + 1))
    if batch == "with a failure":
        items.append(queue.Finished(failed.id, failed.attempt, queue.Finish.FAIL, error="boom"))
    statuses, documents = await _finish(db, items)
    expected = [TaskStatus.COMPLETED] * len(RESULTS) + [None]
    assert statuses == expected + ([TaskStatus.PENDING] if batch == "with a failure" else [])
    if db.dialect == "sqlite" and execution_path == "driver":
        assert len(documents) == 1
        assert ("RETURNING" in documents[0]) is (batch == "completions only")

    rows = await _rows(db, [t.id for t in held])
    for t, result in zip(done, RESULTS, strict=True):
        row = rows[t.id]
        assert (row.status, row.result, row.error) == (TaskStatus.COMPLETED, result, None)
        assert (row.locked_by, row.lease_expires_at) == (None, None)
        assert row.completed_at is not None and row.completed_at == row.updated_at
    assert rows[done[0].id].token_usage == queue.MAX_INT
    assert [rows[t.id].token_usage for t in done[1:]] == [0] * (len(RESULTS) - 1)
    assert rows[done[1].id].duration_seconds is None
    assert [rows[t.id].duration_seconds for t in done[2:]] == [0.25] * (len(RESULTS) - 2)
    assert (rows[stale.id].status, rows[stale.id].locked_by) == (TaskStatus.PROCESSING, PID)
    if batch == "with a failure":
        assert rows[failed.id].status == TaskStatus.PENDING and rows[failed.id].retry_count == 1
    else:
        assert (rows[failed.id].status, rows[failed.id].locked_by) == ("processing", PID)

    async with db.read_transaction() as s:
        notes = (
            await s.execute(
                select(AnalysisNotification.task_id).where(AnalysisNotification.type == "completed")
            )
        ).all()
    assert sorted(n.task_id for n in notes) == sorted(t.id for t in done)


async def test_token_usage_adds_to_what_the_row_holds(db: Database) -> None:
    held = await _held(db, 2)
    await _finish(db, [_complete(t, None, token_usage=7) for t in held])
    rows = await _rows(db, [t.id for t in held])
    assert [rows[t.id].token_usage for t in held] == [7, 7]


@pytest.mark.parametrize("engine_name", ["sqlite"])
@pytest.mark.parametrize("why", ["old sqlite", "nan", "too big"])
async def test_sqlite_batches_the_document_cannot_carry_go_one_by_one(
    db: Database, why: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if why == "old sqlite":
        monkeypatch.setattr(queue, "SQLITE_JSON_ARROWS", False)
    elif why == "too big":  # results too large together for one bound value
        monkeypatch.setattr(queue, "SQLITE_DOCUMENT_BYTES", 20)
    held = await _held(db, 3)
    results = [{"n": 1}, {"n": 2}, {"n": float("nan") if why == "nan" else 3}]
    statuses, documents = await _finish(
        db, [_complete(t, r) for t, r in zip(held, results, strict=True)]
    )
    assert statuses == [TaskStatus.COMPLETED] * 3 and documents == []
    rows = await _rows(db, [t.id for t in held])
    assert [rows[t.id].result["n"] for t in held[:2]] == [1, 2]
    last = rows[held[2].id].result["n"]
    assert math.isnan(last) if why == "nan" else last == 3


@pytest.mark.parametrize("batch", ["completions only", "with a failure"])
async def test_a_completion_without_a_duration_keeps_the_rows(db: Database, batch: str) -> None:
    from sqlalchemy import update

    held = await _held(db, 3)
    async with db.write_transaction() as s:
        await s.execute(update(T).values(duration_seconds=5.0))
    items = [_complete(t, None, duration_seconds=None) for t in held[:2]]
    if batch == "with a failure":
        items.append(queue.Finished(held[2].id, held[2].attempt, queue.Finish.FAIL, error="x"))
    await _finish(db, items)
    rows = await _rows(db, [t.id for t in held[:2]])
    assert [rows[t.id].duration_seconds for t in held[:2]] == [5.0, 5.0]


#: Results that are JSON arrays, first in their batch: PostgreSQL's batch statements bind
#: the results as one array parameter, and an array of arrays must not be taken for a
#: two-dimensional array (which unnest flattened, giving one task another task's result).
LIST_RESULTS: list[Any] = [[1, 2], ["secret-of-bob", 0], [], [{"a": 1}, [None]], {"k": [3]}]


@pytest.mark.parametrize("size", [1, len(LIST_RESULTS)])
async def test_results_that_are_lists_are_stored_whole(db: Database, size: int) -> None:
    held = await _held(db, size)
    items = [_complete(t, r) for t, r in zip(held, LIST_RESULTS, strict=False)]
    statuses, _ = await _finish(db, items)
    assert statuses == [TaskStatus.COMPLETED] * size
    rows = await _rows(db, [t.id for t in held])
    assert [rows[t.id].result for t in held] == LIST_RESULTS[:size]


@pytest.mark.parametrize("size", [1, len(LIST_RESULTS)])
async def test_results_that_are_lists_are_stored_whole_alone(
    db: Database, execution_path: str, size: int
) -> None:
    """The daemon's completions on PostgreSQL: one autocommitted statement (on the bare
    driver only; elsewhere the caller takes finish_tasks, above)."""
    held = await _held(db, size)
    items = [_complete(t, r) for t, r in zip(held, LIST_RESULTS, strict=False)]
    async with db.engine.connect() as conn:
        statuses = await queue.complete_tasks_alone(conn, processor_id=PID, items=items)
    if db.dialect == "sqlite" or execution_path == "core":
        assert statuses is None  # not this path
        return
    assert statuses == [TaskStatus.COMPLETED] * size
    rows = await _rows(db, [t.id for t in held])
    assert [rows[t.id].result for t in held] == LIST_RESULTS[:size]
