"""R8 and R17: four daemons on one PostgreSQL database drain thousands of jobs while a client
pages the notification feed through the API with after_id. One run, two verdicts."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from app.api.main import API_PREFIX
from app.db import Database
from app.models import AnalysisNotification, Processor
from tests import pg
from tests.e2e.daemon import Api, create_token
from tests.helpers import enqueue_payloads
from tests.reliability import invariants
from tests.reliability.harness import (
    HANDLER_MODULES,
    Figures,
    Ledger,
    Profile,
    Supervisor,
    count_lines,
)
from tests.reliability.invariants import Violation, describe
from tests.reliability.ledger import ASYNC_KIND
from tests.reliability.scenarios import wait_for, wait_terminal

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.postgres]
DAEMONS = 4
USER = "feed"
DEADLOCK = r"deadlock detected|could not serialize"


@dataclass
class FleetRun:
    jobs: int
    seconds: float = 0.0
    violations: list[Violation] = field(default_factory=list)
    starts_by_pid: Counter[int] = field(default_factory=Counter)
    duplicated: int = 0
    deadlocks: int = 0
    seen: list[int] = field(default_factory=list)
    every: list[int] = field(default_factory=list)
    polls: int = 0
    wall: float = 0.0


@pytest.fixture(scope="module")
def fleet(
    pg_template: str, tmp_path_factory: pytest.TempPathFactory, profile: Profile
) -> Iterator[FleetRun]:
    name = pg.new_name()
    url = pg.create_database(name, template=pg_template)
    tmp = tmp_path_factory.mktemp("fleet")
    try:
        yield pg.run_in_thread(lambda: _run(url, tmp, profile))
    finally:
        pg.drop_database(name)


async def _run(url: str, tmp: Path, profile: Profile) -> FleetRun:
    run = FleetRun(profile.fleet_jobs)
    began = time.monotonic()
    db = Database.from_url(url)
    ledger = Ledger(tmp / "ledger.jsonl")
    api = Api(url, tmp, handler_modules=HANDLER_MODULES)
    sups = [
        Supervisor(
            url, tmp, f"fleet{i}", max_concurrent="16", extra_env=ledger.env, **profile.settings()
        )
        for i in range(DAEMONS)
    ]
    try:
        await asyncio.to_thread(api.start)
        token = await asyncio.to_thread(create_token, url, USER)
        for sup in sups:
            sup.start()
        assert await wait_for(lambda: _running(db), within=60), "the daemons did not start"
        done = asyncio.Event()
        async with httpx.AsyncClient(
            base_url=api.base, headers={"Authorization": f"Bearer {token}"}, timeout=30
        ) as http:
            polling = asyncio.create_task(_poll(http, run, done))
            started = time.monotonic()
            rng = random.Random(17)
            for start in range(0, run.jobs, 250):
                payloads = [
                    {"sleep": 0.1} if rng.random() < 0.1 else {}
                    for _ in range(min(250, run.jobs - start))
                ]
                await enqueue_payloads(db, ASYNC_KIND, payloads, user_id=USER)
                await asyncio.sleep(0.05)
            drained = await wait_terminal(db, run.jobs, run.jobs / 20 + 60)
            run.seconds = round(time.monotonic() - started, 1)
            done.set()
            await asyncio.wait_for(polling, 60)
        stopped = []
        for sup in sups:
            if await asyncio.to_thread(sup.stop, profile.grace + 30) == 0:
                stopped.append(sup.pid)
        run.violations = await invariants.check(
            db, ledger=ledger, lease_seconds=profile.lease, stopped_pids=stopped
        )
        if not drained:
            run.violations.append(Violation("terminal", None, "the fleet did not drain"))
        async with db.read_transaction() as s:
            run.every = list(
                (
                    await s.scalars(
                        select(AnalysisNotification.id)
                        .where(AnalysisNotification.user_id == USER)
                        .order_by(AnalysisNotification.id)
                    )
                ).all()
            )
        starts = ledger.starts()
        run.duplicated = sum(n - 1 for n in starts.values())
        run.starts_by_pid = Counter(e.pid for e in ledger.events() if e.event == "start")
        run.deadlocks = sum(count_lines(s.log() + api.log(), DEADLOCK) for s in sups)
    finally:
        for sup in sups:
            sup.close()
        await asyncio.to_thread(api.stop)
        await db.dispose()
    run.wall = time.monotonic() - began
    return run


async def _running(db: Database) -> bool:
    async with db.read_transaction() as s:
        states = (await s.scalars(select(Processor.state))).all()
    return list(states).count("running") == DAEMONS


async def _poll(http: httpx.AsyncClient, run: FleetRun, done: asyncio.Event) -> None:
    """Page forward from the largest id seen; stop at the first empty page after done."""
    while True:
        finished = done.is_set()
        after = run.seen[-1] if run.seen else 0
        r = await http.get(f"{API_PREFIX}/notifications", params={"after_id": after, "limit": 200})
        r.raise_for_status()
        run.polls += 1
        items = r.json()["items"]
        run.seen.extend(item["id"] for item in items)
        if finished and not items:
            return
        if len(items) < 200:
            await asyncio.sleep(0.05)


def test_four_postgres_daemons_share_the_work_without_duplicates(
    fleet: FleetRun, figures: Figures
) -> None:
    figures.engine = "postgresql"
    figures.started -= fleet.wall  # the run happened in the fixture, before this test
    shares = sorted(fleet.starts_by_pid.values())
    figures.values.update(
        jobs=fleet.jobs,
        daemons=DAEMONS,
        seconds_to_drain=fleet.seconds,
        jobs_per_second=round(fleet.jobs / fleet.seconds),
        duplicated=fleet.duplicated,
        lost=sum(v.rule == "terminal" for v in fleet.violations),
        smallest_share=round(shares[0] / fleet.jobs, 3) if shares else 0,
        deadlocks=fleet.deadlocks,
    )
    assert not fleet.violations, describe(fleet.violations)
    assert fleet.duplicated == 0
    assert sum(shares) == fleet.jobs and len(shares) == DAEMONS
    # Each daemon did a real share: none starved. A fair share (25 %) is not promised; who
    # wins a claim race depends on scheduling, and on a loaded 2-core machine one daemon
    # took 49 % and another 8.6 % of a 3,000-job run (alone: 16-29 % each).
    assert shares[0] >= fleet.jobs * 0.05, shares
    assert fleet.deadlocks == 0


def test_notification_feed_with_four_daemons_skips_and_repeats_nothing(
    fleet: FleetRun, figures: Figures
) -> None:
    figures.engine = "postgresql"
    skipped = sorted(set(fleet.every) - set(fleet.seen))
    repeated = len(fleet.seen) - len(set(fleet.seen))
    figures.values.update(
        notifications=len(fleet.every), polls=fleet.polls, skipped=len(skipped), repeated=repeated
    )
    assert len(fleet.every) >= 2 * fleet.jobs  # started + completed for each job
    assert skipped == [] and repeated == 0
    assert fleet.seen == fleet.every  # in order, too
