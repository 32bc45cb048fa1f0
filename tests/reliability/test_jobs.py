"""R4 and R5: a poison job that kills its daemon every time, and handlers that hang past
their timeout, each beside normal jobs that must keep flowing."""

from __future__ import annotations

import asyncio
import time

import pytest
from sqlalchemy import select

from app.db import Database
from app.models import PendingAnalysis
from app.services.queue import DAEMON_GONE_ERROR
from tests.helpers import all_in, enqueue_payloads, task_row
from tests.reliability.harness import Figures, Ledger, Profile
from tests.reliability.invariants import describe
from tests.reliability.ledger import ASYNC_KIND, SYNC_KIND
from tests.reliability.scenarios import Supervise, finish, wait_terminal

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


async def test_poison_job_fails_after_max_retries_plus_one_claims(
    db: Database, supervise: Supervise, ledger: Ledger, profile: Profile, figures: Figures
) -> None:
    [poison] = await enqueue_payloads(db, ASYNC_KIND, [{"sleep": 0.2, "kill": True}], max_retries=3)
    # The poison takes the jobs running beside it down too; they have retries to spare.
    normal = await enqueue_payloads(db, ASYNC_KIND, [{"sleep": 0.05}] * 100, max_retries=10)
    sup = supervise("poison", max_concurrent="4", **profile.settings())
    budget = 4 * (profile.rescue_within + 5)
    assert await wait_terminal(db, 101, budget), sup.log()[-3000:]
    row = await task_row(db, poison)
    assert (row.status, row.attempts) == ("failed", 4)
    # Each restarted daemon finds its predecessor's pid gone and takes the poison back at
    # once (app.services.processor.host), leases or not: the fourth time, for good.
    assert row.error == DAEMON_GONE_ERROR + "; no attempts left"
    assert ledger.starts()[poison] == 4
    assert sup.restarts == 4  # one restart per claim of the poison, none after
    assert await all_in(db, "completed", len(normal))
    # then the daemon stays up
    stay = min(max(3 * profile.lease, 6.0), 30.0)
    await asyncio.sleep(stay)
    assert sup.restarts == 4 and sup.runs[-1].code is None
    figures.values.update(
        claims=row.attempts,
        restarts=sup.restarts,
        stayed_up_seconds=stay,
        collateral_reruns=sum(n - 1 for t, n in ledger.starts().items() if t != poison),
        lost=0,
    )
    violations = await finish(db, ledger, profile, sup)
    assert not violations, describe(violations)


async def test_timeouts_of_async_and_sync_handlers_while_others_flow(
    db: Database, supervise: Supervise, ledger: Ledger, profile: Profile, figures: Figures
) -> None:
    spec = {"timeout_seconds": 1, "max_retries": 0, "priority": 9}
    hung = await enqueue_payloads(db, ASYNC_KIND, [{"hang": True}] * 2, **spec)
    # A thread cannot be stopped: it runs on (abandoned) and its end is never written.
    stuck = await enqueue_payloads(db, SYNC_KIND, [{"hang": 4}] * 2, **spec)
    normal = await enqueue_payloads(db, ASYNC_KIND, [{"sleep": 0.05}] * 60)
    sup = supervise("timeouts", max_concurrent="6", **profile.settings())
    assert await wait_terminal(db, 64, 60)
    async with db.read_transaction() as s:
        rows = {
            r.id: r
            for r in (await s.scalars(select(PendingAnalysis))).all()
            if r.id in hung + stuck + normal
        }
    first_timeout = min(rows[t].completed_at for t in hung + stuck)
    for task_id in hung + stuck:
        row = rows[task_id]
        assert (row.status, row.attempts, row.error) == ("failed", 1, "timed out after 1 s")
        assert (row.completed_at - row.started_at).total_seconds() < 1 + 2
    assert all(rows[t].status == "completed" for t in normal)
    flowed = sum(rows[t].completed_at < first_timeout for t in normal)
    assert flowed > 0  # normal jobs finished while the hung ones held their slots
    # the abandoned threads ran to their end; nothing of theirs was stored
    deadline = time.monotonic() + 10
    while len([e for e in ledger.events() if e.task_id in stuck and e.event == "end"]) < 2:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    assert [(await task_row(db, t)).result for t in stuck] == [None, None]
    figures.values.update(timed_out=len(hung + stuck), completed_beside=flowed, lost=0)
    violations = await finish(db, ledger, profile, sup)
    assert not violations, describe(violations)
    assert "sync handler thread abandoned" in sup.log()
