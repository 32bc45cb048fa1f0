"""R10 and R11: the database goes away (PostgreSQL stopped on a throwaway cluster; SQLite
held by another process's exclusive lock) while jobs run, then comes back. The daemon keeps
its pid and does not spin, the API answers 503 (never another 5xx, never a hang), the
outcomes of jobs that finished meanwhile are written after, and new work flows within 10 s.

The lease of these scenarios is longer than the outage: a daemon that cannot renew for a
whole lease stops its jobs unwritten, by design (another daemon may have rescued them)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from app import schema
from app.api.main import API_PREFIX
from app.db import Database, sqlite_path
from tests.e2e.daemon import Api, create_token
from tests.helpers import enqueue_payloads, task_row
from tests.pgcluster import Cluster
from tests.reliability.harness import (
    HANDLER_MODULES,
    Figures,
    Ledger,
    Profile,
    Supervisor,
    count_lines,
    cpu_seconds,
    current_profile,
)
from tests.reliability.invariants import describe
from tests.reliability.ledger import ASYNC_KIND
from tests.reliability.scenarios import finish, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
RESUME_WITHIN = 10.0
JOB_SECONDS = 2.0


async def _outage(
    url: str,
    tmp: Path,
    ledger: Ledger,
    profile: Profile,
    figures: Figures,
    *,
    seconds: float,
    go_away: Callable[[], Awaitable[None]],
    come_back: Callable[[], Awaitable[None]],
    reads_fail: bool,
) -> None:
    db = Database.from_url(url)
    api = Api(url, tmp, handler_modules=HANDLER_MODULES)
    lease = max(profile.lease, 2 * seconds + 5)
    sup = Supervisor(
        url,
        tmp,
        "outage",
        max_concurrent="4",
        extra_env=ledger.env,
        **profile.settings(lease_seconds=lease),
    )
    try:
        await asyncio.to_thread(api.start)
        token = await asyncio.to_thread(create_token, url, "ops", admin=True)
        ids = await enqueue_payloads(db, ASYNC_KIND, [{"sleep": JOB_SECONDS}] * 4)
        sup.start()
        pid = sup.pid
        assert await wait_for(lambda: _open_runs(ledger, pid, 4), within=30), sup.log()
        await db.dispose()
        cpu_before = cpu_seconds(pid)
        down = time.time()
        await go_away()
        codes = await _probe_api(api.base, token, seconds, down, reads_fail)
        remaining = down + seconds - time.time()
        if remaining > 0:
            await asyncio.sleep(remaining)
        cpu = cpu_seconds(pid) - cpu_before
        # WAL readers see through a writer's lock: nothing may have been written yet.
        unwritten = reads_fail or await _all_processing(db, ids)
        up = time.time()
        await come_back()
        assert await wait_for(lambda: _all_completed(db, ids), within=RESUME_WITHIN + 20)
        written = time.time() - up
        [late] = await enqueue_payloads(db, ASYNC_KIND, [{}])
        assert await wait_for(lambda: _all_completed(db, [late]), within=RESUME_WITHIN + 20)
        resumed = time.time() - up
        ready = await _ready_again(api.base, up)
        ends = {e.task_id: e.t for e in ledger.events() if e.event == "end" and e.pid == pid}
        finished_during = [t for t in ids if t in ends and down < ends[t] < up]
        for task_id in ids:
            row = await task_row(db, task_id)
            assert (row.status, row.attempts, row.result["pid"]) == ("completed", 1, pid)
        assert unwritten
        log = sup.log()
        figures.values.update(
            outage_seconds=seconds,
            lease_seconds=lease,
            daemon_cpu_seconds_during=round(cpu, 2),
            api_codes_during=dict(codes),
            http_5xx=sum(n for c, n in codes.items() if c >= 500 and c != 503),
            finished_during_outage=len(finished_during),
            written_after_seconds=round(written, 2),
            recovery_seconds=round(resumed, 2),
            ready_again_seconds=round(ready, 2),
            error_log_lines=count_lines(log, "database error"),
            restarts=sup.restarts,
            lost=0,
        )
        assert sup.restarts == 0 and sup.pid == pid  # the same process throughout
        assert cpu < 0.2 * seconds + 1.0, f"{cpu:.2f} s of CPU during a {seconds} s outage"
        assert codes[503] > 0 and set(codes) <= {503, 200, 202}, codes
        assert len(finished_during) == len(ids)
        assert resumed < RESUME_WITHIN and ready < RESUME_WITHIN
        assert figures.values["error_log_lines"] <= 12 * seconds
        violations = await finish(db, ledger, profile, sup)
        assert not violations, describe(violations)
    finally:
        sup.close()
        await asyncio.to_thread(api.stop)
        await db.dispose()


async def _open_runs(ledger: Ledger, pid: int, n: int) -> bool:
    return len(ledger.open_runs(pid)) == n


async def _all_processing(db: Database, ids: list[int]) -> bool:
    return all([(await task_row(db, t)).status == "processing" for t in ids])


async def _all_completed(db: Database, ids: list[int]) -> bool:
    try:
        return all([(await task_row(db, t)).status == "completed" for t in ids])
    except Exception:
        return False


async def _probe_api(
    base: str, token: str, seconds: float, down: float, reads_fail: bool
) -> dict[int, int]:
    """Ask the API while the database is away: 503 with a JSON detail and Retry-After,
    within seconds. Returns the count of each status code seen."""
    codes: dict[int, int] = {}
    body = {"kind": ASYNC_KIND, "user_id": "ops", "payload": {}}
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as http:
        while time.time() < down + seconds - 1:
            for method, path in (("GET", "/readyz"), ("POST", f"{API_PREFIX}/tasks")):
                if method == "GET" and not reads_fail:
                    continue
                asked = time.monotonic()
                r = await http.request(method, path, json=body if method == "POST" else None)
                took = time.monotonic() - asked
                codes[r.status_code] = codes.get(r.status_code, 0) + 1
                if r.status_code == 503:
                    assert "detail" in r.json() and r.headers["retry-after"], r.text
                assert took < 8, f"{method} {path} took {took:.1f} s"
            await asyncio.sleep(0.5)
    return codes


async def _ready_again(base: str, up: float) -> float:
    async with httpx.AsyncClient(base_url=base, timeout=5) as http:
        while time.time() < up + 60:
            try:
                if (await http.get("/readyz")).status_code == 200:
                    return time.time() - up
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    return float("inf")


@pytest.mark.postgres
@pytest.mark.parametrize("engine_name", ["postgresql"])
@pytest.mark.parametrize("seconds", current_profile().pg_outages, ids=lambda s: f"{s:g}s")
async def test_postgresql_outage(
    cluster: Cluster,
    tmp_path: Path,
    ledger: Ledger,
    profile: Profile,
    figures: Figures,
    engine_name: str,
    seconds: float,
) -> None:
    url = cluster.url()
    await asyncio.to_thread(schema.upgrade, url)
    await _outage(
        url,
        tmp_path,
        ledger,
        profile,
        figures,
        seconds=seconds,
        go_away=lambda: asyncio.to_thread(cluster.stop),
        come_back=lambda: asyncio.to_thread(cluster.start),
        reads_fail=True,
    )


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_sqlite_held_by_another_process(
    database_url: str, tmp_path: Path, ledger: Ledger, profile: Profile, figures: Figures
) -> None:
    path = sqlite_path(database_url)
    locker: subprocess.Popen[bytes] | None = None
    holds = profile.sqlite_lock

    def lock() -> None:
        nonlocal locker
        locker = subprocess.Popen(
            [sys.executable, "-c", _LOCKER, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert locker.stdout is not None and locker.stdout.readline() == b"locked\n"

    def unlock() -> int:
        assert locker is not None
        out, _ = locker.communicate(b"release\n", timeout=30)
        assert out == b"released\n"
        return locker.returncode

    async def go_away() -> None:
        await asyncio.to_thread(lock)

    async def come_back() -> None:
        assert await asyncio.to_thread(unlock) == 0

    await _outage(
        database_url,
        tmp_path,
        ledger,
        profile,
        figures,
        seconds=holds,
        go_away=go_away,
        come_back=come_back,
        reads_fail=False,  # WAL readers are not blocked by a writer
    )


# Another process takes the write lock and holds it until told to let go.
_LOCKER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("ROLLBACK")
print("released", flush=True)
"""


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_sqlite_claim_times_are_taken_after_the_write_lock(
    db: Database, database_url: str
) -> None:
    """Found by this suite: SQLite's clock was bound when a statement was built, before
    BEGIN IMMEDIATE waited for the lock, so a claim that waited committed started_at and
    lease_expires_at from before its wait (a 1 s lease was born expired)."""
    import sqlite3
    import threading

    from app.models.types import utcnow
    from app.services import queue

    await enqueue_payloads(db, ASYNC_KIND, [{}])
    locker = sqlite3.connect(
        str(sqlite_path(database_url)), isolation_level=None, check_same_thread=False
    )
    locker.execute("BEGIN EXCLUSIVE")
    released: list[float] = []

    def release() -> None:
        time.sleep(1.5)
        released.append(time.time())
        locker.execute("ROLLBACK")
        locker.close()

    threading.Thread(target=release).start()
    async with db.write_transaction() as s:  # waits for the lock (busy_timeout is 5 s)
        [task] = await queue.claim_tasks(s, processor_id="p", limit=1, lease_seconds=1.0)
    committed = utcnow()
    row = await task_row(db, task.id)
    assert row.started_at is not None and row.lease_expires_at is not None
    assert row.started_at.timestamp() >= released[0]
    assert row.lease_expires_at > committed  # a 1 s lease must not be born expired
