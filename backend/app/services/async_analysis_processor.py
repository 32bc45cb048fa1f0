"""The daemon's engine: slots, the claim loop, and the loops it supervises.

Slots: at most ``concurrency`` handlers run at once; a slot refills the moment any job
ends (its done-callback starts a job claimed ahead, if any, and wakes the claim loop), and a
claim takes as many tasks as there are free slots plus the pool's claim-ahead allowance
(processor.ahead: what it expects to start within ``prefetch_window`` seconds), in one
statement per pool. Pools: a queue given its own number (``--queues ingest=2,default``) has
its own slots; the other queues share ``concurrency``. Outcomes go to the Completer; leases
are renewed by the Heartbeat until each outcome is written.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import os
import socket
import sqlite3
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncSession

from app import __version__
from app.config import DEFAULT_PREFETCH_WINDOW_SECONDS, KeyLimit, QueueSpec, RateLimit
from app.db import Database
from app.models import ProcessorState
from app.services import faults, notifications, queue
from app.services.handlers import HandlerRegistry, Schedule
from app.services.processor.ahead import Ahead, Room
from app.services.processor.completer import Completer, RetryPolicy
from app.services.processor.executor import (
    REASON_TO_OUTCOME,
    Executor,
    Outcome,
    OutcomeKind,
    StopReason,
    describe,
)
from app.services.processor.heartbeat import Heartbeat, HeartbeatResult, ProcessorStats
from app.services.processor.host import host_key
from app.services.processor.looper import ErrorBackoff, guarded_loop, is_transient, sleep_or_stop
from app.services.processor.progress import progress_sink
from app.services.processor.pruner import Pruner
from app.services.processor.rescuer import Rescuer
from app.services.processor.scheduler import Scheduler
from app.services.processor.waker import make_waker
from app.services.queue import ClaimedTask
from app.text import error_line

logger = logging.getLogger("app.processor")
STOP_WRITE_TIMEOUT_SECONDS = 5.0
#: PostgreSQL claims while ends are being written, until this many daemons' worth of ends
#: (times the concurrency) wait unwritten. 2 cost a 5,000-job drain ~45 % (one batch in
#: flight at a time); 4 measured the same as no bound.
COMPLETER_BACKLOG_LIMIT = 4
#: a job claimed ahead that has not started after this many seconds (or 10 windows, if
#: longer) goes back to pending, uncharged, for any daemon to run
STALE_AHEAD_SECONDS = 1.0
#: a stale job in a pool still turning over is looked at again after this long
STALE_RECHECK_SECONDS = 0.25
#: a shutdown that has waited this long for outcomes to be written says so
FLUSH_NOTICE_SECONDS = 2.0
#: the lease watch sleeps at least this long between looks
LEASE_WATCH_MIN_SECONDS = 0.01
#: a run told to stop (or past its timeout) and still running this much later is given up
#: on (_abandon_unstoppable)
UNSTOPPABLE_SECONDS = 5.0
#: a job claimed while its last run here has not stopped yet goes back for this long
STILL_RUNNING_DELAY_SECONDS = 1.0
#: the lease watch woke this much later than it meant to: the event loop was blocked
LOOP_STALL_SECONDS = 1.0
#: after a stall, how long a renewal may take before lapsed leases' jobs are stopped anyway
STALL_RENEW_SECONDS = 2.0

#: Jobs this daemon retries or snoozes wake it when they are due, a little after (the
#: database's clock and this one's may differ by that much), up to this many at once.
DUE_SLACK_SECONDS = 0.005
MAX_DUE_TIMERS = 10_000
#: A daemon whose claims leave room reads when the next scheduled task is due at most this
#: often (each such claim would otherwise add a read).
NEXT_DUE_MIN_GAP_SECONDS = 0.25

#: a job waiting in a pool: (-priority, scheduled_at, id) orders it as the claim does
Waiting = tuple[int, datetime, int, float, ClaimedTask]


@dataclass(slots=True)
class SlotPool:
    """Slots shared by some queues (``queues`` None: every queue not given its own), and
    the jobs claimed ahead for them (``waiting``, a heap in claim order)."""

    limit: int
    queues: tuple[str, ...] | None
    window: float = 0.0
    running: int = 0
    reserved: int = 0
    waiting: list[Waiting] = field(default_factory=list)
    ahead: Ahead = field(init=False)

    def __post_init__(self) -> None:
        self.ahead = Ahead(self.limit, self.window)

    @property
    def free(self) -> int:
        """Slots neither running a job nor taken by a claim in flight."""
        return self.limit - self.running - self.reserved

    @property
    def room(self) -> int:
        """How many more jobs a claim may take for this pool now: the free slots plus the
        claim-ahead allowance, less what already waits."""
        return self.free + self.ahead.allowance() - len(self.waiting)


def slot_pools(concurrency: int, spec: QueueSpec | None, window: float = 0.0) -> list[SlotPool]:
    """One pool per queue with its own number, plus one shared by the rest."""
    if not spec:
        return [SlotPool(concurrency, None, window)]
    pools = [SlotPool(limit, (name,), window) for name, limit in spec if limit is not None]
    shared = tuple(name for name, limit in spec if limit is None)
    if shared:
        pools.append(SlotPool(concurrency, shared, window))
    return pools


def new_processor_id() -> str:
    """host:pid:random — unique per daemon start."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything the engine needs, as plain values (built from Settings by the caller)."""

    database_url: str
    concurrency: int = 3
    queues: QueueSpec | None = None  # None: every queue, sharing ``concurrency``
    rate_limits: tuple[RateLimit, ...] = ()
    key_limits: tuple[KeyLimit, ...] = ()
    poll_interval: float = 5.0
    # claim ahead of free slots the jobs expected to start within this many seconds (0: none)
    prefetch_window: float = DEFAULT_PREFETCH_WINDOW_SECONDS
    lease_seconds: float = 30.0
    shutdown_grace: float = 30.0
    backoff_base: float = 10.0
    backoff_max: float = 3600.0
    retention_days: float = 14.0
    failed_retention_days: float = 30.0
    schedules: tuple[Schedule, ...] = ()  # periodic jobs (resolved: see services.schedules)
    processor_id: str = ""

    def __post_init__(self) -> None:
        for name in ("concurrency", "poll_interval", "lease_seconds", "backoff_base"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("shutdown_grace", "prefetch_window"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.processor_id:
            object.__setattr__(self, "processor_id", new_processor_id())


def _waiting_one_of(task_ids: frozenset[int]) -> Callable[[Waiting], bool]:
    """A ``_release_waiting`` selector: the waiting jobs whose id is in ``task_ids``."""
    return lambda entry: entry[2] in task_ids


class ProcessorEngine:
    """One daemon: ``await start()``, then ``await stop()`` (or ``run_until_stopped()``)."""

    def __init__(self, db: Database, registry: HandlerRegistry, config: EngineConfig) -> None:
        self.db = db
        self.config = config
        self.processor_id = config.processor_id
        self.executor = Executor(registry)
        # SQLite has one writer: a batch's ends and the next claim share one transaction
        # (the completer claims for the slots its jobs freed). PostgreSQL claims on its own
        # connection at once, in one statement, while the batch is being written.
        self._claims_alone = db.dialect == "postgresql"
        self.completer = Completer(
            db,
            processor_id=self.processor_id,
            policy=RetryPolicy(config.backoff_base, config.backoff_max),
            on_written=self._on_written,
            refill=None if self._claims_alone else self,
        )
        self.heartbeat = Heartbeat(
            db,
            processor_id=self.processor_id,
            lease_seconds=config.lease_seconds,
            held=self.held,
            stats=self.stats,
            register=self._register_in,
        )
        self.hostname = socket.gethostname()
        self.host_key = host_key()
        self.rescuer = Rescuer(
            db,
            lease_seconds=config.lease_seconds,
            processor_id=self.processor_id,
            host_key=self.host_key,
            hostname=self.hostname,
            held=self._ends_unwritten,
        )
        self.pruner = Pruner(
            db,
            retention_days=config.retention_days,
            failed_retention_days=config.failed_retention_days,
        )
        self.scheduler = Scheduler(db, config.schedules) if config.schedules else None
        self.processed = 0
        self.failed = 0
        self._running: dict[int, asyncio.Task[None]] = {}
        self._pools = slot_pools(config.concurrency, config.queues, config.prefetch_window)
        self._stale_after = max(STALE_AHEAD_SECONDS, 10 * config.prefetch_window)
        self._stale_timer: asyncio.TimerHandle | None = None
        self._capacity = sum(pool.limit for pool in self._pools)
        self._pool_of_queue = {q: p for p in self._pools for q in p.queues or ()}
        self._shared_pool = next((p for p in self._pools if p.queues is None), None)
        rates = {r.kind: r for r in config.rate_limits}
        keys = {k.kind: k for k in config.key_limits}
        self._limited = {kind: (rates.get(kind), keys.get(kind)) for kind in {*rates, *keys}}
        self._rate_timer: asyncio.TimerHandle | None = None
        self._rate_wait: float | None = None  # a claim found a rate limit spent (seconds)
        self._due: list[float] = []  # loop times when jobs this daemon wrote back are due
        self._due_timer: asyncio.TimerHandle | None = None
        self._next_due_asked = -NEXT_DUE_MIN_GAP_SECONDS  # loop time _wake_at_next_due read
        self._claiming_stopped = asyncio.Event()
        self._held: dict[int, ClaimedTask] = {}
        self._stop_reasons: dict[asyncio.Task[Any], StopReason] = {}  # per run
        # Per run: loop time it started, and when it was told to stop (_abandon_unstoppable)
        self._job_started: dict[asyncio.Task[Any], float] = {}
        self._stop_times: dict[asyncio.Task[Any], float] = {}
        self._begun: set[asyncio.Task[Any]] = set()  # runs whose _run_job has started
        # Runs given up on: told to stop (or timed out) and still running long after; by
        # task id too, so a claim of the same job while one runs on waits (settle)
        self._abandoned: set[asyncio.Task[Any]] = set()
        self._abandoned_ids: dict[int, asyncio.Task[Any]] = {}
        self._stall_ended = 0.0  # loop time the last stall of the event loop ended
        self._beat_lock = asyncio.Lock()  # one heartbeat at a time (the loop's, a stall's)
        self._renewing: dict[int, ClaimedTask] = {}
        # Loop time from which each held job's lease surely runs for a whole lease: when it
        # was claimed (settle, just after the claim's commit), then the start of each beat
        # that renewed it. The lease watch stops a job at that time plus the lease, even
        # while the heartbeat's statement hangs (a partition: no error comes back, and the
        # jobs would run on while another daemon runs them again).
        self._lease_from: dict[int, float] = {}
        self._wake_event = asyncio.Event()
        self._loops_stop = asyncio.Event()
        self._completer_stop = asyncio.Event()
        self._force = asyncio.Event()
        self._flushing = False  # stop() waits for the completer's last outcomes
        self._abandon_flush = asyncio.Event()
        self._stopped = asyncio.Event()
        self._stopping = False
        self._side_tasks: list[asyncio.Task[None]] = []
        self._claim_task: asyncio.Task[None] | None = None
        self.fatal: BaseException | None = None
        self._check_cancels = asyncio.Event()  # set: the heartbeat runs at once
        self._waker = make_waker(config.database_url, self.wake, self.cancel_announced)

    # --- public surface --------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Handlers running now."""
        return len(self._running)

    @property
    def capacity(self) -> int:
        """Handlers this daemon may run at once, over every pool."""
        return sum(p.limit for p in self._pools)

    @property
    def queues_label(self) -> str:
        """``*`` or the queues served, with their own limits (``ingest=2,default``)."""
        spec = self.config.queues
        if not spec:
            return "*"
        return ",".join(name if limit is None else f"{name}={limit}" for name, limit in spec)

    @property
    def stopping(self) -> bool:
        """True once shutdown began."""
        return self._stopping

    def held(self) -> list[tuple[int, int]]:
        """(id, attempt) of every job whose lease this daemon must keep renewing: running,
        claimed ahead, or ended but not yet written. Remembers which claim each pair was:
        the heartbeat's report names ids, and a job released (or snoozed for no time) and
        claimed back meanwhile is the same id and attempt but another claim."""
        self._renewing = dict(self._held)
        return [(t.id, t.attempt) for t in self._renewing.values()]

    @property
    def waiting(self) -> int:
        """Jobs claimed ahead that wait for a slot."""
        return sum(len(pool.waiting) for pool in self._pools)

    def stats(self) -> ProcessorStats:
        """Counters for the processors row."""
        state = ProcessorState.DRAINING if self._stopping else ProcessorState.RUNNING
        return ProcessorStats(self.in_flight, self.processed, self.failed, state)

    def wake(self) -> None:
        """Ask the claim loop to look for work now."""
        self._wake_event.set()

    def cancel_announced(self) -> None:
        """Someone asked for a running job to be cancelled (the waker heard it): when this
        daemon holds jobs, its heartbeat runs now, reads their cancel flags and stops the
        ones flagged, instead of at its next beat (up to a third of the lease away)."""
        if self._held:
            self._check_cancels.set()

    async def start(self) -> None:
        """Register this daemon, rescue what dead daemons left, start every loop."""
        await self._register()
        try:
            await self.rescuer.run_once()
        except Exception:
            logger.exception("start-up rescue failed; the rescuer loop will retry")
        stop = self._loops_stop
        self._spawn("completer", self.completer.run(self._completer_stop))
        self._spawn(
            "heartbeat",
            guarded_loop(
                "heartbeat",
                self._heartbeat_once,
                interval=self.heartbeat.interval,
                stop=stop,
                poke=self._check_cancels,
            ),
        )
        self._spawn(
            "rescuer",
            guarded_loop(
                "rescuer", self.rescuer.run_once, interval=self.rescuer.interval, stop=stop
            ),
        )
        self._spawn(
            "pruner",
            guarded_loop("pruner", self.pruner.run_once, interval=self.pruner.interval, stop=stop),
        )
        if self.scheduler is not None:
            self._spawn(
                "scheduler",
                guarded_loop(
                    "scheduler",
                    self.scheduler.run_once,
                    interval=self.scheduler.interval,
                    stop=stop,
                    run_first=True,
                    next_delay=self.scheduler.delay,
                ),
            )
        self._spawn("lease-watch", self._watch_leases(stop))
        if self._waker is not None:
            self._spawn("waker", self._waker.run(stop))
        self._claim_task = asyncio.create_task(self._claim_loop(), name="claimer")
        self._claim_task.add_done_callback(self._side_task_done)
        logger.info(
            "processor %s started: concurrency %d, queues %s, lease %.1f s",
            self.processor_id,
            self.capacity,
            self.queues_label,
            self.config.lease_seconds,
            extra={"action": "started", "processor_id": self.processor_id},
        )

    async def _register_in(self, session: AsyncSession) -> None:
        await queue.register_processor(
            session,
            processor_id=self.processor_id,
            hostname=self.hostname,
            pid=os.getpid(),
            version=__version__,
            concurrency=self.capacity,
            queues=self.queues_label,
            host_key=self.host_key,
        )

    async def _register(self) -> None:
        backoff = ErrorBackoff("register")
        while True:
            try:
                async with self.db.write_transaction() as session:
                    await self._register_in(session)
                return
            except Exception as exc:
                if not is_transient(exc):
                    raise
                await asyncio.sleep(backoff.failed(exc))

    async def run_until_stopped(self) -> None:
        """Wait until ``stop()`` has finished."""
        await self._stopped.wait()

    def request_stop(self) -> None:
        """From a signal handler: begin a graceful stop; a second call releases at once."""
        if self._stopping:
            if self._flushing:
                self._abandon_flush.set()  # see _flush_outcomes
                return
            logger.warning("second stop signal: releasing running jobs now")
            self._force.set()
            return
        asyncio.get_running_loop().create_task(self.stop(), name="shutdown")

    async def stop(self, grace: float | None = None) -> None:
        """Stop claiming, let jobs finish within ``grace``, release the rest, write every
        outcome, mark this daemon stopped."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        self._claiming_stopped.set()
        self._check_cancels.set()  # a beat now: the processors row says draining at once
        grace = self.config.shutdown_grace if grace is None else grace
        logger.info(
            "shutdown: claiming stopped; %d jobs get up to %.1f s to finish",
            self.in_flight,
            grace,
            extra={"action": "stopping", "processor_id": self.processor_id},
        )
        self.wake()
        if self._claim_task is not None:
            await asyncio.gather(self._claim_task, return_exceptions=True)
        if self._stale_timer is not None:
            self._stale_timer.cancel()
        if self._due_timer is not None:
            self._due_timer.cancel()
        self._release_waiting(lambda _: True)
        await self._drain(grace)
        self._completer_stop.set()
        await self._flush_outcomes()
        self._loops_stop.set()
        await asyncio.gather(*self._side_tasks, return_exceptions=True)
        await self._mark_stopped()
        self._stopped.set()
        logger.info(
            "processor %s stopped: %d completed, %d failed",
            self.processor_id,
            self.processed,
            self.failed,
            extra={"action": "stopped", "processor_id": self.processor_id},
        )

    # --- claiming and running --------------------------------------------------------------

    async def _claim_loop(self) -> None:
        backoff = ErrorBackoff("claimer")
        while not self._stopping:
            if self._claims_alone:
                # PostgreSQL claims on its own while batches are written, but not while
                # several daemons' worth of ends wait unwritten (the completer is slow or
                # failing): finished jobs that a crash would run again must not pile up.
                # Each written end wakes this loop.
                if self.completer.backlog >= COMPLETER_BACKLOG_LIMIT * self._capacity:
                    self._wake_event.clear()
                    await self._wait_for_wake(self.config.poll_interval)
                    continue
            elif self.completer.busy:
                # SQLite: the completer claims for the free slots in its own transaction:
                # one commit ends jobs and starts the next ones. A wake that came meanwhile
                # stays set, so work enqueued during its write is claimed right after.
                await self._wait_for_completer()
                continue
            self._wake_event.clear()
            slots = self.reserve()
            if slots:
                claimed: list[ClaimedTask] = []
                try:
                    claimed = await self._claim(slots)
                except Exception as exc:
                    if not is_transient(exc):
                        logger.exception("claimer: unexpected error")
                    await self._wait_for_wake(backoff.failed(exc), wakeable=False)
                    continue
                finally:
                    self.settle(slots, claimed)
                backoff.succeeded()
                if len(claimed) == sum(room.total for room in slots.values()):
                    continue
                await self._wake_at_next_due()  # room left: nothing else is due now
            await self._wait_for_wake(self.config.poll_interval)

    async def _wake_at_next_due(self) -> None:
        """Nothing more is due (a claim left room): when a task of this daemon's queues
        scheduled for later comes due before the next poll, wake then (a timer). A task
        enqueued for in two seconds starts then, not up to POLL_INTERVAL later, whether the
        daemon idles or runs other jobs; the enqueue's own wake (or the poll) brings the
        claim that asks. One read, an index seek per priority (~0.5 ms), at most every
        NEXT_DUE_MIN_GAP_SECONDS."""
        if self._stopping:
            return
        loop = asyncio.get_running_loop()
        since = loop.time() - self._next_due_asked
        if since < NEXT_DUE_MIN_GAP_SECONDS:
            # Many daemons woken by one NOTIFY each find nothing but one: they ask at most
            # this often, and look again when the gap has passed (a task scheduled for
            # later, enqueued meanwhile, is then seen that much later at most).
            self._wake_when_due(NEXT_DUE_MIN_GAP_SECONDS - since, dedupe=True)
            return
        self._next_due_asked = loop.time()
        queues = None
        if self._shared_pool is None:
            queues = sorted({q for pool in self._pools for q in pool.queues or ()})
        try:
            async with self.db.read_transaction() as session:
                seconds = await queue.next_due_in(session, queues=queues)
        except Exception as exc:
            if not is_transient(exc):
                logger.exception("claimer: could not read when the next task is due")
            return  # the poll finds it
        # 0: the database calls it later but it is due by the time it answered (or by
        # this host's reading of the text): the next claim or the poll takes it
        if seconds is not None and 0 < seconds < self.config.poll_interval:
            self._wake_when_due(seconds, dedupe=True)

    async def _wait_for_completer(self) -> None:
        idle = asyncio.ensure_future(self.completer.wait_idle())
        stopping = asyncio.ensure_future(self._claiming_stopped.wait())
        await asyncio.wait(
            {idle, stopping}, timeout=self.config.poll_interval, return_when=asyncio.FIRST_COMPLETED
        )
        idle.cancel()
        stopping.cancel()

    # --- slots (the completer's Refill) ------------------------------------------------------

    def reserve(self) -> dict[int, Room]:
        """Take the room of every pool for a claim: its free slots and its claim-ahead
        allowance (none while stopping)."""
        if self._stopping:
            return {}
        slots: dict[int, Room] = {}
        since = asyncio.get_running_loop().time()
        for index, pool in enumerate(self._pools):
            free, room = pool.free, pool.room
            if room > 0:
                slots[index] = Room(room, max(free, 0), since)
                pool.reserved += room
        return slots

    async def claim(self, session: AsyncSession, slots: Mapping[int, Room]) -> list[ClaimedTask]:
        """Claim up to the reserved room of each pool, in the caller's transaction; kinds
        with a rate or key limit only for free slots (their starts are counted when they are
        claimed, so they are never claimed ahead). It may run on the database's write thread
        (Database.run_write): it reads the engine's settings and leaves the rest to
        ``settle``."""
        claimed: list[ClaimedTask] = []
        for index, room in slots.items():
            where = self._where(index)
            if not self._limited:
                claimed += await queue.claim_tasks(session, limit=room.total, **where)
                continue
            claimed += await self._claim_with_limits(session, room, where)
        return claimed

    async def _claim_with_limits(
        self, session: AsyncSession, room: Room, where: dict[str, Any]
    ) -> list[ClaimedTask]:
        """One pool's claim when some kinds have flow limits: each limited kind's startable
        tasks are picked (its flow lock taken, in kind order on every daemon, so that two
        daemons never wait on each other's locks), then set against the first due tasks of
        the other kinds, and the free slots go to the highest priority of either, as one
        claim would give them (a limited kind of priority 10 waited behind any backlog of
        other kinds). Only free slots go to limited kinds; the rest of the room may claim
        ahead for the others."""
        limited = sorted(self._limited)
        free = min(room.total, room.free)
        if free <= 0:  # claiming ahead only: limited kinds never are (no flow locks taken)
            return await queue.claim_tasks(
                session, limit=room.total, exclude_kinds=limited, **where
            )
        where_queues = {k: v for k, v in where.items() if k in ("queues", "exclude_queues")}
        picks = []
        for kind in limited:
            rate, key = self._limited[kind]
            pick = await queue.pick_limited(
                session, kind=kind, limit=free, rate=rate, key=key, **where_queues
            )
            picks.append(pick)
            if pick.wait is not None:  # settle() sets the timer, on the event loop
                self._rate_wait = (
                    pick.wait if self._rate_wait is None else min(self._rate_wait, pick.wait)
                )
        others = await queue.peek_due(session, limit=free, exclude_kinds=limited, **where_queues)
        ranked = sorted(
            [(queue.claim_order(d), pick.kind) for pick in picks for d in pick.due]
            + [(queue.claim_order(d), None) for d in others]
        )[:free]
        takes = Counter(kind for _, kind in ranked if kind is not None)
        got = await queue.claim_tasks(
            session, limit=room.total - sum(takes.values()), exclude_kinds=limited, **where
        )
        for pick in picks:
            if takes[pick.kind]:
                got += await queue.claim_picked(session, pick, take=takes[pick.kind], **where)
        return got

    def _where(self, index: int) -> dict[str, Any]:
        pool = self._pools[index]
        return {
            "processor_id": self.processor_id,
            "lease_seconds": self.config.lease_seconds,
            "queues": pool.queues,
            "exclude_queues": None if pool.queues else tuple(self._pool_of_queue),
        }

    def _ends_unwritten(self) -> list[int]:
        """The held jobs that neither run nor wait to start: their outcome (a result, a
        failure, a release) waits in the completer to be written. The rescuer leaves these
        alone (its own daemon will write them); a running job whose lease expired is still
        its to take, as a job of any silent daemon is."""
        waiting = {entry[2] for pool in self._pools for entry in pool.waiting}
        return [t for t in self._held if t not in self._running and t not in waiting]

    def _wake_after(self, seconds: float) -> None:
        """A rate limit is spent: wake the claim loop when its window frees a start (no
        polling meanwhile)."""
        loop = asyncio.get_running_loop()
        due = loop.time() + seconds
        if self._rate_timer is not None and not self._rate_timer.cancelled():
            if self._rate_timer.when() <= due and self._rate_timer.when() > loop.time():
                return
            self._rate_timer.cancel()
        self._rate_timer = loop.call_at(due, self.wake)

    def _wake_when_due(self, seconds: float, *, dedupe: bool = False) -> None:
        """A job this daemon wrote back (a retry, a snooze) is due in ``seconds``: wake the
        claim loop then, not at the next poll (another daemon may claim it first: then
        this wake finds nothing, as any). ``dedupe``: not when a wake at or before then is
        set already (that claim finds nothing, asks again and sets the next)."""
        if self._stopping or len(self._due) >= MAX_DUE_TIMERS:
            return  # the poll still finds it
        loop = asyncio.get_running_loop()
        when = loop.time() + seconds + DUE_SLACK_SECONDS
        if dedupe and self._due and self._due[0] <= when:
            return
        heapq.heappush(self._due, when)
        self._arm_due()

    def _arm_due(self) -> None:
        if not self._due:
            return
        first = self._due[0]
        timer = self._due_timer
        if timer is not None and not timer.cancelled():
            if timer.when() <= first:
                return
            timer.cancel()
        self._due_timer = asyncio.get_running_loop().call_at(first, self._on_due)

    def _on_due(self) -> None:
        self._due_timer = None
        now = asyncio.get_running_loop().time()
        while self._due and self._due[0] <= now + DUE_SLACK_SECONDS:
            heapq.heappop(self._due)
        self.wake()
        self._arm_due()

    def settle(self, slots: Mapping[int, Room], claimed: Sequence[ClaimedTask]) -> None:
        """After a claim committed (or failed): give the slots back, start the jobs. A
        claim that lands after shutdown began is released at once, uncharged."""
        for index, room in slots.items():
            self._pools[index].reserved -= room.total
        if self._rate_wait is not None:
            wait, self._rate_wait = self._rate_wait, None
            self._wake_after(wait)
        if not claimed:
            return
        faults.fault_point("after_claim_commit")
        if self._waker is not None:
            self._waker.heat()
        if self._stopping:
            for task in claimed:
                self.completer.submit(Outcome(task, OutcomeKind.RELEASED, 0.0, ran=False))
            return
        now = asyncio.get_running_loop().time()
        # The leases started in the claim's transaction, after the room was taken (on
        # PostgreSQL at the transaction's start: now() is its clock).
        since = min((room.since for room in slots.values() if room.since is not None), default=now)
        for task in claimed:
            if task.id in self._running or task.id in self._abandoned_ids:
                # its last run (lease lost, or given up on) has not stopped yet
                # Back to pending uncharged, due a little later: released at once, it was
                # claimed again at once, hundreds of times a second (each claim a `started`
                # notification) until the old run ended.
                self.completer.submit(
                    Outcome(
                        task,
                        OutcomeKind.SNOOZED,
                        0.0,
                        snooze_seconds=STILL_RUNNING_DELAY_SECONDS,
                        ran=False,
                    )
                )
                continue
            self._held[task.id] = task
            self._lease_from[task.id] = since
            entry = (-task.priority, task.scheduled_at, task.id, now, task)
            heapq.heappush(self._pool_for(task).waiting, entry)
        for pool in self._pools:
            while pool.waiting and pool.running < pool.limit:
                self._start_job(heapq.heappop(pool.waiting)[-1], pool)
        if any(pool.waiting for pool in self._pools):
            self._watch_stale()

    def _pool_for(self, task: ClaimedTask) -> SlotPool:
        pool = self._pool_of_queue.get(task.queue, self._shared_pool)
        if pool is None:  # claims filter by queue: this cannot happen
            raise RuntimeError(f"task {task.id} of queue {task.queue!r} has no slot pool")
        return pool

    async def _claim(self, slots: Mapping[int, Room]) -> list[ClaimedTask]:
        if len(slots) == 1 and not self._limited and self.db.dialect == "postgresql":
            # One pool, no rate limits: one autocommitted statement (a pick-up's round
            # trips: 1 instead of BEGIN, claim, notifications, COMMIT).
            [(index, room)] = slots.items()
            async with self.db.engine.connect() as conn:
                got = await queue.claim_tasks_alone(conn, limit=room.total, **self._where(index))
            if got is not None:
                return got

        async def claim(session: AsyncSession) -> list[ClaimedTask]:
            # Notifications last: on PostgreSQL the feed's lock must be the transaction's
            # last lock (queue.pick_limited takes a flow lock per kind before it).
            async with notifications.deferred(session):
                return await self.claim(session, slots)

        def claim_here(conn: sqlite3.Connection, dialect: Dialect) -> list[ClaimedTask]:
            claimed: list[ClaimedTask] = []
            for index, room in slots.items():
                where = self._where(index)
                claimed += queue.claim_tasks_sqlite3(conn, dialect, limit=room.total, **where)
            return claimed

        # SQLite, no rate or key limits: the claims and their notifications on a bare
        # sqlite3 connection on this thread when the write lock is free (a pick-up waits on
        # them: the session's work and the write thread's hand-offs were ~1.2 ms of it).
        return await self.db.run_write(claim, here=None if self._limited else claim_here)

    async def _wait_for_wake(self, seconds: float, *, wakeable: bool = True) -> None:
        if self._stopping:
            return
        try:
            if wakeable:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for wraps the wait in a
                # task of its own, and a wake then resumes this loop an iteration or two
                # later (a pick-up waits on it).
                async with asyncio.timeout(seconds):
                    await self._wake_event.wait()
            else:
                await asyncio.sleep(seconds)
        except TimeoutError:
            pass

    def _start_job(self, task: ClaimedTask, pool: SlotPool) -> None:
        logger.info(
            "task %s (%s): started, attempt %d",
            task.id,
            task.kind,
            task.attempt,
            extra={
                "action": "job_started",
                "task_id": task.id,
                "kind": task.kind,
                "attempt": task.attempt,
            },
        )
        pool.running += 1
        job = asyncio.create_task(self._run_job(task), name=f"task-{task.id}")
        self._running[task.id] = job
        started = asyncio.get_running_loop().time()
        self._job_started[job] = started
        job.add_done_callback(lambda _: self._job_done(task, pool, job, started))

    async def _run_job(self, task: ClaimedTask) -> None:
        run = asyncio.current_task()
        if run is not None:
            self._begun.add(run)
        try:
            outcome = await self.executor.run(
                task,
                progress_sink=progress_sink(self.db, task, self.processor_id),
                stop_reason=lambda: None if run is None else self._stop_reasons.get(run),
            )
        except Exception as exc:
            # The executor turns whatever a handler does into an outcome; should it fail
            # itself, the job still gets one (without, it would stay held and renewed).
            logger.exception("task %s: the executor failed", task.id)
            outcome = Outcome(task, OutcomeKind.FAILED, 0.0, error=describe(exc))
        faults.fault_point("after_handler_before_complete")
        if run not in self._abandoned:  # given up on: its end was written then
            self.completer.submit(outcome)

    def _job_done(
        self, task: ClaimedTask, pool: SlotPool, job: asyncio.Task[None], started: float
    ) -> None:
        self._job_started.pop(job, None)
        self._stop_times.pop(job, None)
        began = job in self._begun
        self._begun.discard(job)
        if job in self._abandoned:  # its slot was freed when it was given up on
            self._abandoned.discard(job)
            if self._abandoned_ids.get(task.id) is job:
                del self._abandoned_ids[task.id]
            return
        if self._running.get(task.id) is job:  # not a later run of the same id
            del self._running[task.id]
        reason = self._stop_reasons.pop(job, None)
        if not began and reason is not None:
            # Told to stop (a cancel request the heartbeat brought, a lost lease) between
            # its start and its first step: cancelled there, _run_job never ran, so no
            # outcome was written and it stayed held, its lease renewed, for good.
            self.completer.submit(Outcome(task, REASON_TO_OUTCOME[reason], 0.0, ran=False))
        pool.running -= 1
        pool.ahead.freed(asyncio.get_running_loop().time() - started)
        if pool.waiting and not self._stopping:
            self._start_job(heapq.heappop(pool.waiting)[-1], pool)
        self.wake()

    # --- jobs claimed ahead --------------------------------------------------------------------

    def _release_waiting(
        self, which: Callable[[Waiting], bool], pools: Sequence[SlotPool] | None = None
    ) -> int:
        """Hand the waiting jobs ``which`` selects (of ``pools``, default all) back to
        pending, uncharged (through the completer, fenced like every end)."""
        released = 0
        for pool in self._pools if pools is None else pools:
            keep = [entry for entry in pool.waiting if not which(entry)]
            if len(keep) == len(pool.waiting):
                continue
            for entry in pool.waiting:
                if which(entry):
                    self.completer.submit(Outcome(entry[-1], OutcomeKind.RELEASED, 0.0, ran=False))
                    released += 1
            heapq.heapify(keep)
            pool.waiting = keep
        return released

    def _drop_waiting(self, task_id: int) -> ClaimedTask | None:
        """Take one job out of the waiting heaps (None when it is not waiting)."""
        for pool in self._pools:
            for i, entry in enumerate(pool.waiting):
                if entry[2] == task_id:
                    pool.waiting.pop(i)
                    heapq.heapify(pool.waiting)
                    return entry[-1]
        return None

    def _watch_stale(self) -> None:
        """Release, uncharged, jobs claimed ahead that waited ``_stale_after`` seconds in a
        pool that is stuck (every slot in a longer job than the allowance expected: it
        claims nothing ahead any more, so it does not claim them back). A pool still
        turning over keeps them: they wait for their turn by priority, as they would in the
        table."""
        if self._stale_timer is not None:
            return
        loop = asyncio.get_running_loop()
        oldest = min(entry[3] for pool in self._pools for entry in pool.waiting)
        due = max(oldest + self._stale_after, loop.time() + STALE_RECHECK_SECONDS)
        self._stale_timer = loop.call_at(due, self._release_stale)

    def _release_stale(self) -> None:
        self._stale_timer = None
        if self._stopping:
            return
        cutoff = asyncio.get_running_loop().time() - self._stale_after
        stuck = [pool for pool in self._pools if pool.ahead.allowance() == 0]
        released = self._release_waiting(lambda entry: entry[3] <= cutoff, stuck)
        if released:
            logger.info(
                "released %d jobs claimed ahead that waited %.1f s for a slot",
                released,
                self._stale_after,
                extra={"action": "released_waiting", "processor_id": self.processor_id},
            )
        if any(pool.waiting for pool in self._pools):
            self._watch_stale()

    def _stop_job(self, task_id: int, reason: StopReason) -> None:
        job = self._running.get(task_id)
        if job is None:
            waiting = self._drop_waiting(task_id)
            if waiting is not None:  # never started: its end, without running it
                self.completer.submit(Outcome(waiting, REASON_TO_OUTCOME[reason], 0.0, ran=False))
            return
        if job in self._stop_reasons:
            return
        self._stop_reasons[job] = reason
        self._stop_times[job] = asyncio.get_running_loop().time()
        held = self._held.get(task_id)
        logger.warning(
            "task %s: stopping (%s)",
            task_id,
            reason.value,
            extra={"action": "job_stopping", "task_id": task_id, "kind": held and held.kind},
        )
        job.cancel()

    def _on_written(self, outcome: Outcome, applied: bool) -> None:
        task = outcome.task
        if self._held.get(task.id) is task:  # not a later claim of the same job (a release
            del self._held[task.id]  # can be claimed back in the transaction that wrote it)
        if self._claims_alone:
            self.wake()  # the backlog shrank: the claim loop may be waiting on it
        if not applied:
            return
        if outcome.kind is OutcomeKind.COMPLETED:
            self.processed += 1
        elif outcome.kind is OutcomeKind.FAILED:
            self.failed += 1
            if outcome.retry_delay is not None:  # retried (or failed for good: no harm)
                self._wake_when_due(outcome.retry_delay)
        elif outcome.kind is OutcomeKind.SNOOZED:
            self._wake_when_due(outcome.snooze_seconds)
        # A run that failed is a WARNING (retried or not), so LOG_LEVEL=WARNING, which a
        # busy daemon runs with (two INFO lines a job), still shows every failure.
        final = None
        fate = ""
        if outcome.kind is OutcomeKind.FAILED:
            final = outcome.permanent or task.retry_count >= task.max_retries
            if outcome.permanent:
                fate = ", for good (permanent)"
            elif final:
                fate = f", for good ({task.max_retries} retries used)"
            else:
                fate = (
                    f", retry {task.retry_count + 1} of {task.max_retries}"
                    f" in {outcome.retry_delay or 0:.1f} s"
                )
        logger.log(
            logging.WARNING if outcome.kind is OutcomeKind.FAILED else logging.INFO,
            "task %s (%s): %s in %.3f s%s%s",
            task.id,
            task.kind,
            outcome.kind.value,
            outcome.duration,
            fate,
            f": {outcome.error.splitlines()[0]}" if outcome.error else "",
            extra={
                "action": f"job_{outcome.kind.value}",
                "task_id": task.id,
                "kind": task.kind,
                "attempt": task.attempt,
                **({} if final is None else {"final": final}),
            },
        )

    # --- heartbeat and shutdown --------------------------------------------------------------

    async def _heartbeat_once(self) -> HeartbeatResult:
        async with self._beat_lock:  # a stall's beat waits for the loop's, never overlaps
            return await self._beat()

    async def _beat(self) -> HeartbeatResult:
        problem = self.db.file_problem()
        if problem is not None and self.fatal is None:
            logger.critical(
                "%s: stopping (this daemon would go on writing to a file no one else reads);"
                " restart it, and see docs/operations.md for backups and restores",
                problem,
                extra={"action": "database_file_replaced", "processor_id": self.processor_id},
            )
            self.fatal = RuntimeError(problem)
            if not self._stopping:  # not a second stop signal: the shutdown goes on as it is
                self.request_stop()
            # What it writes goes to the old file, if anywhere: the exit must not wait for
            # it past the grace (no one would send the second signal that ends the wait).
            asyncio.get_running_loop().call_later(
                self.config.shutdown_grace + STOP_WRITE_TIMEOUT_SECONDS, self._abandon_flush.set
            )
        started = asyncio.get_running_loop().time()
        try:
            self._abandon_unstoppable()
            result = await self.heartbeat.run_once()
        except Exception:
            if self.heartbeat.lease_at_risk():
                self._release_waiting(lambda _: True)  # fenced: a no-op once rescued
                for task_id in list(self._running):
                    self._stop_job(task_id, StopReason.LEASE_LOST)
            raise
        renewed = self._renewing
        for task_id in result.renewed:
            if task_id in self._lease_from and self._held.get(task_id) is renewed.get(task_id):
                self._lease_from[task_id] = started
        for task_id in result.lost:
            if self._held.get(task_id) is not renewed.get(task_id):
                continue  # written meanwhile, or claimed back: the report is not about it
            self._stop_job(task_id, StopReason.LEASE_LOST)
            if task_id not in self._running:
                self._held.pop(task_id, None)
        for task_id in result.cancel_requested:
            if self._held.get(task_id) is renewed.get(task_id):
                self._stop_job(task_id, StopReason.CANCEL_REQUESTED)
        return result

    async def _watch_leases(self, stop: asyncio.Event) -> None:
        """Stop the jobs whose lease may have expired: no renewal for a whole lease since
        the time it surely ran from (``_lease_from``). Another daemon's rescuer may run them
        from then on; their ends are fenced either way, but the handler must not run on
        beside the new run. Its own timer: a heartbeat blocked on an unanswering database
        (a partition, a hung connection) says nothing until the driver's timeout."""
        lease = self.config.lease_seconds
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            now = loop.time()
            for task_id in [t for t in self._lease_from if t not in self._held]:
                del self._lease_from[task_id]
            lapsed = [t for t, since in self._lease_from.items() if since + lease <= now]
            if now - due >= LOOP_STALL_SECONDS:
                await self._after_stall(now - due, bool(lapsed))
                now = loop.time()
                lapsed = [t for t, since in self._lease_from.items() if since + lease <= now]
            if lapsed:
                waiting = {entry[2] for pool in self._pools for entry in pool.waiting}
                running = sum(1 for t in lapsed if t in self._running)
                ahead = sum(1 for t in lapsed if t in waiting)
                if running or ahead:
                    logger.warning(
                        "leases not renewed for %.1f s (the database is unreachable, locked or"
                        " full): stopping %d running jobs (rescued when it answers: run again,"
                        " a retry charged, or failed with none left) and releasing %d claimed"
                        " ahead; finished jobs' outcomes are written when it answers",
                        lease,
                        running,
                        ahead,
                        extra={"action": "leases_lapsed", "processor_id": self.processor_id},
                    )
                for task_id in lapsed:
                    del self._lease_from[task_id]
                # Claimed ahead and never started: back to pending uncharged (fenced, a
                # no-op if a rescuer took them); a lost lease would charge them a retry.
                self._release_waiting(_waiting_one_of(frozenset(lapsed)))
                for task_id in lapsed:
                    if task_id in self._running:
                        self._stop_job(task_id, StopReason.LEASE_LOST)
            first = min(self._lease_from.values(), default=now) + lease
            pause = max(LEASE_WATCH_MIN_SECONDS, min(first - now, lease / 3))
            due = now + pause
            if await sleep_or_stop(stop, pause):
                return

    async def _after_stall(self, seconds: float, lapsed: bool) -> None:
        """The event loop ran nothing for ``seconds`` (a handler running blocking code in an
        async def, or the host starved): say so, naming what ran; when leases seem to have
        lapsed, renew them first. A lease only this daemon's stall let lapse is renewed
        (fenced: a job another daemon's rescuer took is not) and its job goes on; stopping
        every job for it had charged the innocent ones a retry, or failed them."""
        self._stall_ended = asyncio.get_running_loop().time()
        kinds = sorted({self._held[t].kind for t in self._running if t in self._held})
        logger.warning(
            "the event loop was blocked for %.1f s (running: %s); a handler doing blocking"
            " work in an async def holds up every job, the heartbeat and the claims: run it"
            " with asyncio.to_thread or make the handler a plain def",
            seconds,
            ", ".join(kinds) or "no job",
            extra={"action": "loop_blocked", "processor_id": self.processor_id},
        )
        if not lapsed:
            return
        bound = min(STALL_RENEW_SECONDS, self.config.lease_seconds / 6)
        try:
            async with asyncio.timeout(bound):
                await self._heartbeat_once()
        except Exception as exc:  # the database too: the lapsed jobs are stopped as ever
            logger.warning(
                "leases not renewed after the stall: %s",
                error_line(exc),
                extra={"action": "leases_lapsed", "processor_id": self.processor_id},
            )

    async def _flush_outcomes(self) -> None:
        """Wait until every outcome is written (the completer retries them through a
        database outage), unless a stop signal comes meanwhile (the second, or the third
        when the second released the running jobs): then the ones not written are left, and
        their jobs are rescued when their leases expire (run again, as after a kill)."""
        self._flushing = True
        flushed = asyncio.ensure_future(self.completer.flush())
        abandon = asyncio.ensure_future(self._abandon_flush.wait())
        try:
            done, _ = await asyncio.wait(
                {flushed, abandon},
                timeout=FLUSH_NOTICE_SECONDS,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if not done:  # say why the exit waits, and how to end the wait
                logger.warning(
                    "shutdown: waiting for %d outcomes (results, failures, releases) to be"
                    " written (the database is slow or not answering); another stop signal"
                    " abandons them, and their jobs run again",
                    self.completer.backlog,
                    extra={"action": "outcomes_waiting", "processor_id": self.processor_id},
                )
                await asyncio.wait({flushed, abandon}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            flushed.cancel()
            abandon.cancel()
        left = self.completer.backlog
        if left:
            for task in self._side_tasks:
                if task.get_name() == "completer":
                    task.cancel()  # it would retry them until written
            logger.warning(
                "shutdown: %d outcomes not written (another stop signal); their jobs run "
                "again once their leases expire",
                left,
                extra={"action": "outcomes_abandoned", "processor_id": self.processor_id},
            )

    async def _drain(self, grace: float) -> None:
        jobs = set(self._running.values())
        if jobs:
            all_done = asyncio.ensure_future(asyncio.wait(jobs))
            force = asyncio.ensure_future(self._force.wait())
            await asyncio.wait(
                {all_done, force}, timeout=grace, return_when=asyncio.FIRST_COMPLETED
            )
            all_done.cancel()
            force.cancel()
        for task_id in list(self._running):
            self._stop_job(task_id, StopReason.SHUTDOWN)
        left = set(self._running.values())
        if left:
            await asyncio.wait(left, timeout=UNSTOPPABLE_SECONDS)
            self._abandon_unstoppable(at_once=True)

    def _abandon_unstoppable(self, *, at_once: bool = False) -> None:
        """Give up on runs that do not end when told to: stopped (a cancel, a lost lease,
        the shutdown) UNSTOPPABLE_SECONDS ago, or past their timeout by as much (the
        timeout's cancellation swallowed too), or, ``at_once``, every run still going (the
        shutdown waited for them). A handler that catches CancelledError and carries on
        had held its slot, its lease (renewed) and the shutdown for ever. Its end is
        written now, as the stop would have (a timeout: failed), its slot freed; the
        coroutine runs on in this process, and what it returns later is dropped."""
        now = asyncio.get_running_loop().time()
        if not at_once and now - self._stall_ended < UNSTOPPABLE_SECONDS:
            return  # a stop or a deadline that fell in a stall: the runs have not run since
        for task_id, job in list(self._running.items()):
            task = self._held.get(task_id)
            if task is None or job.done():
                continue
            reason = self._stop_reasons.get(job)
            told = self._stop_times.get(job)
            started = self._job_started.get(job, now)
            overdue = now - started - task.timeout_seconds
            if reason is not None and (
                at_once or (told is not None and now - told >= UNSTOPPABLE_SECONDS)
            ):
                outcome = Outcome(
                    task, REASON_TO_OUTCOME[reason], now - started, error=f"stopped: {reason.value}"
                )
                what = f"told to stop ({reason.value}) {now - (told or now):.1f} s ago"
            elif reason is None and overdue >= UNSTOPPABLE_SECONDS:
                error = (
                    f"timed out after {task.timeout_seconds} s, and the handler did not stop"
                    " when cancelled (does it catch CancelledError and carry on?): given up on,"
                    " not retried (a retry would run beside it)"
                )
                outcome = Outcome(
                    task, OutcomeKind.FAILED, now - started, error=error, permanent=True
                )
                what = f"past its timeout by {overdue:.1f} s"
            else:
                continue
            logger.error(
                "task %s (%s): still running, %s; given up on: its slot is freed and its end"
                " written, the handler runs on in this process (it swallows"
                " CancelledError?) and what it returns is dropped",
                task_id,
                task.kind,
                what,
                extra={"action": "job_abandoned", "task_id": task_id, "kind": task.kind},
            )
            self._abandoned.add(job)
            self._abandoned_ids[task_id] = job
            del self._running[task_id]
            self._stop_reasons.pop(job, None)
            pool = self._pool_for(task)
            pool.running -= 1
            self.completer.submit(outcome)
            if pool.waiting and not self._stopping:
                self._start_job(heapq.heappop(pool.waiting)[-1], pool)
            self.wake()

    async def _mark_stopped(self) -> None:
        try:
            async with asyncio.timeout(STOP_WRITE_TIMEOUT_SECONDS):
                async with self.db.write_transaction() as session:
                    await queue.touch_processor(
                        session,
                        processor_id=self.processor_id,
                        in_flight=0,
                        processed=self.processed,
                        failed=self.failed,
                        state=ProcessorState.STOPPED,
                    )
        except Exception as exc:
            logger.warning("could not mark the processors row stopped (%s)", error_line(exc))

    def _spawn(self, name: str, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._side_task_done)
        self._side_tasks.append(task)

    def _side_task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self._stopping:
            return
        exc = task.exception()
        logger.critical(
            "%s loop ended unexpectedly (%r); stopping the daemon", task.get_name(), exc
        )
        self.fatal = exc or RuntimeError(f"{task.get_name()} loop ended")
        self.request_stop()
