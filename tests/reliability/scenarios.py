"""Scenarios as functions, so that a test and its seeded-bug twin run the same code: the test
asserts no violation, the twin asserts the violation its bug must cause."""

from __future__ import annotations

import asyncio
import random
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select, text

from app.api.main import API_PREFIX
from app.db import Database, sqlite_path
from app.models import Processor
from app.models.types import utcnow
from tests.e2e.daemon import Api, create_token
from tests.helpers import enqueue_payloads, statuses, task_row
from tests.reliability import invariants
from tests.reliability.harness import (
    FAULT_ENV,
    HANDLER_MODULES,
    Ledger,
    Profile,
    Supervisor,
    busy_errors,
    count_terminal,
    held_by,
)
from tests.reliability.harness import (
    Event as LedgerEvent,
)
from tests.reliability.invariants import Violation
from tests.reliability.ledger import ASYNC_KIND, SYNC_KIND

Supervise = Callable[..., Supervisor]


@dataclass
class Result:
    """What a scenario found: invariant violations plus its own figures."""

    violations: list[Violation] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)


async def wait_terminal(db: Database, n: int, within: float) -> bool:
    """Poll until ``n`` tasks ended; False when ``within`` seconds passed first."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await count_terminal(db) >= n:
            return True
        await asyncio.sleep(0.2)
    return await count_terminal(db) >= n


async def wait_for(check: Callable[[], Any], within: float, interval: float = 0.05) -> Any:
    """Poll an async ``check`` until truthy; its last value (falsy when time ran out)."""
    deadline = time.monotonic() + within
    while True:
        value = await check()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(interval)


async def finish(
    db: Database, ledger: Ledger, profile: Profile, *supervisors: Supervisor
) -> list[Violation]:
    """Stop the daemons gracefully, then run the invariant checker."""
    stopped = []
    for sup in supervisors:
        code = await asyncio.to_thread(sup.stop, profile.grace + 30)
        if code == 0:
            stopped.append(sup.pid)
        else:
            tail = "\n".join(sup.log().splitlines()[-20:])
            return [Violation("exit", None, f"{sup.name} exited {code} on SIGTERM:\n{tail}")]
    return await invariants.check(
        db, ledger=ledger, lease_seconds=profile.lease, stopped_pids=stopped
    )


@dataclass
class Deaths:
    """The daemon's deaths, each with the jobs it interrupted: held in the database by the
    dead daemon, or started there without ending. Only those may run again."""

    log: list[tuple[float, int, set[int]]] = field(default_factory=list)

    async def record(self, db: Database, ledger: Ledger, pid: int, at: float) -> set[int]:
        hit = await held_by(db, pid) | ledger.open_runs(pid)
        self.log.append((at, pid, hit))
        return hit

    def duplicated(self, ledger: Ledger) -> dict[int, int]:
        """Runs of a job beyond one plus one per death that interrupted it."""
        allowed = Counter(t for _, _, hit in self.log for t in hit)
        return {t: n - 1 - allowed[t] for t, n in ledger.starts().items() if n - 1 > allowed[t]}

    def violations(self, ledger: Ledger) -> list[Violation]:
        return [
            Violation("duplicated", t, f"{extra} run(s) beyond the deaths it was in flight at")
            for t, extra in self.duplicated(ledger).items()
        ]

    def recovery(self, ledger: Ledger) -> float | None:
        """The longest time from a death until every job it interrupted started again."""
        times = [_recovery(ledger, at, pid, hit) for at, pid, hit in self.log if hit]
        if any(t is None for t in times):
            return None
        return max((t for t in times if t is not None), default=None)

    def figures(self, ledger: Ledger, jobs: int, completed: int) -> dict[str, Any]:
        return {
            "jobs": jobs,
            "kills": len(self.log),
            "lost": jobs - completed,
            "duplicated": sum(self.duplicated(ledger).values()),
            "reruns_after_kills": sum(n - 1 for n in ledger.starts().values()),
            "in_flight_at_kills": sum(len(hit) for _, _, hit in self.log),
            "most_in_flight_at_a_kill": max((len(hit) for _, _, hit in self.log), default=0),
            "recovery_seconds": self.recovery(ledger),
        }


CHAOS_CONCURRENCY = 16


def chaos_recovery_bound(profile: Profile, most_in_flight: int) -> float:
    """How long after a kill every job it interrupted may take to START again: rescued
    (``rescue_within``), then a slot each, behind the restarted daemon's own work: one
    longest job per round of ``CHAOS_CONCURRENCY`` (the daemon holds more than its slots:
    it claims ahead)."""
    rounds = -(-most_in_flight // CHAOS_CONCURRENCY)  # ceiling
    return profile.rescue_within + rounds * profile.chaos_sleep[1]


async def chaos(
    db: Database,
    supervise: Supervise,
    ledger: Ledger,
    profile: Profile,
    *,
    jobs: int,
    kills: int,
    seed: int = 8,
    extra_env: dict[str, str] | None = None,
    settle_within: float | None = None,
) -> Result:
    """R1: ``jobs`` ledger jobs, the supervised daemon SIGKILLed ``kills`` times at random
    instants while it holds jobs. Lost: not completed. Duplicated: a run beyond one per
    kill the job was in flight at."""
    rng = random.Random(seed)
    lo, hi = profile.chaos_sleep
    payloads = [{"sleep": round(rng.uniform(lo, hi), 3)} for _ in range(jobs)]
    ids = await enqueue_payloads(db, ASYNC_KIND, payloads, max_retries=10)
    sup = supervise(
        "chaos",
        max_concurrent=str(CHAOS_CONCURRENCY),
        extra_env=extra_env or {},
        **profile.settings(),
    )
    deaths = Deaths()
    for k in range(kills):
        run = await asyncio.to_thread(sup.wait_for_run, k)
        if not await wait_for(lambda pid=run.pid: held_by(db, pid), within=30):  # type: ignore[misc]
            break
        await asyncio.sleep(rng.uniform(*profile.kill_gap))
        at = time.time()
        await asyncio.to_thread(sup.kill)
        await deaths.record(db, ledger, run.pid, at)
    settle = settle_within or profile.rescue_within * 3 + jobs * hi / 8 + 30
    await wait_terminal(db, len(ids), settle)
    violations = await finish(db, ledger, profile, sup) + deaths.violations(ledger)
    completed = (await statuses(db))["completed"]
    figures = deaths.figures(ledger, jobs, completed)
    figures["max_restart_gap_seconds"] = round(max(sup.restart_gaps(), default=0.0), 3)
    return Result(violations, figures)


def _recovery(ledger: Ledger, at: float, pid: int, hit: set[int]) -> float | None:
    """Seconds from a death until every job it interrupted had started again (None when
    some never did)."""
    events = ledger.events()
    # A job whose latest run before the death had ended was not interrupted by it: under
    # load its lease expired, and the daemon's own rescuer ran it again and finished it
    # before the kill (the first run stopped without an end). Nothing to recover.
    hit = {t for t in hit if _open_at(events, t, at)}
    again: dict[int, float] = {}
    for e in events:
        if e.event == "start" and e.task_id in hit and e.pid != pid and e.t > at:
            again.setdefault(e.task_id, e.t - at)
    return round(max(again.values(), default=0.0), 2) if len(again) == len(hit) else None


def _open_at(events: list[LedgerEvent], task_id: int, at: float) -> bool:
    """Whether ``task_id``'s latest run started before ``at`` had not ended (or none had
    started: claimed, not yet run)."""
    starts = [e for e in events if e.task_id == task_id and e.event == "start" and e.t <= at]
    if not starts:
        return True
    last = starts[-1]
    return not any(
        e.task_id == task_id and e.event == "end" and (e.attempt, e.pid) == (last.attempt, last.pid)
        for e in events
    )


# The order a job meets them; the heartbeat's point comes last (it needs a lease/3).
FAULT_POINTS = (
    "after_claim_commit",
    "before_handler",
    "after_handler_before_complete",
    "inside_complete_txn",
    "after_complete_commit",
    "inside_heartbeat_txn",
)


async def fault_points(
    db: Database, supervise: Supervise, ledger: Ledger, profile: Profile, *, jobs: int = 60
) -> Result:
    """R2: the supervised daemon's i-th life SIGKILLs itself at the i-th named fault point
    (its first pass there); the life after the last runs clean and drains the rest."""
    ids = await enqueue_payloads(db, ASYNC_KIND, [{"sleep": 0.3}] * jobs, max_retries=10)

    def env_for_run(i: int) -> dict[str, str]:
        return {FAULT_ENV: FAULT_POINTS[i]} if i < len(FAULT_POINTS) else {}

    sup = supervise("faults", max_concurrent="4", env_for_run=env_for_run, **profile.settings())
    deaths = Deaths()
    codes = []
    for i in range(len(FAULT_POINTS)):
        run = await asyncio.to_thread(sup.wait_for_run, i)
        codes.append(await asyncio.to_thread(sup.wait_for_exit, run, 60))
        await deaths.record(db, ledger, run.pid, time.time())
    await wait_terminal(db, len(ids), profile.rescue_within * 3 + 60)
    violations = await finish(db, ledger, profile, sup) + deaths.violations(ledger)
    log = sup.log()
    for point, code in zip(FAULT_POINTS, codes, strict=True):
        if code != -signal.SIGKILL or f"fault point {point} reached" not in log:
            violations.append(Violation("fault_point", None, f"{point}: exit {code}, not hit"))
    completed = (await statuses(db))["completed"]
    return Result(violations, deaths.figures(ledger, jobs, completed))


async def stale_daemon(
    db: Database,
    supervise: Supervise,
    ledger: Ledger,
    profile: Profile,
    *,
    extra_env: dict[str, str] | None = None,
) -> Result:
    """R6: daemon A is frozen (SIGSTOP) in the middle of a job, between transactions, for
    longer than its lease; daemon B rescues and completes the job; A is thawed (SIGCONT)
    and must change nothing: the tables are compared before and after."""
    env = extra_env or {}
    [task_id] = await enqueue_payloads(db, ASYNC_KIND, [{"sleep": 2.0}])
    a = supervise("stale", extra_env=env, **profile.settings())
    assert await wait_for(lambda: _open_run(ledger, a.pid), within=30), a.log()[-2000:]
    await asyncio.sleep(0.3)
    await freeze_between_transactions(db, a)
    try:
        b = supervise("fresh", extra_env=env, **profile.settings())
        done = await wait_for(lambda: _completed(db, task_id), within=profile.rescue_within + 30)
        assert done, b.log()[-2000:]
        before = await snapshot(db)
    finally:
        a.signal(signal.SIGCONT)
    thawed = await wait_for(lambda: _thawed(a, ledger, task_id), within=20)
    await asyncio.sleep(profile.lease / 3 + 0.5)  # a heartbeat more, if A were to write
    after = await snapshot(db)
    violations = await finish(db, ledger, profile, a, b)
    if not thawed:
        violations.append(Violation("stale", task_id, "the thawed daemon never noticed"))
    for table in before:
        changed = before[table] ^ after[table]
        if changed:
            violations.append(
                Violation("stale", task_id, f"{len(changed)} {table} rows changed after SIGCONT")
            )
    log = a.log()
    return Result(
        violations,
        {
            "stale_writes_rejected": log.count("not written"),
            "stopped_by_heartbeat": log.count("stopping (lease_lost)"),
            "rows_changed_by_stale": sum(len(before[t] ^ after[t]) for t in before),
        },
    )


async def _open_run(ledger: Ledger, pid: int) -> bool:
    return bool(ledger.open_runs(pid))


async def _completed(db: Database, task_id: int) -> bool:
    return (await task_row(db, task_id)).status == "completed"


async def _thawed(sup: Supervisor, ledger: Ledger, task_id: int) -> bool:
    """The thawed daemon's run ended (its outcome is written or fenced next), or its
    heartbeat found the lease gone and stopped it."""
    ended = any(e.event == "end" and e.pid == sup.pid for e in ledger.runs()[task_id])
    return ended or "stopping (lease_lost)" in sup.log()


async def freeze_between_transactions(db: Database, sup: Supervisor, tries: int = 50) -> None:
    """SIGSTOP the daemon at an instant it holds no transaction open (a SQLite process
    frozen inside one would hold the single write lock: a limit of SQLite, not of the
    fence; on PostgreSQL it would hold row locks)."""
    for _ in range(tries):
        sup.signal(signal.SIGSTOP)
        if not await in_transaction(db):
            return
        sup.signal(signal.SIGCONT)
        await asyncio.sleep(random.uniform(0.02, 0.1))
    raise AssertionError(f"{sup.name} was inside a transaction at each of {tries} tries")


async def in_transaction(db: Database) -> bool:
    """True when another connection holds the SQLite write lock or an open PostgreSQL
    transaction of the daemon."""
    path = sqlite_path(db.engine.url)
    if path is not None:
        conn = sqlite3.connect(path, timeout=0.2, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
            return False
        except sqlite3.OperationalError:
            return True
        finally:
            conn.close()
    async with db.read_transaction() as s:
        busy = await s.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid <> pg_backend_pid() AND state <> 'idle'"
            )
        )
    return bool(busy)


async def snapshot(db: Database) -> dict[str, set[str]]:
    """Every row of the task and notification tables (each as the repr of its tuple)."""
    async with db.read_transaction() as s:
        return {
            table: {repr(tuple(r)) for r in (await s.execute(text(f"SELECT * FROM {table}")))}
            for table in ("pending_analysis", "analysis_notifications")
        }


async def lease_under_load(
    db: Database,
    supervise: Supervise,
    ledger: Ledger,
    profile: Profile,
    *,
    extra_env: dict[str, str] | None = None,
) -> Result:
    """R7: jobs three leases long while six handler threads spin on the CPU and an async
    handler blocks the event loop 200 ms in every second: no live job may be rescued. The
    heartbeat's largest gap (age of the processors row's last_seen_at, written in the
    renewal's transaction; sampled every 0.2 s) must stay under the lease: past it, the
    live jobs' leases have expired and any rescue sweep would take them. The fast profile
    runs this one with a 3 s lease (a beat every second)."""
    lease = max(profile.lease, 3.0)
    run_for = 3 * lease
    spin = await enqueue_payloads(db, SYNC_KIND, [{"cpu": run_for}] * 6, max_retries=0)
    block = await enqueue_payloads(
        db, ASYNC_KIND, [{"sleep": run_for, "block_loop": 200}], max_retries=0
    )
    settings = profile.settings(lease_seconds=lease)
    sup = supervise("load", max_concurrent="8", extra_env=extra_env or {}, **settings)
    gap = 0.0
    deadline = time.monotonic() + 3 * run_for + 30
    while await count_terminal(db) < 7 and time.monotonic() < deadline:
        gap = max(gap, await heartbeat_age(db))
        await asyncio.sleep(0.2)
    violations = await finish(db, ledger, profile, sup)
    starts = ledger.starts()
    rescued = []
    for task_id in spin + block:
        row = await task_row(db, task_id)
        if (row.status, row.attempts, starts[task_id]) != ("completed", 1, 1):
            rescued.append(task_id)
            detail = f"{row.status} after {row.attempts} claims, {starts[task_id]} runs"
            violations.append(Violation("rescued_live", task_id, detail))
    if gap >= lease:
        detail = f"no renewal for {gap:.2f} s: the live jobs' {lease:g} s leases expired"
        violations.append(Violation("lease_expired_live", None, detail))
    return Result(
        violations,
        {
            "rescued_live": len(rescued),
            "duplicated": len(rescued),
            "max_heartbeat_gap_seconds": round(gap, 2),
            "lease_seconds": lease,
        },
    )


async def heartbeat_age(db: Database) -> float:
    """Seconds since the freshest processors row was last seen (0 when there is none)."""
    async with db.read_transaction() as s:
        seen = await s.scalar(select(func.max(Processor.last_seen_at)))
    return (utcnow() - seen).total_seconds() if seen is not None else 0.0


@dataclass
class HttpTally:
    """Responses by status class, transport errors, and enqueue latencies."""

    codes: Counter[int] = field(default_factory=Counter)
    transport_errors: list[str] = field(default_factory=list)
    enqueue_ms: list[float] = field(default_factory=list)

    @property
    def server_errors(self) -> int:
        return sum(n for code, n in self.codes.items() if code >= 500)


async def api_writers(
    db: Database,
    database_url: str,
    supervise: Supervise,
    ledger: Ledger,
    profile: Profile,
    tmp: Path,
    *,
    clients: int,
    enqueues: int,
    pollers: int,
    extra_env: dict[str, str] | None = None,
) -> Result:
    """R9: ``clients`` concurrent API clients enqueue ``enqueues`` tasks each through a real
    `async-processor api` process while a daemon drains them and ``pollers`` clients poll
    the notification feed. Counted: 5xx answers and busy errors in every log."""
    env = extra_env or {}
    api = Api(database_url, tmp, extra_env=env, handler_modules=HANDLER_MODULES)
    await asyncio.to_thread(api.start)
    try:
        token = await asyncio.to_thread(create_token, database_url, "load", admin=True)
        sup = supervise("drain", max_concurrent="8", extra_env=env, **profile.settings())
        tally = HttpTally()
        writing = asyncio.Event()
        headers = {"Authorization": f"Bearer {token}"}
        limits = httpx.Limits(max_connections=clients + pollers + 10, max_keepalive_connections=0)
        async with httpx.AsyncClient(
            base_url=api.base, headers=headers, timeout=60, limits=limits
        ) as http:

            async def call(method: str, url: str, **kw: Any) -> httpx.Response | None:
                try:
                    r = await http.request(method, url, **kw)
                except httpx.HTTPError as exc:
                    tally.transport_errors.append(f"{exc.__class__.__name__}: {exc}")
                    return None
                tally.codes[r.status_code] += 1
                return r

            async def writer(c: int) -> None:
                for i in range(enqueues):
                    body = {"kind": ASYNC_KIND, "user_id": f"user{c % 20}", "payload": {"i": i}}
                    started = time.monotonic()
                    await call("POST", f"{API_PREFIX}/tasks", json=body)
                    tally.enqueue_ms.append((time.monotonic() - started) * 1000)

            async def poller() -> None:
                after = 0
                while writing.is_set():
                    r = await call("GET", f"{API_PREFIX}/notifications?after_id={after}&limit=200")
                    if r is not None and r.status_code == 200 and r.json()["items"]:
                        after = r.json()["items"][-1]["id"]
                    await asyncio.sleep(profile.api_poll_every)

            writing.set()
            polling = [asyncio.create_task(poller()) for _ in range(pollers)]
            started = time.monotonic()
            await asyncio.gather(*(writer(c) for c in range(clients)))
            enqueue_seconds = time.monotonic() - started
            total = clients * enqueues
            # What was accepted (a seeded bug's refused enqueues never arrive).
            drained = await wait_terminal(db, tally.codes[202], 120)
            writing.clear()
            await asyncio.gather(*polling)
        violations = await finish(db, ledger, profile, sup)
    finally:
        await asyncio.to_thread(api.stop)
    if not drained:
        violations.append(Violation("terminal", None, "the daemon did not drain the enqueues"))
    if tally.codes[202] != total:
        violations.append(Violation("enqueue", None, f"202 answers {tally.codes}"))
    busy = busy_errors(api.log(), sup.log())
    if busy or tally.server_errors or tally.transport_errors:
        violations.append(
            Violation(
                "busy",
                None,
                f"{busy} busy errors logged, {tally.server_errors} 5xx, "
                f"{len(tally.transport_errors)} transport errors {tally.transport_errors[:3]}",
            )
        )
    latencies = sorted(tally.enqueue_ms)
    return Result(
        violations,
        {
            "enqueues": total,
            "http_5xx": tally.server_errors,
            "busy_errors": busy,
            "transport_errors": len(tally.transport_errors),
            "requests": sum(tally.codes.values()),
            "enqueue_per_second": round(total / enqueue_seconds),
            "enqueue_p50_ms": round(latencies[len(latencies) // 2], 1),
            "enqueue_p99_ms": round(latencies[int(len(latencies) * 0.99)], 1),
        },
    )
