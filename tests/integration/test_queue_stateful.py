"""A hypothesis state machine over the queue service, on SQLite and on PostgreSQL.

Hypothesis rules are synchronous, so the machine owns an event loop and drives the async
queue functions with ``run_until_complete``; each example gets a fresh copy of the migrated
template database. The clock is the model's: every function that accepts ``now=`` gets it,
and it only moves forward. The database is read back with plain SELECTs after every step
and checked against the model (expected notifications per task and type, how many times
each task entered a terminal state, the retries it was given) and against invariants that
hold whatever happened.
"""

from __future__ import annotations

import asyncio
import shutil
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import select

from app.db import Database
from app.models import AnalysisNotification, PendingAnalysis, TaskStatus
from app.models.types import utcnow
from app.services import queue
from app.services.queue import CancelOutcome, FailOutcome, RetryOutcome
from tests import pg
from tests.conftest import ENGINES

R = TypeVar("R")
T = PendingAnalysis
N = AnalysisNotification
PROCS = ("proc-a", "proc-b")
LEASE = 30
RETRY_DELAY = 5
SNOOZE = 7
TERMINAL = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED})
TERMINAL_NOTES = frozenset({"completed", "failed", "cancelled"})
COLUMNS = tuple(c.key for c in T.__table__.columns)
STALE_WRITES = st.sampled_from(
    ["complete", "fail", "fail_permanent", "cancel", "snooze", "progress", "renew", "release"]
)
# (user, max_retries, priority, seconds until due)
TaskSpecArgs = tuple[str | None, int, int, int]
TASK_SPECS = st.tuples(
    st.sampled_from(["alice", "bob", None]),
    st.integers(0, 2),
    st.integers(1, 10),
    st.sampled_from([0, 0, 0, 20]),
)
UrlFactory = Callable[[], tuple[str, Callable[[], None]]]

