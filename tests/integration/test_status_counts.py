"""stats.task_counts: the finished tasks before a cut-off from a cached base, the rest live.
Whatever happens to tasks, the counts equal a plain GROUP BY over the table once the base is
retaken, and completions and cancellations count at once, without a retake."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, update

from app.db import Database
from app.models import PendingAnalysis as T
from app.models import Processor, ProcessorState
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


async def test_a_silent_processor_is_not_counted_live(db: Database) -> None:
    """A daemon killed with SIGKILL leaves its row 'running'; when no other daemon runs to
    reap it, the status views still must not count it live: three leases after its last
    heartbeat (by the database's clock) it moves to silent_processors."""
    async with db.write_transaction() as s:
        for name in ("alive", "killed", "stopped"):
            await queue.register_processor(
                s, processor_id=name, hostname="h", pid=1, version="v", concurrency=3
            )
        await queue.touch_processor(s, processor_id="killed", in_flight=2, processed=7, failed=0)
        await queue.touch_processor(
            s,
            processor_id="stopped",
            in_flight=0,
            processed=1,
            failed=0,
            state=ProcessorState.STOPPED,
        )
        old = datetime.now(UTC) - timedelta(seconds=100)
        await s.execute(update(Processor).where(Processor.id == "killed").values(last_seen_at=old))
    summary = await stats.summary(db, lease_seconds=30)
    assert [p["id"] for p in summary["processors"]] == ["alive"]
    [silent] = summary["silent_processors"]
    assert (silent["id"], silent["state"], silent["in_flight"]) == ("killed", "running", 2)
    assert 99 <= silent["silent_seconds"] <= 130
    # With a longer lease the same row is still within three leases: live.
    longer = await stats.summary(db, lease_seconds=60)
    assert [p["id"] for p in longer["processors"]] == ["alive", "killed"]
    assert longer["silent_processors"] == []


async def test_recent_histograms_count_every_kind_in_the_database(db: Database) -> None:
    """Run time and pick-up delay per kind, counted by the database over the whole hour:
    exact to the microsecond on both engines (SQLite's julianday() reads milliseconds),
    a delay before the task existed counts as none, and finished-long-ago rows are out."""
    async with db.write_transaction() as s:
        tasks = await queue.enqueue_tasks(
            s, [{"kind": kind} for kind in ("fast", "fast", "fast", "slow", "old")]
        )
        claimed = await queue.claim_tasks(s, processor_id="p", limit=5, lease_seconds=30)
        assert len(claimed) == 5
    due = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=30)
    # (duration, pick-up): pick-ups straddle the 1 ms and 2 ms bounds by 100 µs.
    shapes = {
        tasks[0].id: (0.04, 0.0009),
        tasks[1].id: (0.2, 0.0011),
        tasks[2].id: (None, 0.0021),
        tasks[3].id: (7.0, 3.5),
        tasks[4].id: (1.0, 0.001),
    }
    async with db.write_transaction() as s:
        for c in claimed:
            duration, pickup = shapes[c.id]
            await queue.complete_task(
                s,
                task_id=c.id,
                processor_id="p",
                attempt=c.attempt,
                result=None,
                duration_seconds=duration,
            )
            await s.execute(
                update(T)
                .where(T.id == c.id)
                .values(
                    created_at=due - timedelta(seconds=1),
                    scheduled_at=due,
                    started_at=due + timedelta(seconds=pickup),
                )
            )
        old = datetime.now(UTC) - timedelta(hours=2)
        await s.execute(update(T).where(T.id == tasks[4].id).values(completed_at=old))
    got = await stats.recent_histograms(db, (0.1, 1.0, 10.0), (0.001, 0.002, 1.0))
    assert set(got) == {"fast", "slow"}
    fast, slow = got["fast"], got["slow"]
    assert (fast.count, fast.duration_buckets, fast.pickup_buckets) == (3, (2, 3, 3), (1, 2, 3))
    assert fast.duration_sum == pytest.approx(0.24)
    assert fast.pickup_sum == pytest.approx(0.0041, abs=1e-6)
    assert (slow.count, slow.duration_buckets, slow.pickup_buckets) == (1, (0, 0, 1), (0, 0, 0))
    assert slow.pickup_sum == pytest.approx(3.5, abs=1e-6)
    # A task scheduled before it was created waited from its creation; one that started
    # "before" it was due (a clock step) waited none.
    async with db.write_transaction() as s:
        await s.execute(
            update(T)
            .where(T.id == tasks[3].id)
            .values(scheduled_at=due - timedelta(days=9000), created_at=due)
        )
        await s.execute(
            update(T).where(T.id == tasks[0].id).values(started_at=due - timedelta(seconds=5))
        )
    got = await stats.recent_histograms(db, (0.1, 1.0, 10.0), (0.001, 0.002, 1.0))
    assert got["slow"].pickup_sum == pytest.approx(3.5, abs=1e-6)
    assert got["fast"].pickup_buckets == (1, 2, 3)
    assert got["fast"].pickup_sum == pytest.approx(0.0032, abs=1e-6)
