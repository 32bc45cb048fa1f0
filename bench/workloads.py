"""W1..W6 and their floors, on one engine.

Every daemon figure comes from a real ``python -m app.background_processor`` process doing
the whole protocol (claim, lease, handler, result, notifications); the benchmark process
only enqueues (through ``app.services.queue``, as an application would) and reads the table.
Durations are taken from the rows themselves (``started_at`` of the first claim,
``completed_at`` of the last completion) or, for pick-up latency, from the handler's own
clock against the enqueuer's commit time (one host, one clock).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from sqlalchemy import func, select, text

import app.db as app_db
from app.db import Database
from app.models import PendingAnalysis, TaskStatus
from app.services import hotpath, queue
from bench import floors
from bench.handlers import NOOP, SLEEP, STAMP
from bench.procs import (
    IMPORT_STEPS,
    Api,
    Daemon,
    FloorWorker,
    ProcessError,
    cpu_seconds,
    create_token,
    import_rss,
    memory_kb,
)
from bench.profiles import Profile
from bench.stats import median, summary_ms
from bench.targets import Target

T = PendingAnalysis
ENQUEUE_CHUNK = 1_000
CLAIM_WARMUP = 10
HTTP_WARMUP = 20
POLL_SECONDS = 0.05
PROCESSOR_ID = "bench-claim-timer"


class BenchError(RuntimeError):
    """A workload could not be measured."""


@dataclass(frozen=True, slots=True)
class Batch:
    """Ids of jobs enqueued together (consecutive on both engines)."""

    ids: tuple[int, ...]

    @property
    def lo(self) -> int:
        return min(self.ids)

    @property
    def hi(self) -> int:
        return max(self.ids)


def median_run(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The run whose ``per_second`` is the median of ``runs`` (its latencies with it), and
    every run's figure under ``runs``."""
    ordered = sorted(runs, key=lambda r: float(r["per_second"]))
    return {**ordered[(len(ordered) - 1) // 2], "runs": [r["per_second"] for r in runs]}


def median_figures(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Floors measured in several rounds: each ``*_per_second`` figure the median of its
    rounds (with every round's value under ``<figure>_runs``); the other keys as measured."""
    out = dict(runs[0])
    for key, value in runs[0].items():
        if key.endswith("_per_second") and isinstance(value, int | float):
            values = [float(r[key]) for r in runs]
            out[key] = median(values)
            out[f"{key}_runs"] = values
    return out


@contextlib.asynccontextmanager
async def database(
    url: str, pool_size: int = 2, sqlite_synchronous: str = "NORMAL"
) -> AsyncIterator[Database]:
    """The application's Database over ``url``, disposed afterwards."""
    db = Database.from_url(url, pool_size=pool_size, sqlite_synchronous=sqlite_synchronous)
    try:
        yield db
    finally:
        await db.dispose()


async def enqueue(db: Database, kind: str, payloads: Sequence[dict[str, Any]]) -> Batch:
    """Enqueue through the library API, ``ENQUEUE_CHUNK`` per transaction."""
    ids: list[int] = []
    for first in range(0, len(payloads), ENQUEUE_CHUNK):
        specs = [
            {"kind": kind, "payload": p, "user_id": "bench"}
            for p in payloads[first : first + ENQUEUE_CHUNK]
        ]
        async with db.write_transaction() as session:
            ids += [r.id for r in await queue.enqueue_tasks(session, specs)]
    return Batch(tuple(ids))


@dataclass(frozen=True, slots=True)
class Stamped:
    """An enqueue's tasks and the wall-clock times around its COMMIT."""

    tasks: list[queue.EnqueuedTask]
    sent: float  # just before the COMMIT was sent
    committed: float  # as it returned (see enqueue_stamped)


async def enqueue_stamped(db: Database, specs: Sequence[dict[str, Any]]) -> Stamped:
    """Enqueue in one transaction, as ``db.write_transaction()`` does, with the wall-clock
    time just before its COMMIT was sent and right after it returned (before the session
    closes and the pool resets the connection).

    The commit happens somewhere between the two. Pick-up latency is measured from the
    first (``sent``): an upper bound, never flattering, that includes the COMMIT itself.
    Measured from the second, a woken daemon could start the job before this process,
    back from the driver's thread, read its clock (two cores), and latencies came out
    short, even negative (SQLite's minimum: -4 ms in session 20's run). On SQLite the
    session rings the daemons' doorbells as its commit returns; ``committed`` is read
    before that ring (app.db.ring_daemons, wrapped for the call).
    """
    rung: list[float] = []
    ring = app_db.ring_daemons

    def stamp_then_ring(path: Path, message: bytes = b"") -> None:
        rung.append(time.time())
        ring(path, message)

    app_db.ring_daemons = stamp_then_ring
    try:
        async with db.write_sessionmaker() as session:
            await session.begin()
            enqueued = await queue.enqueue_tasks(session, specs)
            sent = time.time()
            await session.commit()
            committed = time.time()
    finally:
        app_db.ring_daemons = ring
    return Stamped(enqueued, sent, rung[0] if rung else committed)


async def claim_as_daemon(session: Any, limit: int) -> int:
    """Claim ``limit`` tasks in ``session``'s transaction with the statements the daemon
    sends: on PostgreSQL the claim and its notifications as one statement (what
    ``queue.claim_tasks_alone`` autocommits), on SQLite the claim's UPDATE and the
    notifications' INSERT (``queue.claim_tasks``). Returns how many were claimed."""
    if session.get_bind().dialect.name == "postgresql":
        used, params = queue._claim_params({}, PROCESSOR_ID, limit)
        params["c_lease"] = timedelta(seconds=30)
        return len(await hotpath.fetch(session, queue._claim_alone_statement(used), params))
    claimed = await queue.claim_tasks(
        session, processor_id=PROCESSOR_ID, limit=limit, lease_seconds=30
    )
    return len(claimed)


#: The jobs of an id range still to end, counted through the partial indexes of pending and
#: running rows: a poll costs what is left, not the batch's size. (Counting the finished
#: rows of the range read every row of it, every 50 ms: on PostgreSQL a backend busy ~13 %
#: of the time during a 20,000-job drain, CPU the daemon under test shares.) ``+id`` keeps
#: both engines off the primary key's range and on those indexes.
UNFINISHED = text(
    "SELECT (SELECT count(*) FROM pending_analysis"
    " WHERE status = 'pending' AND +id BETWEEN :lo AND :hi)"
    " + (SELECT count(*) FROM pending_analysis"
    " WHERE status = 'processing' AND +id BETWEEN :lo AND :hi)"
)


async def unfinished_count(db: Database, batch: Batch) -> int:
    async with db.read_transaction() as session:
        found = await session.execute(UNFINISHED, {"lo": batch.lo, "hi": batch.hi})
        return int(found.scalar_one())


async def wait_finished(
    db: Database, batch: Batch, limit_seconds: float, alive: Callable[[], None] | None = None
) -> None:
    """Poll (every 50 ms, a count of what is left) until every job of ``batch`` ended."""
    deadline = time.monotonic() + limit_seconds
    while True:
        left = await unfinished_count(db, batch)
        if left == 0:
            return
        if alive is not None:
            alive()
        if time.monotonic() > deadline:
            done = len(batch.ids) - left
            raise BenchError(
                f"only {done} of {len(batch.ids)} jobs finished in {limit_seconds:.0f} s"
            )
        await asyncio.sleep(POLL_SECONDS)


async def window(db: Database, batch: Batch) -> tuple[datetime, datetime]:
    """(first claim, last completion) of a batch, from the rows; every job must have
    completed."""
    stmt = select(func.min(T.started_at), func.max(T.completed_at), func.count()).where(
        T.id.between(batch.lo, batch.hi), T.status == TaskStatus.COMPLETED
    )
    async with db.read_transaction() as session:
        first, last, count = (await session.execute(stmt)).one()
    if count != len(batch.ids) or first is None or last is None:
        raise BenchError(f"{count} of {len(batch.ids)} jobs completed")
    return first, last


async def handler_stamps(db: Database, batch: Batch) -> dict[int, float]:
    """task id → the time its stamp handler started."""
    stmt = select(T.id, T.result).where(T.id.between(batch.lo, batch.hi))
    async with db.read_transaction() as session:
        rows = (await session.execute(stmt)).all()
    return {row.id: float(row.result["t"]) for row in rows if row.result}


def drain_timeout(jobs: int) -> float:
    return 60.0 + jobs / 50.0


@dataclass
class EngineBench:
    """Runs every workload on one target and collects the figures."""

    target: Target
    profile: Profile
    workdir: Path
    say: Callable[[str], None]
    result: dict[str, Any] = field(default_factory=dict)
    daemons: list[Daemon] = field(default_factory=list)
    history: tuple[str, Batch] | None = None  # W5's database with the finished rows

    @property
    def engine(self) -> str:
        return self.target.name

    def log(self, message: str) -> None:
        self.say(f"[{self.engine}] {message}")

    async def run(self) -> dict[str, Any]:
        """Every workload; a failing one is recorded as {"error": ...} and the rest go on."""
        await self.target.setup()
        try:
            probe = await self.target.clone("settings")
            self.result["settings"] = await self.target.settings(probe)
            await self.target.drop(probe)
            steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
                ("W1", self.w1),
                ("W5", self.w5_claims),
                ("W2", self.drain_rounds),
                ("floors", self.floors),
            ]
            if self.profile.relaxed:
                steps.append(("relaxed", self.relaxed))
            for key, step in steps:
                try:
                    await step()
                except Exception as exc:
                    self.log(f"{key} FAILED: {exc.__class__.__name__}: {exc}")
                    self.result.setdefault("errors", {})[key] = f"{exc.__class__.__name__}: {exc}"
                    for daemon in self.daemons:
                        await daemon.kill()
                    self.daemons.clear()
        finally:
            for daemon in self.daemons:
                await daemon.kill()
            if self.history is not None:
                await self.target.drop(self.history[0])
            await self.target.cleanup()
        return self.result

    # --- helpers -----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def clone(self, label: str) -> AsyncIterator[str]:
        url = await self.target.clone(label)
        try:
            yield url
        finally:
            await self.target.drop(url)

    async def start_daemon(self, url: str, label: str, **settings: str) -> Daemon:
        log_path = self.workdir / f"{self.engine}-{label}.log"
        daemon = Daemon(url, log_path, max_concurrent=str(self.profile.concurrency), **settings)
        self.daemons.append(daemon)
        return await daemon.start()

    async def stop_daemon(self, daemon: Daemon) -> None:
        self.daemons.remove(daemon)
        await daemon.stop()

    async def drain(
        self,
        url: str,
        label: str,
        *,
        batch: Batch | None = None,
        keep: bool = False,
        **settings: str,
    ) -> tuple[float, Daemon]:
        """Pre-enqueue the drain jobs (unless ``batch`` is already there), start a daemon,
        wait until it ran them all: jobs/s from the first claim to the last completion (the
        rows' own timestamps)."""
        jobs = self.profile.drain_jobs
        async with database(url) as db:
            if batch is None:
                batch = await enqueue(db, NOOP, [{"n": i} for i in range(jobs)])
            jobs = len(batch.ids)
            daemon = await self.start_daemon(url, label, **settings)
            await wait_finished(db, batch, drain_timeout(jobs), daemon.check_alive)
            first, last = await window(db, batch)
        seconds = (last - first).total_seconds()
        if not keep:
            await self.stop_daemon(daemon)
        return jobs / seconds, daemon

    # --- W1 enqueue ----------------------------------------------------------------------

    async def w1(self) -> None:
        """W1 and its floors in ``w1_rounds`` alternating rounds (library, then the bare
        drivers, each on a fresh table), every figure the median of its rounds: the load
        on this VM drifts over minutes, and a figure measured once beside a floor measured
        a minute later made the ratio a matter of timing."""
        p = self.profile
        rounds = []
        floors_by_round = []
        for number in range(1, p.w1_rounds + 1):
            rounds.append(await self.w1_library(number))
            floors_by_round.append(await self.floor_enqueue())
        out = {key: median_run([r[key] for r in rounds]) for key in rounds[0]}
        self.result["W1"] = out
        merged = self.floor_results()["enqueue"]
        for driver in floors_by_round[0]:
            merged[driver] = median_figures([f[driver] for f in floors_by_round])
        self.log(
            f"W1 medians: single {out['library_single']['per_second']:,.0f}/s, alone "
            f"{out['library_alone']['per_second']:,.0f}/s, {p.enqueue_writers} writers "
            f"{out['library_alone_writers']['per_second']:,.0f}/s, bulk "
            f"{out['library_bulk']['per_second']:,.0f} rows/s"
        )
        async with self.clone("w1-http") as url:
            out["http"] = await self.http(url)
            self.log(f"W1 POST /tasks: {out['http']['per_second']:,.0f} req/s")

    async def w1_library(self, number: int) -> dict[str, dict[str, Any]]:
        """One round of W1 through the library API, on a fresh table."""
        p = self.profile
        out: dict[str, dict[str, Any]] = {}
        # A pool that holds every writer's connection, as an application sizes its pool to
        # its concurrency: beyond pool_size SQLAlchemy opens an overflow connection per
        # checkout and closes it on return (a new PostgreSQL connection per enqueue).
        pool = max(2, p.enqueue_writers)
        async with self.clone("w1-lib") as url, database(url, pool) as db:
            out["library_single"] = await self.library_single(db, p.single_enqueues)
            out["library_alone"] = await self.library_alone(db, p.single_enqueues, 1)
            out["library_alone_writers"] = await self.library_alone(
                db, p.single_enqueues, p.enqueue_writers
            )
            payloads = [{"n": i} for i in range(p.bulk_size)]
            started = time.perf_counter()
            for _ in range(p.bulk_calls):
                async with db.write_transaction() as session:
                    await queue.enqueue_tasks(
                        session,
                        [{"kind": NOOP, "payload": x, "user_id": "bench"} for x in payloads],
                    )
            seconds = time.perf_counter() - started
            rows = p.bulk_calls * p.bulk_size
            out["library_bulk"] = {
                "rows": rows,
                "per_call": p.bulk_size,
                "seconds": round(seconds, 4),
                "per_second": rows / seconds,
            }
        self.log(
            f"W1 round {number}: single {out['library_single']['per_second']:,.0f}/s, alone "
            f"{out['library_alone']['per_second']:,.0f}/s, {p.enqueue_writers} writers "
            f"{out['library_alone_writers']['per_second']:,.0f}/s, bulk "
            f"{rows / seconds:,.0f} rows/s"
        )
        return out

    def floor_results(self) -> dict[str, Any]:
        found: dict[str, Any] = self.result.setdefault(
            "floors",
            {"batch": self.profile.floor_batch, "enqueue": {}, "drain": {}, "pickup": {}},
        )
        return found

    async def floor_enqueue(self) -> dict[str, dict[str, Any]]:
        """One round of W1's floors: each bare driver's figures (w1 keeps the medians)."""
        p = self.profile
        out: dict[str, dict[str, Any]] = {}
        for driver in self.target.floor_drivers:
            async with self.clone(f"floor-enq-{driver}") as url:
                rows = p.bulk_calls * p.bulk_size
                target = self.target.driver_target(url)
                single, bulk = await floors.enqueue_floor(
                    driver, target, p.single_enqueues, rows, p.bulk_size
                )
                # The engine's own ceiling, on the same table right after: the same rows
                # made by the database in one INSERT … SELECT per transaction.
                made = None
                if driver in ("sqlite3", "asyncpg"):
                    made = await floors.rows_made_here(driver, target, rows, p.bulk_size)
            out[driver] = {
                "single_per_second": p.single_enqueues / single,
                "bulk_per_second": rows / bulk,
                "bulk_size": p.bulk_size,
                "bulk_rows": rows,
            }
            if made is not None:
                out[driver]["rows_made_here_per_second"] = rows / made
            if driver == "asyncpg":  # enqueue_task_alone's form: one autocommitted INSERT
                async with self.clone("floor-enq-autocommit") as url:
                    target = self.target.driver_target(url)
                    alone = await floors.asyncpg_enqueue_alone(target, p.single_enqueues, 1)
                    many = await floors.asyncpg_enqueue_alone(
                        target, p.single_enqueues, p.enqueue_writers
                    )
                out[driver]["autocommit_per_second"] = p.single_enqueues / alone
                out[driver]["autocommit_writers_per_second"] = p.single_enqueues / many
                out[driver]["writers"] = p.enqueue_writers
            self.log(
                f"floor {driver} enqueue: single {p.single_enqueues / single:,.0f}/s, "
                f"bulk {rows / bulk:,.0f}/s"
            )
        return out

    async def library_single(self, db: Database, count: int) -> dict[str, Any]:
        for i in range(HTTP_WARMUP):
            async with db.write_transaction() as session:
                await queue.enqueue_task(session, kind=NOOP, payload={"n": -i}, user_id="bench")
        latencies = []
        started = time.perf_counter()
        for i in range(count):
            t0 = time.perf_counter()
            async with db.write_transaction() as session:
                await queue.enqueue_task(session, kind=NOOP, payload={"n": i}, user_id="bench")
            latencies.append(time.perf_counter() - t0)
        seconds = time.perf_counter() - started
        return {
            "count": count,
            "seconds": round(seconds, 4),
            "per_second": count / seconds,
            **summary_ms(latencies),
        }

    async def library_alone(self, db: Database, count: int, writers: int) -> dict[str, Any]:
        """``count`` enqueue_task_alone calls (each a transaction of its own) from
        ``writers`` tasks at once."""
        for i in range(HTTP_WARMUP):
            await queue.enqueue_task_alone(db, kind=NOOP, payload={"n": -i}, user_id="bench")
        latencies: list[float] = []
        numbers = iter(range(count))

        async def writer() -> None:
            for i in numbers:
                t0 = time.perf_counter()
                await queue.enqueue_task_alone(db, kind=NOOP, payload={"n": i}, user_id="bench")
                latencies.append(time.perf_counter() - t0)

        started = time.perf_counter()
        await asyncio.gather(*(writer() for _ in range(writers)))
        seconds = time.perf_counter() - started
        return {
            "count": count,
            "writers": writers,
            "seconds": round(seconds, 4),
            "per_second": count / seconds,
            **summary_ms(latencies),
        }

    async def http(self, url: str) -> dict[str, Any]:
        p = self.profile
        token = await create_token(url)
        api = await Api(url, self.workdir / f"{self.engine}-api.log").start()
        try:
            # aiohttp, not httpx: httpx's client spent ~1 ms of CPU a request on these 2
            # cores, more than the API itself, so the figure measured the client.
            connector = aiohttp.TCPConnector(limit=p.http_clients)
            headers = {"Authorization": f"Bearer {token}"}
            async with aiohttp.ClientSession(
                base_url=api.base,
                headers=headers,
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=30),
            ) as client:
                path = "/api/async-analysis/tasks"
                for i in range(HTTP_WARMUP):
                    async with client.post(path, json={"kind": NOOP, "payload": {"n": -i}}) as r:
                        if r.status != 202:
                            text = await r.text()
                            raise BenchError(f"POST {path}: {r.status} {text[:300]}")
                counter = itertools.count()
                codes: Counter[int] = Counter()
                latencies: list[float] = []

                async def client_loop() -> None:
                    while (i := next(counter)) < p.http_requests:
                        t0 = time.perf_counter()
                        async with client.post(path, json={"kind": NOOP, "payload": {"n": i}}) as r:
                            await r.read()
                        latencies.append(time.perf_counter() - t0)
                        codes[r.status] += 1

                started = time.perf_counter()
                await asyncio.gather(*(client_loop() for _ in range(p.http_clients)))
                seconds = time.perf_counter() - started
        finally:
            await api.stop()
        accepted = codes.pop(202, 0)
        # A 503 (database locked or unreachable, with Retry-After) is the API's contract,
        # not a benchmark failure: it is counted and reported; anything else is a bug.
        if accepted < p.http_requests // 2 or set(codes) - {503}:
            raise BenchError(f"POST /tasks answered {dict(codes)} besides {accepted} x 202")
        return {
            "requests": p.http_requests,
            "clients": p.http_clients,
            "seconds": round(seconds, 4),
            "per_second": accepted / seconds,
            "not_accepted": {str(code): n for code, n in codes.items()},
            **summary_ms(latencies),
        }

    # --- drain rounds: W2, W2 with history (W5), the drain floors; W6, W3, W4 ---------------

    async def drain_rounds(self) -> None:
        """Each round drains the same number of jobs three ways, back to back, so that the
        ratios compare figures taken under the same background load: W2 on an empty table,
        W2 with W5's finished history, and the bare-driver floors. After the last round's
        W2 its daemon stays up for W6, W3 and W4."""
        p = self.profile
        w2: list[float] = []
        history: list[float] = []
        floor_runs: dict[str, list[dict[str, Any]]] = {d: [] for d in self.target.floor_drivers}
        for r in range(p.drain_repeats):
            last = r == p.drain_repeats - 1
            async with self.clone(f"w2-{r}") as url:
                rate, daemon = await self.drain(url, f"w2-{r}", keep=last)
                w2.append(rate)
                self.log(f"W2 drain run {r + 1}/{p.drain_repeats}: {rate:,.0f} jobs/s")
                if last:
                    self.result["W2"] = {
                        "jobs": p.drain_jobs,
                        "concurrency": p.concurrency,
                        "runs": [round(x, 1) for x in w2],
                        "jobs_per_second": median(w2),
                    }
                    await self.after_drain(url, daemon)
            if self.history is not None:
                url, batch = self.history
                if r > 0:
                    # Like the fresh W2 clones, start without the previous rounds' dead rows
                    # (autovacuum would not have reached a table this size yet).
                    await self.target.prepare_claims(url, vacuum=True)
                rate, _ = await self.drain(url, f"w5-history-{r}", batch=batch if r == 0 else None)
                history.append(rate)
                self.log(f"W5 drain with history, run {r + 1}: {rate:,.0f} jobs/s")
            for driver in self.target.floor_drivers:
                async with self.clone(f"floor-drain-{driver}-{r}") as url:
                    floor_runs[driver].append(await self.floor_drain(url, driver))
                rate = floor_runs[driver][-1]["jobs_per_second"]
                self.log(f"floor {driver} drain run {r + 1}: {rate:,.0f} jobs/s")
        drains = self.floor_results()["drain"]
        for driver, runs in floor_runs.items():
            rates = [run["jobs_per_second"] for run in runs]
            drains[driver] = {
                **runs[-1],
                "runs": [round(x, 1) for x in rates],
                "jobs_per_second": median(rates),
            }
        if history and "W5" in self.result:
            w5 = self.result["W5"]
            w5["drain_history_runs"] = [round(x, 1) for x in history]
            w5["drain_history_jobs_per_second"] = median(history)
            w5["drain_empty_jobs_per_second"] = median(w2)
            w5["drain_ratio"] = median(history) / median(w2)
            self.log(f"W5 drain {median(w2):,.0f} → {median(history):,.0f} jobs/s (medians)")

    async def after_drain(self, url: str, daemon: Daemon) -> None:
        """W6, W3, W4 on the daemon that just did a W2 drain; then stop it (exit 0)."""
        self.result["W6"] = await self.w6(daemon)
        self.log(
            f"W6 RSS {self.result['W6']['rss_mb']:.1f} MB, idle CPU "
            f"{self.result['W6']['idle_cpu_percent']:.2f} %"
        )
        async with database(url) as db:
            self.result["W3"] = await self.pickup(db, daemon.check_alive)
            self.log(
                f"W3 pick-up p50 {self.result['W3']['p50_ms']:.1f} ms, "
                f"p95 {self.result['W3']['p95_ms']:.1f} ms"
            )
            self.result["W4"] = await self.w4(db, daemon)
            self.log(f"W4 {self.result['W4']['seconds']:.3f} s")
        await self.stop_daemon(daemon)

    async def w6(self, daemon: Daemon) -> dict[str, Any]:
        mem = memory_kb(daemon.pid)
        await asyncio.sleep(1.0)  # let the last completions and logs settle
        idle = self.profile.idle_seconds
        before = cpu_seconds(daemon.pid)
        await asyncio.sleep(idle)
        used = cpu_seconds(daemon.pid) - before
        daemon.check_alive()
        steps = [
            *IMPORT_STEPS,
            (f"{self.target.floor_driver} (the driver)", (self.target.floor_driver,)),
            ("the daemon's modules", ("app.background_processor", "bench.handlers")),
        ]
        return {
            "rss_mb": mem["VmRSS"] / 1024,
            "peak_rss_mb": mem["VmHWM"] / 1024,
            "import_rss_mb": await import_rss(
                steps, {k: v for k, v in daemon.env.items() if k != "NOTIFY_SOCKET"}
            ),
            "idle_seconds": idle,
            "idle_cpu_seconds": used,
            "idle_cpu_percent": 100.0 * used / idle,
        }

    async def pickup(self, db: Database, alive: Callable[[], None]) -> dict[str, Any]:
        """W3 (and its floor): after an idle spell, jobs enqueued one per transaction
        ``gap`` apart; latency = handler start - the enqueuer's commit."""
        p = self.profile
        await asyncio.sleep(p.pickup_idle)
        commits: dict[int, Stamped] = {}
        next_at = time.monotonic()
        for i in range(p.pickup_jobs):
            stamped = await enqueue_stamped(db, [{"kind": STAMP, "payload": {"i": i}}])
            commits[stamped.tasks[0].id] = stamped
            next_at += p.pickup_gap
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        batch = Batch(tuple(commits))
        await wait_finished(db, batch, 60.0, alive)
        stamps = await handler_stamps(db, batch)
        return {
            "jobs": p.pickup_jobs,
            "gap_seconds": p.pickup_gap,
            "idle_seconds": p.pickup_idle,
            "measured_from": "commit sent",
            **summary_ms([stamps[i] - commits[i].sent for i in batch.ids]),
            "from_commit_returned": summary_ms(
                [stamps[i] - commits[i].committed for i in batch.ids]
            ),
            "commit": summary_ms([c.committed - c.sent for c in commits.values()]),
        }

    async def w4(self, db: Database, daemon: Daemon) -> dict[str, Any]:
        p = self.profile
        await asyncio.sleep(1.0)
        specs = [
            {"kind": SLEEP, "payload": {"seconds": p.sleep_seconds, "n": i}, "user_id": "bench"}
            for i in range(p.sleep_jobs)
        ]
        stamped = await enqueue_stamped(db, specs)
        batch = Batch(tuple(e.id for e in stamped.tasks))
        await wait_finished(db, batch, 120.0, daemon.check_alive)
        first, last = await window(db, batch)
        return {
            "jobs": p.sleep_jobs,
            "sleep_seconds": p.sleep_seconds,
            "concurrency": p.concurrency,
            "seconds": last.timestamp() - stamped.sent,
            "first_claim_to_last_completion": (last - first).total_seconds(),
            "ideal_seconds": p.sleep_jobs * p.sleep_seconds / p.concurrency,
        }

    # --- W5 scale ----------------------------------------------------------------------------

    async def claim_times(self, urls: dict[str, str]) -> dict[str, dict[str, Any]]:
        """The application's claim (``queue.claim_tasks``) and the floor driver's claim
        statement on each database of ``urls``, each claim in a transaction that is rolled
        back (the rows stay pending). Rounds alternate databases and the two claimers, so
        every series sees the same background load."""
        p = self.profile
        rounds = 6
        per_round = max(1, p.claim_iterations // rounds)
        statements: dict[str, list[float]] = {name: [] for name in urls}
        calls: dict[str, list[float]] = {name: [] for name in urls}
        floor: dict[str, list[float]] = {name: [] for name in urls}
        current: list[str] = []

        def timed(statement: str, _args: Any, seconds: float) -> None:
            if "UPDATE PENDING_ANALYSIS" in statement.upper():
                statements[current[0]].append(seconds)

        async with contextlib.AsyncExitStack() as stack:
            dbs = {name: await stack.enter_async_context(database(u)) for name, u in urls.items()}
            # the claim goes to the driver directly (app.services.hotpath): time it there
            stack.enter_context(hotpath.watch(timed))
            for r in range(rounds):
                order = list(urls) if r % 2 == 0 else list(urls)[::-1]
                for name in order:
                    current[:] = [name]
                    warm = CLAIM_WARMUP if r < 2 else 0
                    for i in range(warm + per_round):
                        session = dbs[name].write_sessionmaker()
                        kept = len(statements[name])
                        try:
                            t0 = time.perf_counter()
                            claimed = await claim_as_daemon(session, p.claim_limit)
                            elapsed = time.perf_counter() - t0
                        finally:
                            await session.rollback()
                            await session.close()
                        if claimed != p.claim_limit:
                            raise BenchError(f"claimed {claimed}, expected {p.claim_limit}")
                        if i < warm:
                            del statements[name][kept:]  # this round's warm-up only
                        else:
                            calls[name].append(elapsed)
                    times = await floors.claim_floor(
                        self.target.floor_driver,
                        self.target.driver_target(urls[name]),
                        warm + per_round,
                        p.claim_limit,
                    )
                    floor[name] += times[warm:]
        return {
            name: {
                "statement": summary_ms(statements[name]) if statements[name] else None,
                "claim_tasks_call": summary_ms(calls[name]),
                "floor_statement": summary_ms(floor[name]),
                "floor_driver": self.target.floor_driver,
            }
            for name in urls
        }

    async def w5_claims(self) -> None:
        """W5's claim timings, empty and with the finished history (interleaved); the
        history database stays for the drain rounds (its pending rows are the first
        round's jobs)."""
        p = self.profile
        out: dict[str, Any] = {"finished_rows": p.finished_rows, "claim_limit": p.claim_limit}
        self.result["W5"] = out
        async with self.clone("w5-empty") as empty_url:
            async with database(empty_url) as db:
                await enqueue(db, NOOP, [{"n": i} for i in range(p.drain_jobs)])
            url = await self.target.clone("w5-history")
            started = time.perf_counter()
            await self.target.fill_history(url, p.finished_rows)
            out["fill_seconds"] = round(time.perf_counter() - started, 2)
            self.log(f"W5 filled {p.finished_rows:,} finished rows in {out['fill_seconds']} s")
            async with database(url) as db:
                batch = await enqueue(db, NOOP, [{"n": i} for i in range(p.drain_jobs)])
            self.history = (url, batch)
            await self.target.prepare_claims(empty_url, vacuum=True)
            await self.target.prepare_claims(url, vacuum=True)
            async with self.clone("w5-later") as later_url:
                # The due jobs at priority 5, behind tasks of priority 10 due tomorrow.
                async with database(later_url) as db:
                    await enqueue(db, NOOP, [{"n": i} for i in range(p.drain_jobs)])
                started = time.perf_counter()
                await self.target.fill_later(later_url, p.later_rows)
                out["later_rows"] = p.later_rows
                out["later_fill_seconds"] = round(time.perf_counter() - started, 2)
                await self.target.prepare_claims(later_url, vacuum=True)
                timed = await self.claim_times(
                    {"claim_empty": empty_url, "claim_history": url, "claim_later": later_url}
                )
        out.update(timed)
        # The claims were rolled back: the same pending rows are the first drain's jobs.
        await self.target.prepare_claims(url, vacuum=True)
        empty = out["claim_empty"]
        history = out["claim_history"]
        key = "statement" if empty["statement"] and history["statement"] else "claim_tasks_call"
        out["claim_measure"] = key
        out["claim_ratio"] = history[key]["p50_ms"] / empty[key]["p50_ms"]
        later = out["claim_later"]
        if later[key] is not None:
            out["later_ratio"] = later[key]["p50_ms"] / empty[key]["p50_ms"]
        self.log(f"W5 claim p50 {empty[key]['p50_ms']:.3f} → {history[key]['p50_ms']:.3f} ms")
        if later[key] is not None:
            self.log(
                f"W5 claim p50 with {p.later_rows:,} tasks scheduled for later:"
                f" {later[key]['p50_ms']:.3f} ms"
            )

    # --- floors ----------------------------------------------------------------------------------

    async def floors(self) -> None:
        """The floors not measured beside their workload: a larger-batch drain, pick-up."""
        p = self.profile
        out = self.floor_results()
        driver = self.target.daemon_driver
        async with self.clone(f"floor-drain-large-{driver}") as url:
            large = await self.floor_drain(url, driver, p.floor_large_batch)
        out["drain_large_batch"] = {"driver": driver, "batch": p.floor_large_batch, **large}
        self.log(
            f"floor {driver} drain, batch {p.floor_large_batch}: "
            f"{large['jobs_per_second']:,.0f} jobs/s"
        )
        for driver in self.target.pickup_drivers:
            async with self.clone(f"floor-pickup-{driver}") as url:
                worker = await FloorWorker(
                    "pickup",
                    driver,
                    self.target.driver_target(url),
                    p.floor_batch,
                    count=p.pickup_jobs,
                ).start()
                async with database(url) as db:
                    out["pickup"][driver] = await self.pickup(db, lambda: None)
                await worker.result(30.0)
            self.log(f"floor {driver} pick-up p50 {out['pickup'][driver]['p50_ms']:.2f} ms")

    async def floor_drain(
        self, url: str, driver: str, size: int | None = None, synchronous: str = "NORMAL"
    ) -> dict[str, Any]:
        jobs = self.profile.drain_jobs
        async with database(url) as db:
            batch = await enqueue(db, NOOP, [{"n": i} for i in range(jobs)])
            worker = await FloorWorker(
                "drain",
                driver,
                self.target.driver_target(url),
                size or self.profile.floor_batch,
                synchronous=synchronous,
            ).start()
            report = json.loads(await worker.result(drain_timeout(jobs)))
            if report["done"] != jobs:
                raise BenchError(f"floor {driver} drained {report['done']} of {jobs}")
            first, last = await window(db, batch)
        return {
            "jobs": jobs,
            "jobs_per_second": jobs / (last - first).total_seconds(),
            "rss_mb": report["VmRSS"] / 1024,
            "peak_rss_mb": report["VmHWM"] / 1024,
        }

    # --- relaxed durability, beside the durable figures -------------------------------------------

    async def relaxed(self) -> None:
        """The other durability setting, beside the default's figures: PostgreSQL relaxed
        (synchronous_commit=off), SQLite stricter (SQLITE_SYNCHRONOUS=FULL: commits that
        survive a power loss, which the default NORMAL's may not)."""
        p = self.profile
        strict = self.engine == "sqlite"
        sync = "FULL" if strict else "NORMAL"
        daemon_settings = {"sqlite_synchronous": "FULL"} if strict else {}
        out: dict[str, Any] = {"kind": "stricter" if strict else "relaxed"}
        async with self.clone("relaxed-w1") as url:
            out["setting"] = (
                "synchronous=FULL (SQLITE_SYNCHRONOUS=FULL: every commit synced)"
                if strict
                else await self.target.relax(url)
            )
            async with database(url, sqlite_synchronous=sync) as db:
                out["library_single"] = await self.library_single(db, p.single_enqueues)
        async with self.clone("relaxed-w2") as url:
            if not strict:
                await self.target.relax(url)
            rate, _ = await self.drain(url, "relaxed-w2", **daemon_settings)
            out["W2_jobs_per_second"] = rate
        async with self.clone("relaxed-floor") as url:
            if not strict:
                await self.target.relax(url)
            single_driver = "sqlite3" if strict else self.target.floor_driver
            single, _ = await floors.enqueue_floor(
                single_driver, self.target.driver_target(url), p.single_enqueues, 0, 1, sync
            )
            out["floor_single_driver"] = single_driver
            out["floor_single_per_second"] = p.single_enqueues / single
        async with self.clone("relaxed-floor-drain") as url:
            if not strict:
                await self.target.relax(url)
            out["floor_drain"] = await self.floor_drain(
                url, self.target.daemon_driver, synchronous=sync
            )
            out["floor_drain_driver"] = self.target.daemon_driver
        self.result["relaxed"] = out
        self.log(
            f"{out['kind']} ({out['setting']}): single"
            f" {out['library_single']['per_second']:,.0f}/s, W2 {rate:,.0f} jobs/s"
        )


__all__ = ["BenchError", "EngineBench", "ProcessError"]