SETTINGS = settings(
    max_examples=25,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@dataclass(frozen=True)
class Snapshot:
    """Every task row (as a dict of columns) and every notification, read plainly."""

    tasks: dict[int, dict[str, Any]]
    notes: list[tuple[int, int, str, str | None]]  # (id, task_id, type, user_id)

    def notes_of(self, task_id: int) -> list[tuple[int, int, str, str | None]]:
        return [n for n in self.notes if n[1] == task_id]

    def holder(self, task_id: int) -> tuple[str, int] | None:
        row = self.tasks.get(task_id)
        if row is None or row["status"] != TaskStatus.PROCESSING:
            return None
        return row["locked_by"], row["attempts"]

    def with_status(self, *statuses: str) -> list[int]:
        return sorted(i for i, r in self.tasks.items() if r["status"] in statuses)


class QueueMachine(RuleBasedStateMachine):
    """Drives the queue functions with a pinned clock; the database is checked after each
    step against the model's expectations."""

    make_url: ClassVar[UrlFactory]

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        url, self.cleanup = type(self).make_url()
        self.db = Database.from_url(url, pool_size=1)
        self.now: datetime = utcnow()
        self.holds: list[tuple[int, str, int]] = []  # every (id, processor, attempt) claimed
        self.expected_notes: Counter[tuple[int, str]] = Counter()  # (task_id, type) -> count
        self.retries: Counter[int] = Counter()  # manual retries per task
        self.terminal_entries: Counter[int] = Counter()  # times each task became terminal
        self.last_status: dict[int, str] = {}
        self._snapshot: Snapshot | None = None  # valid until the next write

    def run(self, coro: Coroutine[Any, Any, R]) -> R:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        try:
            self.run(self.db.dispose())
        finally:
            self.loop.close()
            self.cleanup()

    def write(self, fn: Callable[[Any], Coroutine[Any, Any, R]]) -> R:
        """Run ``fn(session)`` in one write transaction."""

        async def go() -> R:
            async with self.db.write_transaction() as s:
                return await fn(s)

        self._snapshot = None
        return self.run(go())

    def snapshot(self) -> Snapshot:
        """The database as it is now (read again after every write)."""
        if self._snapshot is None:
            self._snapshot = self._read()
        return self._snapshot

    def _read(self) -> Snapshot:
        async def go() -> Snapshot:
            async with self.db.read_transaction() as s:
                rows = (await s.execute(select(*(getattr(T, c) for c in COLUMNS)))).all()
                notes = (
                    await s.execute(select(N.id, N.task_id, N.type, N.user_id).order_by(N.id))
                ).all()
            return Snapshot(
                {r.id: dict(zip(COLUMNS, r, strict=True)) for r in rows},
                [(n.id, n.task_id, n.type, n.user_id) for n in notes],
            )

        return self.run(go())

    def running(self) -> list[int]:
        """Ids of the processing tasks."""
        return self.snapshot().with_status(TaskStatus.PROCESSING)

    def fence(self, task_id: int, proc: str, attempt: int) -> dict[str, Any]:
        return {"task_id": task_id, "processor_id": proc, "attempt": attempt}

    # --- rules -------------------------------------------------------------------------------

    @initialize(
        specs=st.lists(TASK_SPECS, min_size=1, max_size=4),
        k=st.integers(0, 3),
        proc=st.sampled_from(PROCS),
    )
    def start_with_some_tasks(self, specs: list[TaskSpecArgs], k: int, proc: str) -> None:
        for spec in specs:
            self.enqueue(*spec)
        self.claim(k, proc)

    @rule(spec=TASK_SPECS)
    def enqueue_one(self, spec: TaskSpecArgs) -> None:
        self.enqueue(*spec)

    def enqueue(self, user: str | None, retries: int, priority: int, delay: int) -> None:
        scheduled = self.now + timedelta(seconds=delay)
        created = self.write(
            lambda s: queue.enqueue_task(
                s,
                kind="k",
                user_id=user,
                max_retries=retries,
                priority=priority,
                scheduled_at=scheduled,
                now=self.now,
            )
        )
        row = self.snapshot().tasks[created.id]
        assert created.created
        assert (row["status"], row["attempts"], row["retry_count"]) == ("pending", 0, 0)
        assert (row["scheduled_at"], row["created_at"]) == (scheduled, self.now)
        assert (row["user_id"], row["max_retries"], row["priority"]) == (user, retries, priority)

    @rule(k=st.integers(1, 3), proc=st.sampled_from(PROCS))
    def claim_some(self, k: int, proc: str) -> None:
        self.claim(k, proc)

    def claim(self, k: int, proc: str) -> None:
        if k == 0:
            return
        before = self.snapshot()
        due = [
            r
            for r in before.tasks.values()
            if r["status"] == TaskStatus.PENDING and r["scheduled_at"] <= self.now
        ]
        due.sort(key=lambda r: (-r["priority"], r["scheduled_at"], r["id"]))
        claimed = self.write(
            lambda s: queue.claim_tasks(
                s, processor_id=proc, limit=k, lease_seconds=LEASE, now=self.now
            )
        )
        # highest priority first, then oldest schedule, then id; never a task not due
        assert [t.id for t in claimed] == [r["id"] for r in due[:k]]
        after = self.snapshot()
        for t in claimed:
            row = after.tasks[t.id]
            assert t.attempt == before.tasks[t.id]["attempts"] + 1 == row["attempts"]
            assert (row["status"], row["locked_by"]) == ("processing", proc)
            assert row["lease_expires_at"] == self.now + timedelta(seconds=LEASE)
            assert row["started_at"] == self.now
            self.holds.append((t.id, proc, t.attempt))
            self.expected_notes[t.id, "started"] += 1

    @precondition(lambda self: self.running())
    @rule(
        data=st.data(),
        how=st.sampled_from(["complete", "fail", "fail_permanent", "cancel", "snooze"]),
    )
    def write_as_holder(self, data: st.DataObject, how: str) -> None:
        """The daemon that holds a job finishes it (or snoozes it): the write applies."""
        before = self.snapshot()
        task_id = data.draw(st.sampled_from(self.running()), label="task")
        proc, attempt = before.holder(task_id) or ("", 0)
        old = before.tasks[task_id]
        applied = self.run(self._fenced_write(how, self.fence(task_id, proc, attempt)))
        row = self.snapshot().tasks[task_id]
        assert row["locked_by"] is None and row["lease_expires_at"] is None
        if how == "complete":
            assert applied is True
            assert (row["status"], row["result"]) == ("completed", {"ok": task_id})
            self.expected_notes[task_id, "completed"] += 1
        elif how == "cancel":
            assert applied is True and row["status"] == "cancelled"
            self.expected_notes[task_id, "cancelled"] += 1
        elif how == "snooze" and old["cancel_requested"]:
            assert applied is True
            assert (row["status"], row["attempts"]) == ("cancelled", attempt)
            self.expected_notes[task_id, "cancelled"] += 1
        elif how == "snooze":
            assert applied is True
            assert (row["status"], row["attempts"], row["retry_count"]) == (
                "pending",
                attempt - 1,
                old["retry_count"],
            )
            assert row["scheduled_at"] == self.now + timedelta(seconds=SNOOZE)
        elif how == "fail" and old["retry_count"] < old["max_retries"] and old["cancel_requested"]:
            # a cancel was requested: the failure is not retried
            assert applied is FailOutcome.CANCELLED
            assert (row["status"], row["retry_count"], row["error"]) == (
                "cancelled",
                old["retry_count"],
                "boom",
            )
            self.expected_notes[task_id, "cancelled"] += 1
        elif how == "fail" and old["retry_count"] < old["max_retries"]:
            assert applied is FailOutcome.RETRYING
            assert (row["status"], row["retry_count"], row["error"]) == (
                "pending",
                old["retry_count"] + 1,
                "boom",
            )
            assert row["scheduled_at"] == self.now + timedelta(seconds=RETRY_DELAY)
            self.expected_notes[task_id, "retrying"] += 1
        else:  # out of retries, or a permanent error
            assert applied is FailOutcome.FAILED
            assert (row["status"], row["retry_count"]) == ("failed", old["retry_count"])
            self.expected_notes[task_id, "failed"] += 1

    @precondition(lambda self: self.running())
    @rule(
        data=st.data(),
        how=STALE_WRITES,
        variant=st.sampled_from(["other_processor", "old_attempt"]),
    )
    def write_as_stale_holder(self, data: st.DataObject, how: str, variant: str) -> None:
        """Another processor, or the holder with an older attempt, writes about a running
        job: the fence rejects it and nothing changes."""
        task_id = data.draw(st.sampled_from(self.running()), label="task")
        proc, attempt = self.snapshot().holder(task_id) or ("", 0)
        if variant == "other_processor":
            stale = (PROCS[1] if proc == PROCS[0] else PROCS[0], attempt)
        else:
            stale = (proc, attempt - 1)
        self.assert_fenced_out(how, task_id, stale)

    @precondition(lambda self: self.holds)
    @rule(data=st.data(), how=STALE_WRITES)
    def write_with_an_earlier_hold(self, data: st.DataObject, how: str) -> None:
        """A processor writes with a hold it had on a job earlier (since rescued, finished,
        released, retried …): the fence rejects it and nothing changes."""
        snap = self.snapshot()
        earlier = sorted({h for h in self.holds if snap.holder(h[0]) != (h[1], h[2])})
        if not earlier:
            return
        task_id, proc, attempt = data.draw(st.sampled_from(earlier), label="hold")
        self.assert_fenced_out(how, task_id, (proc, attempt))

    def assert_fenced_out(self, how: str, task_id: int, stale: tuple[str, int]) -> None:
        before = self.snapshot()
        holder = before.holder(task_id)
        assert stale != holder
        applied = self.run(self._fenced_write(how, self.fence(task_id, *stale)))
        assert not applied, (how, stale, holder)
        after = self.snapshot()
        assert after.tasks[task_id] == before.tasks[task_id]
        assert after.notes_of(task_id) == before.notes_of(task_id)

    async def _fenced_write(self, how: str, fence: dict[str, Any]) -> Any:
        self._snapshot = None
        async with self.db.write_transaction() as s:
            if how == "complete":
                return await queue.complete_task(
                    s, **fence, result={"ok": fence["task_id"]}, now=self.now
                )
            if how == "cancel":
                return await queue.cancel_task(s, **fence, now=self.now)
            if how == "snooze":
                return await queue.snooze_task(s, **fence, seconds=SNOOZE, now=self.now)
            if how == "progress":
                return await queue.update_progress(s, **fence, current=1, total=2, notify=True)
            pair = [(fence["task_id"], fence["attempt"])]
            if how == "renew":
                renewal = await queue.renew_leases(
                    s,
                    processor_id=fence["processor_id"],
                    tasks=pair,
                    lease_seconds=LEASE,
                    now=self.now,
                )
                return renewal.renewed
            if how == "release":
                return await queue.release_tasks(s, processor_id=fence["processor_id"], tasks=pair)
            return await queue.fail_task(
                s,
                **fence,
                error="boom",
                retry_delay=RETRY_DELAY,
                permanent=how == "fail_permanent",
                now=self.now,
            )

    def pairs_of(self, data: st.DataObject, proc: str) -> list[tuple[int, int]]:
        """Some of the (id, attempt) pairs ``proc`` ever held, and older attempts of the
        ones it holds now: current and stale pairs mixed."""
        snap = self.snapshot()
        current = {(i, h[1]) for i in self.running() if (h := snap.holder(i)) and h[0] == proc}
        every = sorted(
            {(i, a) for i, p, a in self.holds if p == proc} | {(i, a - 1) for i, a in current}
        )
        if not every:
            return []
        return data.draw(st.lists(st.sampled_from(every), unique=True), label="pairs")

    @precondition(lambda self: self.holds)
    @rule(data=st.data(), proc=st.sampled_from(PROCS))
    def renew(self, data: st.DataObject, proc: str) -> None:
        """Renew pairs this processor held: only the ones it still holds apply."""
        pairs = self.pairs_of(data, proc)
        before = self.snapshot()
        renewal = self.write(
            lambda s: queue.renew_leases(
                s, processor_id=proc, tasks=pairs, lease_seconds=LEASE, now=self.now
            )
        )
        held = {i for i, a in pairs if before.holder(i) == (proc, a)}
        assert renewal.renewed == held
        assert renewal.cancel_requested == {i for i in held if before.tasks[i]["cancel_requested"]}
        after = self.snapshot()
        for task_id, row in before.tasks.items():
            if task_id in held:
                assert after.tasks[task_id] == {
                    **row,
                    "lease_expires_at": self.now + timedelta(seconds=LEASE),
                }
            else:
                assert after.tasks[task_id] == row

    @precondition(lambda self: self.holds)
    @rule(data=st.data(), proc=st.sampled_from(PROCS))
    def release(self, data: st.DataObject, proc: str) -> None:
        """Shutdown: held jobs go back to pending uncharged (cancelled when requested)."""
        pairs = self.pairs_of(data, proc)
        before = self.snapshot()
        released = self.write(lambda s: queue.release_tasks(s, processor_id=proc, tasks=pairs))
        held = {i for i, a in pairs if before.holder(i) == (proc, a)}
        assert released == len(held)
        after = self.snapshot()
        for task_id in held:
            old, row = before.tasks[task_id], after.tasks[task_id]
            cancel = old["cancel_requested"]
            assert row["status"] == ("cancelled" if cancel else "pending")
            assert (row["attempts"], row["retry_count"]) == (
                old["attempts"] - 1,
                old["retry_count"],
            )
            if cancel:
                self.expected_notes[task_id, "cancelled"] += 1

    @rule(data=st.data())
    def request_cancel(self, data: st.DataObject) -> None:
        before = self.snapshot()
        task_id = data.draw(st.sampled_from([*before.tasks, 10**9]), label="task")
        outcome = self.write(lambda s: queue.request_cancel(s, task_id, now=self.now))
        old = before.tasks.get(task_id)
        row = self.snapshot().tasks.get(task_id)
        if old is None:
            assert outcome is CancelOutcome.NOT_FOUND
        elif old["status"] == TaskStatus.PENDING:
            assert outcome is CancelOutcome.CANCELLED and row is not None
            assert (row["status"], row["completed_at"]) == ("cancelled", self.now)
            self.expected_notes[task_id, "cancelled"] += 1
        elif old["status"] == TaskStatus.PROCESSING:
            assert outcome is CancelOutcome.REQUESTED and row is not None
            assert (row["status"], row["cancel_requested"]) == ("processing", True)
        else:
            assert outcome is CancelOutcome.FINISHED and row == old

    @rule(data=st.data())
    def retry(self, data: st.DataObject) -> None:
        """A manual retry re-opens a failed or cancelled task with a fresh budget."""
        before = self.snapshot()
        task_id = data.draw(st.sampled_from([*before.tasks, 10**9]), label="task")
        outcome = self.write(lambda s: queue.retry_task(s, task_id, now=self.now))
        old = before.tasks.get(task_id)
        row = self.snapshot().tasks.get(task_id)
        if old is None:
            assert outcome is RetryOutcome.NOT_FOUND
        elif old["status"] in (TaskStatus.FAILED, TaskStatus.CANCELLED):
            assert outcome is RetryOutcome.RETRIED and row is not None
            assert (row["status"], row["attempts"], row["retry_count"]) == ("pending", 0, 0)
            assert (row["scheduled_at"], row["completed_at"], row["error"]) == (
                self.now,
                None,
                None,
            )
            assert row["cancel_requested"] is False
            self.retries[task_id] += 1
        else:
            assert outcome is RetryOutcome.NOT_RETRYABLE and row == old

    @rule()
    def rescue_expired(self) -> None:
        before = self.snapshot()
        result = self.write(lambda s: queue.rescue_expired(s, now=self.now))
        expired = {
            i: r
            for i, r in before.tasks.items()
            if r["status"] == TaskStatus.PROCESSING and r["lease_expires_at"] < self.now
        }
        cancelled = {i for i, r in expired.items() if r["cancel_requested"]}
        spent = {i for i, r in expired.items() if r["attempts"] >= r["max_retries"] + 1} - cancelled
        assert set(result.cancelled) == cancelled
        assert set(result.failed) == spent
        assert set(result.rescued) == set(expired) - cancelled - spent
        after = self.snapshot()
        for task_id in result.rescued:
            old, row = before.tasks[task_id], after.tasks[task_id]
            assert (row["status"], row["retry_count"]) == ("pending", old["retry_count"] + 1)
            self.expected_notes[task_id, "retrying"] += 1
        for task_id in result.failed:
            assert after.tasks[task_id]["status"] == "failed"
            self.expected_notes[task_id, "failed"] += 1
        for task_id in result.cancelled:
            assert after.tasks[task_id]["status"] == "cancelled"
            self.expected_notes[task_id, "cancelled"] += 1
        for task_id in set(before.tasks) - set(expired):
            assert after.tasks[task_id] == before.tasks[task_id]

    @rule(age=st.sampled_from([0, 30, 120]))
    def prune_finished(self, age: int) -> None:
        before = self.snapshot()
        cutoff = self.now - timedelta(seconds=age)
        doomed = {
            i
            for i, r in before.tasks.items()
            if r["status"] in TERMINAL and r["completed_at"] < cutoff
        }
        pruned = self.write(lambda s: queue.prune_finished(s, completed_before=cutoff))
        assert pruned == len(doomed)
        after = self.snapshot()
        assert set(after.tasks) == set(before.tasks) - doomed
        assert not {n[1] for n in after.notes} & doomed  # notifications went with them
        self.holds = [h for h in self.holds if h[0] not in doomed]
        for counter in (self.retries, self.terminal_entries):
            for task_id in doomed:
                counter.pop(task_id, None)
        for key in [k for k in self.expected_notes if k[0] in doomed]:
            del self.expected_notes[key]

    @rule(seconds=st.sampled_from([1, 5, 10, 31, 60]))
    def advance_clock(self, seconds: int) -> None:
        self.now += timedelta(seconds=seconds)

    # --- invariants ----------------------------------------------------------------------------

    @invariant()
    def database_matches_the_model(self) -> None:
        snap = self.snapshot()
        for task_id, t in snap.tasks.items():
            status = t["status"]
            assert status in set(TaskStatus), t
            assert 0 <= t["attempts"] <= t["max_retries"] + 1, t
            assert 0 <= t["retry_count"] <= t["max_retries"], t
            held = status == TaskStatus.PROCESSING
            assert (t["locked_by"] is not None) == held, t
            assert (t["lease_expires_at"] is not None) == held, t
            assert (t["completed_at"] is not None) == (status in TERMINAL), t
            # attempts counts claims; retry_count the ones charged (release/snooze are not)
            if status == TaskStatus.PENDING:
                assert t["attempts"] == t["retry_count"], t
            elif held:
                assert t["attempts"] == t["retry_count"] + 1 and t["started_at"], t
            else:
                assert t["retry_count"] <= t["attempts"] <= t["retry_count"] + 1, t
            # a task enters a terminal state only from a non-terminal one
            previous = self.last_status.get(task_id, TaskStatus.PENDING)
            if status in TERMINAL and previous not in TERMINAL:
                self.terminal_entries[task_id] += 1
        self.last_status = {i: t["status"] for i, t in snap.tasks.items()}

        actual = Counter((task_id, kind) for _, task_id, kind, _ in snap.notes)
        assert actual == +self.expected_notes
        for task_id, t in snap.tasks.items():
            # one terminal notification each time the task reached a terminal state; a
            # manual retry re-opens it, so earlier ones stay
            terminal_notes = sum(actual[task_id, kind] for kind in TERMINAL_NOTES)
            assert terminal_notes == self.terminal_entries[task_id], (task_id, t["status"])
            done = int(t["status"] in TERMINAL)
            assert self.terminal_entries[task_id] == self.retries[task_id] + done, task_id
        for _, task_id, _, user_id in snap.notes:
            assert snap.tasks[task_id]["user_id"] == user_id


def _sqlite_factory(template: Path, folder: Path) -> UrlFactory:
    counter = iter(range(10**6))

    def make() -> tuple[str, Callable[[], None]]:
        path = folder / f"stateful-{next(counter)}.db"
        shutil.copyfile(template, path)

        def cleanup() -> None:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)

        return f"sqlite+aiosqlite:///{path}", cleanup

    return make


def _pg_factory(template: str, created: list[str]) -> UrlFactory:
    def make() -> tuple[str, Callable[[], None]]:
        name = pg.new_name()
        created.append(name)
        # Dropped together at the end: a DROP between two CREATE … TEMPLATE makes each
        # CREATE's checkpoint slower (0.3 s instead of 0.1 s per example).
        return pg.create_database(name, template=template), lambda: None

    return make


@pytest.mark.parametrize("engine", ENGINES)
def test_queue_state_machine(engine: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    created: list[str] = []
    if engine == "sqlite":
        factory = _sqlite_factory(request.getfixturevalue("sqlite_template"), tmp_path)
    else:
        factory = _pg_factory(request.getfixturevalue("pg_template"), created)
    machine = type(
        "QueueMachineOn" + engine.title(), (QueueMachine,), {"make_url": staticmethod(factory)}
    )
    try:
        run_state_machine_as_test(machine, settings=SETTINGS)
    finally:
        for name in created:
            pg.drop_database(name)
