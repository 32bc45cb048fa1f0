"""The daemon's engine: slots, the claim loop, and the loops it supervises.

Slots: at most ``concurrency`` handlers run at once; a slot refills the moment any job
ends (its done-callback wakes the claim loop), and a claim takes only as many tasks as
there are free slots, in one statement. Outcomes go to the Completer; leases are renewed
by the Heartbeat until each outcome is written.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from app import __version__
from app.db import Database
from app.models import ProcessorState
from app.services import queue
from app.services.handlers import HandlerRegistry
from app.services.processor.completer import Completer, RetryPolicy
from app.services.processor.executor import Executor, Outcome, OutcomeKind, StopReason
from app.services.processor.heartbeat import Heartbeat, HeartbeatResult, ProcessorStats
from app.services.processor.looper import ErrorBackoff, guarded_loop, is_transient
from app.services.processor.progress import progress_sink
from app.services.processor.pruner import Pruner
from app.services.processor.rescuer import Rescuer
from app.services.processor.waker import make_waker
from app.services.queue import ClaimedTask

logger = logging.getLogger("app.processor")
STOP_WRITE_TIMEOUT_SECONDS = 5.0


def new_processor_id() -> str:
    """host:pid:random — unique per daemon start."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything the engine needs, as plain values (built from Settings by the caller)."""

    database_url: str
    concurrency: int = 3
    queues: tuple[str, ...] | None = None
    poll_interval: float = 5.0
    lease_seconds: float = 30.0
    shutdown_grace: float = 30.0
    backoff_base: float = 10.0
    backoff_max: float = 3600.0
    retention_days: float = 14.0
    failed_retention_days: float = 30.0
    processor_id: str = ""

    def __post_init__(self) -> None:
        for name in ("concurrency", "poll_interval", "lease_seconds", "backoff_base"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.shutdown_grace < 0:
            raise ValueError(f"shutdown_grace must be >= 0, got {self.shutdown_grace}")
        if not self.processor_id:
            object.__setattr__(self, "processor_id", new_processor_id())


class ProcessorEngine:
    """One daemon: ``await start()``, then ``await stop()`` (or ``run_until_stopped()``)."""

    def __init__(self, db: Database, registry: HandlerRegistry, config: EngineConfig) -> None:
        self.db = db
        self.config = config
        self.processor_id = config.processor_id
        self.executor = Executor(registry)
        self.completer = Completer(
            db,
            processor_id=self.processor_id,
            policy=RetryPolicy(config.backoff_base, config.backoff_max),
            on_written=self._on_written,
        )
        self.heartbeat = Heartbeat(
            db,
            processor_id=self.processor_id,
            lease_seconds=config.lease_seconds,
            held=self.held,
            stats=self.stats,
        )
        self.rescuer = Rescuer(db, lease_seconds=config.lease_seconds)
        self.pruner = Pruner(
            db,
            retention_days=config.retention_days,
            failed_retention_days=config.failed_retention_days,
        )
        self.processed = 0
        self.failed = 0
        self._running: dict[int, asyncio.Task[None]] = {}
        self._held: dict[int, ClaimedTask] = {}
        self._stop_reasons: dict[int, StopReason] = {}
        self._wake_event = asyncio.Event()
        self._loops_stop = asyncio.Event()
        self._completer_stop = asyncio.Event()
        self._force = asyncio.Event()
        self._stopped = asyncio.Event()
        self._stopping = False
        self._side_tasks: list[asyncio.Task[None]] = []
        self._claim_task: asyncio.Task[None] | None = None
        self.fatal: BaseException | None = None
        self._waker = make_waker(config.database_url, self.wake)

    # --- public surface --------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Handlers running now."""
        return len(self._running)

    @property
    def stopping(self) -> bool:
        """True once shutdown began."""
        return self._stopping

    def held(self) -> list[tuple[int, int]]:
        """(id, attempt) of every job whose lease this daemon must keep renewing."""
        return [(t.id, t.attempt) for t in self._held.values()]

    def stats(self) -> ProcessorStats:
        """Counters for the processors row."""
        state = ProcessorState.DRAINING if self._stopping else ProcessorState.RUNNING
        return ProcessorStats(self.in_flight, self.processed, self.failed, state)

    def wake(self) -> None:
        """Ask the claim loop to look for work now."""
        self._wake_event.set()

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
                "heartbeat", self._heartbeat_once, interval=self.heartbeat.interval, stop=stop
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
        if self._waker is not None:
            self._spawn("waker", self._waker.run(stop))
        self._claim_task = asyncio.create_task(self._claim_loop(), name="claimer")
        self._claim_task.add_done_callback(self._side_task_done)
        logger.info(
            "processor %s started: concurrency %d, queues %s, lease %.1f s",
            self.processor_id,
            self.config.concurrency,
            ",".join(self.config.queues or ("*",)),
            self.config.lease_seconds,
            extra={"action": "started", "processor_id": self.processor_id},
        )

    async def _register(self) -> None:
        backoff = ErrorBackoff("register")
        while True:
            try:
                async with self.db.write_transaction() as session:
                    await queue.register_processor(
                        session,
                        processor_id=self.processor_id,
                        hostname=socket.gethostname(),
                        pid=os.getpid(),
                        version=__version__,
                        concurrency=self.config.concurrency,
                        queues=",".join(self.config.queues or ("*",)),
                    )
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
        await self._drain(grace)
        self._completer_stop.set()
        await self.completer.flush()
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
            self._wake_event.clear()
            free = self.config.concurrency - len(self._running)
            if free > 0:
                try:
                    claimed = await self._claim(free)
                except Exception as exc:
                    if not is_transient(exc):
                        logger.exception("claimer: unexpected error")
                    await self._wait_for_wake(backoff.failed(exc), wakeable=False)
                    continue
                backoff.succeeded()
                if claimed and self._waker is not None:
                    self._waker.heat()
                for task in claimed:
                    self._start_job(task)
                if len(claimed) == free:
                    continue
            await self._wait_for_wake(self.config.poll_interval)

    async def _claim(self, limit: int) -> list[ClaimedTask]:
        async with self.db.write_transaction() as session:
            return await queue.claim_tasks(
                session,
                processor_id=self.processor_id,
                limit=limit,
                lease_seconds=self.config.lease_seconds,
                queues=self.config.queues,
            )

    async def _wait_for_wake(self, seconds: float, *, wakeable: bool = True) -> None:
        if self._stopping:
            return
        try:
            if wakeable:
                await asyncio.wait_for(self._wake_event.wait(), timeout=seconds)
            else:
                await asyncio.sleep(seconds)
        except TimeoutError:
            pass

    def _start_job(self, task: ClaimedTask) -> None:
        self._held[task.id] = task
        logger.info(
            "task %s: started (attempt %d)",
            task.id,
            task.attempt,
            extra={"action": "job_started", "task_id": task.id, "kind": task.kind},
        )
        job = asyncio.create_task(self._run_job(task), name=f"task-{task.id}")
        self._running[task.id] = job
        job.add_done_callback(lambda _: self._job_done(task.id))

    async def _run_job(self, task: ClaimedTask) -> None:
        outcome = await self.executor.run(
            task,
            progress_sink=progress_sink(self.db, task, self.processor_id),
            stop_reason=lambda: self._stop_reasons.get(task.id),
        )
        self.completer.submit(outcome)

    def _job_done(self, task_id: int) -> None:
        self._running.pop(task_id, None)
        self._stop_reasons.pop(task_id, None)
        self.wake()

    def _stop_job(self, task_id: int, reason: StopReason) -> None:
        job = self._running.get(task_id)
        if job is None or task_id in self._stop_reasons:
            return
        self._stop_reasons[task_id] = reason
        held = self._held.get(task_id)
        logger.warning(
            "task %s: stopping (%s)",
            task_id,
            reason.value,
            extra={"action": "job_stopping", "task_id": task_id, "kind": held and held.kind},
        )
        job.cancel()

    def _on_written(self, outcome: Outcome, applied: bool) -> None:
        self._held.pop(outcome.task.id, None)
        if not applied:
            return
        if outcome.kind is OutcomeKind.COMPLETED:
            self.processed += 1
        elif outcome.kind is OutcomeKind.FAILED:
            self.failed += 1
        task = outcome.task
        logger.info(
            "task %s: %s in %.3f s%s",
            task.id,
            outcome.kind.value,
            outcome.duration,
            f": {outcome.error.splitlines()[0]}" if outcome.error else "",
            extra={"action": f"job_{outcome.kind.value}", "task_id": task.id, "kind": task.kind},
        )

    # --- heartbeat and shutdown --------------------------------------------------------------

    async def _heartbeat_once(self) -> HeartbeatResult:
        try:
            result = await self.heartbeat.run_once()
        except Exception:
            if self.heartbeat.lease_at_risk():
                for task_id in list(self._running):
                    self._stop_job(task_id, StopReason.LEASE_LOST)
            raise
        for task_id in result.lost:
            self._stop_job(task_id, StopReason.LEASE_LOST)
            if task_id not in self._running:
                self._held.pop(task_id, None)
        for task_id in result.cancel_requested:
            self._stop_job(task_id, StopReason.CANCEL_REQUESTED)
        return result

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
            await asyncio.wait(left)

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
            logger.warning("could not mark the processors row stopped (%s)", exc)

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
