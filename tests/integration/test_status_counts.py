"""stats.task_counts: the finished tasks before a cut-off from a cached base, the rest live.
Whatever happens to tasks, the counts equal a plain GROUP BY over the table once the base is
retaken, and completions and cancellations count at once, without a retake."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from app.db import Database
from app.models import PendingAnalysis as T
from app.services import queue, stats


async def _truth(db: Database) -> stats.Counts:
    async with db.read_transaction() as s:
        rows = await s.execute(
            select(T.status, T.queue, T.kind, func.count()).group_by(T.status, T.queue, T.kind)
        )
        return Counter({(status, q, kind): n for status, q, kind, n in rows.all()})


async def _run(db: Database, n: int, *, fail: bool = False, queue_name: str = "default") -> None:
    """Enqueue ``n`` tasks of ``queue_name``, claim them and complete (or fail) them."""
    async with db.write_transaction() as s:
        await queue.enqueue_tasks(s, [{"kind": "k", "queue": queue_name} for _ in range(n)])
    async with db.write_transaction() as s:
        claimed = await queue.claim_tasks(
            s, processor_id="p", limit=n, lease_seconds=30, queues=[queue_name]
        )
    assert len(claimed) == n
    async with db.write_transaction() as s:
        for task in claimed:
            if fail:
                await queue.fail_task(
                    s,
                    task_id=task.id,
                    processor_id="p",
                    attempt=task.attempt,
                    error="boom",
                    retry_delay=0,
                    permanent=True,
                )
            else:
                await queue.complete_task(
                    s, task_id=task.id, processor_id="p", attempt=task.attempt, result={}
                )


def _by_status(counts: stats.Counts) -> dict[str, int]:
    totals: Counter[str] = Counter()
    for (status, _, _), n in counts.items():
        totals[status] += n
    return dict(totals)


async def test_counts_stay_exact_through_the_life_cycle(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first call takes the base (every finished task minus those past its cut-off).
    await _run(db, 3)
    await _run(db, 2, fail=True, queue_name="mail")
    assert await stats.task_counts(db, with_kind=True) == await _truth(db)

    # New completions and a cancellation count at once, while the base is kept.
    base = stats._BASES[db][(None, None)]
    await _run(db, 4)
    async with db.write_transaction() as s:
        [pending] = await queue.enqueue_tasks(s, [{"kind": "k"}])
        [other] = await queue.enqueue_tasks(s, [{"kind": "k"}])
        await queue.request_cancel(s, pending.id)
    counts = await stats.task_counts(db, with_kind=True)
    assert stats._BASES[db][(None, None)] is base
    assert counts == await _truth(db)
    assert _by_status(counts) == {"completed": 7, "failed": 2, "cancelled": 1, "pending": 1}

    # A retry moves a finished task back to pending: forget() retakes the base at once.
    async with db.write_transaction() as s:
        failed = [t.id for t in await queue.list_tasks(s, status="failed")]
        assert await queue.retry_task(s, failed[0]) is queue.RetryOutcome.RETRIED
    stats.forget(db)
    assert await stats.task_counts(db, with_kind=True) == await _truth(db)

    # An old base is retaken in the background while it serves; the next call has the new one.
    monkeypatch.setattr(stats, "BASE_MAX_AGE_SECONDS", 0.0)
    old = stats._BASES[db][(None, None)]
    async with db.write_transaction() as s:
        await queue.request_cancel(s, other.id)
    assert await stats.task_counts(db, with_kind=True) == await _truth(db)
    assert old.retaking is not None
    await old.retaking
    assert stats._BASES[db][(None, None)] is not old
    assert await stats.task_counts(db, with_kind=True) == await _truth(db)
    # That call found its base old too (the age limit is 0) and started another retake:
    # let it finish before the fixture disposes of the database under it.
    retaking = stats._BASES[db][(None, None)].retaking
    if retaking is not None:
        await retaking


async def test_summary_and_by_kind_shapes(db: Database) -> None:
    await _run(db, 2)
    await _run(db, 1, fail=True, queue_name="mail")
    async with db.write_transaction() as s:
        await queue.enqueue_tasks(s, [{"kind": "k", "user_id": "alice"}, {"kind": "other"}])
    summary = await stats.summary(db)
    assert summary["counts"] == {
        "pending": 2,
        "processing": 0,
        "completed": 2,
        "failed": 1,
        "cancelled": 0,
    }
    assert summary["queues"] == {"default": {"completed": 2, "pending": 2}, "mail": {"failed": 1}}
    assert await stats.by_kind(db) == {
        "k": {"completed": 2, "failed": 1, "pending": 1},
        "other": {"pending": 1},
    }
    mine = await stats.summary(db, user_id="alice")
    assert mine["counts"]["pending"] == 1 and sum(mine["counts"].values()) == 1


async def test_a_finish_past_the_cut_off_counts_once(db: Database) -> None:
    """A task that finishes after a base was taken is counted by the live part only, and a
    retaken base does not count it twice (every finished minus those past the cut-off)."""
    await _run(db, 1)
    await stats.task_counts(db)
    later = datetime.now(UTC) + timedelta(seconds=stats.REFRESH_MARGIN_SECONDS * 3)
    async with db.write_transaction() as s:
        [task] = await queue.enqueue_tasks(s, [{"kind": "k"}])
        [claimed] = await queue.claim_tasks(s, processor_id="p", limit=1, lease_seconds=30)
        await queue.complete_task(
            s, task_id=task.id, processor_id="p", attempt=claimed.attempt, result={}, now=later
        )
    stats.forget(db)
    await asyncio.sleep(0)
    assert _by_status(await stats.task_counts(db)) == {"completed": 2}
    assert _by_status(await stats.task_counts(db)) == {"completed": 2}
