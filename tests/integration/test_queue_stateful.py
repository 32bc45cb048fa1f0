"""A hypothesis state machine over the queue service; invariants checked after every step."""

from __future__ import annotations

import asyncio
import shutil
from collections import Counter
from collections.abc import Callable, Coroutine
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from sqlalchemy import select

from app.db import Database
from app.models import AnalysisNotification, PendingAnalysis, TaskStatus
from app.models.types import utcnow
from app.services import queue
from tests import pg
from tests.conftest import ENGINES

R = TypeVar("R")
PROCS = ("proc-a", "proc-b")
TERMINAL_NOTES = {"completed", "failed", "cancelled"}
SETTINGS = settings(
    max_examples=25,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


class QueueMachine(RuleBasedStateMachine):
    """Drives the queue functions with a pinned clock; the database is the model's truth."""

    make_url: Callable[[], tuple[str, Callable[[], None]]]

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        url, self.cleanup = self.make_url()
        self.db = Database.from_url(url, pool_size=1)
        self.now: datetime = utcnow()
        self.ids: list[int] = []
        self.holds: list[tuple[int, str, int]] = []  # every (id, processor, attempt) ever claimed
        self.retries: Counter[int] = Counter()

    def run(self, coro: Coroutine[Any, Any, R]) -> R:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        self.run(self.db.dispose())
        self.loop.close()
        self.cleanup()

    async def _row(self, task_id: int) -> PendingAnalysis | None:
        async with self.db.read_transaction() as s:
            return await queue.get_task(s, task_id)

    def row(self, task_id: int) -> tuple[Any, ...] | None:
        r = self.run(self._row(task_id))
        if r is None:
            return None
        return (
            r.status,
            r.locked_by,
            r.attempts,
            r.retry_count,
            r.result,
            r.error,
            r.lease_expires_at,
        )

    def holder(self, task_id: int) -> tuple[str, int] | None:
        r = self.row(task_id)
        return (r[1], r[2]) if r is not None and r[0] == TaskStatus.PROCESSING else None

    # --- rules -------------------------------------------------------------------------------

    @rule(
        user=st.sampled_from(["alice", "bob"]),
        retries=st.integers(0, 2),
        priority=st.integers(1, 10),
    )
    def enqueue(self, user: str, retries: int, priority: int) -> None:
        async def go() -> int:
            async with self.db.write_transaction() as s:
                result = await queue.enqueue_task(
                    s, kind="k", user_id=user, max_retries=retries, priority=priority, now=self.now
                )
                return result.id

        self.ids.append(self.run(go()))

    @rule(k=st.integers(1, 3), proc=st.sampled_from(PROCS))
    def claim(self, k: int, proc: str) -> None:
        async def go() -> list[queue.ClaimedTask]:
            async with self.db.write_transaction() as s:
                return await queue.claim_tasks(
                    s, processor_id=proc, limit=k, lease_seconds=30, now=self.now
                )

        for t in self.run(go()):
            self.holds.append((t.id, proc, t.attempt))

    @rule(
        data=st.data(),
        stale=st.booleans(),
        how=st.sampled_from(["complete", "fail", "fail_permanent", "cancel"]),
    )
    def finish(self, data: st.DataObject, stale: bool, how: str) -> None:
        if not self.holds:
            return
        task_id, proc, attempt = data.draw(st.sampled_from(self.holds))
        if stale:
            proc, attempt = proc + "-old", attempt
        before = self.row(task_id)
        expected = self.holder(task_id) == (proc, attempt)
        applied = self.run(self._finish(how, task_id, proc, attempt))
        assert applied == expected
        if not applied:
            assert self.row(task_id) == before

    async def _finish(self, how: str, task_id: int, proc: str, attempt: int) -> bool:
        fence = {"task_id": task_id, "processor_id": proc, "attempt": attempt, "now": self.now}
        async with self.db.write_transaction() as s:
            if how == "complete":
                return await queue.complete_task(s, **fence, result={"ok": task_id})
            if how == "cancel":
                return await queue.cancel_task(s, **fence)
            outcome = await queue.fail_task(
                s, **fence, error="boom", retry_delay=5, permanent=how == "fail_permanent"
            )
            return outcome is not None

    @rule(proc=st.sampled_from(PROCS))
    def renew(self, proc: str) -> None:
        pairs = [(i, a) for i, p, a in self.holds if p == proc]

        async def go() -> queue.LeaseRenewal:
            async with self.db.write_transaction() as s:
                return await queue.renew_leases(
                    s, processor_id=proc, tasks=pairs, lease_seconds=30, now=self.now
                )

        renewal = self.run(go())
        for task_id in renewal.renewed:
            holder = self.holder(task_id)
            assert holder is not None and holder[0] == proc and (task_id, holder[1]) in pairs

    @rule(proc=st.sampled_from(PROCS))
    def release(self, proc: str) -> None:
        pairs = [(i, a) for i, p, a in self.holds if p == proc]

        async def go() -> None:
            async with self.db.write_transaction() as s:
                await queue.release_tasks(s, processor_id=proc, tasks=pairs)

        self.run(go())

    @rule(data=st.data())
    def user_requests(self, data: st.DataObject) -> None:
        if not self.ids:
            return
        task_id = data.draw(st.sampled_from(self.ids))
        cancel = data.draw(st.booleans())

        async def go() -> None:
            async with self.db.write_transaction() as s:
                if cancel:
                    await queue.request_cancel(s, task_id, now=self.now)
                elif await queue.retry_task(s, task_id, now=self.now) is queue.RetryOutcome.RETRIED:
                    self.retries[task_id] += 1

        self.run(go())

    @rule()
    def rescue(self) -> None:
        async def go() -> None:
            async with self.db.write_transaction() as s:
                await queue.rescue_expired(s, now=self.now)

        self.run(go())

    @rule()
    def prune(self) -> None:
        async def go() -> None:
            async with self.db.write_transaction() as s:
                await queue.prune_finished(s, completed_before=self.now - timedelta(seconds=60))

        self.run(go())
        alive = {i for i in self.ids if self.row(i) is not None}
        self.ids = [i for i in self.ids if i in alive]
        self.holds = [h for h in self.holds if h[0] in alive]
        self.retries = Counter({i: n for i, n in self.retries.items() if i in alive})

    @rule(seconds=st.integers(1, 60))
    def advance_clock(self, seconds: int) -> None:
        self.now += timedelta(seconds=seconds)

    # --- invariants ----------------------------------------------------------------------------

    @invariant()
    def rows_are_consistent(self) -> None:
        async def go() -> None:
            async with self.db.read_transaction() as s:
                tasks = (await s.scalars(select(PendingAnalysis))).all()
                notes = (
                    await s.execute(
                        select(
                            AnalysisNotification.task_id,
                            AnalysisNotification.type,
                            AnalysisNotification.user_id,
                        )
                    )
                ).all()
            by_id = {t.id: t for t in tasks}
            terminal = Counter(task_id for task_id, kind, _ in notes if kind in TERMINAL_NOTES)
            for t in tasks:
                assert t.status in set(TaskStatus)
                assert 0 <= t.attempts <= t.max_retries + 1
                assert 0 <= t.retry_count <= t.max_retries
                held = t.status == TaskStatus.PROCESSING
                assert (t.locked_by is not None, t.lease_expires_at is not None) == (held, held)
                done = t.status in (TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED)
                assert terminal[t.id] == self.retries[t.id] + int(done), (t.id, t.status)
            for task_id, _, user_id in notes:
                assert by_id[task_id].user_id == user_id

        self.run(go())


def _sqlite_factory(template: Path, folder: Path) -> Callable[[], tuple[str, Callable[[], None]]]:
    counter = iter(range(10**6))

    def make() -> tuple[str, Callable[[], None]]:
        path = folder / f"stateful-{next(counter)}.db"
        shutil.copyfile(template, path)
        return f"sqlite+aiosqlite:///{path}", lambda: path.unlink(missing_ok=True)

    return make


def _pg_factory(template: str) -> Callable[[], tuple[str, Callable[[], None]]]:
    def make() -> tuple[str, Callable[[], None]]:
        name = pg.new_name()
        return pg.create_database(name, template=template), lambda: pg.drop_database(name)

    return make


@pytest.mark.parametrize("engine", ENGINES)
def test_queue_state_machine(engine: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    if engine == "sqlite":
        factory = _sqlite_factory(request.getfixturevalue("sqlite_template"), tmp_path)
    else:
        factory = _pg_factory(request.getfixturevalue("pg_template"))
    machine = type("Machine", (QueueMachine,), {"make_url": staticmethod(factory)})
    run_state_machine_as_test(machine, settings=SETTINGS)
