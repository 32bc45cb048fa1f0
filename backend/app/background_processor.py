"""The daemon: ``python -m app.background_processor`` (or ``async-processor processor``).

Composition root: settings → engine → handlers → schema check → signals → sd_notify → run.
Exit codes: 0 after a graceful stop, 1 on a fatal error or an unmigrated database,
2 on a bad setting or schedule (a bad cron expression, an unknown kind).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from app.config import QueueSpec, Settings, SettingsError, load_settings, unknown_settings
from app.db import Database, login_refused
from app.logs import PROCESS_CONTEXT, setup_logging
from app.schema import BadDatabaseURL, SchemaError, check_migrated
from app.services import faults
from app.services.async_analysis_processor import EngineConfig, ProcessorEngine
from app.services.handlers import (
    REGISTRY,
    HandlerImportError,
    ScheduleError,
    import_handler_modules,
)
from app.services.processor.looper import ErrorBackoff, is_transient
from app.services.schedules import resolve_schedules, schedule_defaults
from app.text import error_line

logger = logging.getLogger("app.processor")


def sd_notify(message: str) -> bool:
    """Send a message to systemd's notify socket, when there is one."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(message.encode())
        return True
    return False


def watchdog_interval() -> float | None:
    """Half of systemd's WatchdogSec, when the unit sets it for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1_000_000 / 2


async def _watchdog(interval: float) -> None:
    while True:
        sd_notify("WATCHDOG=1")
        await asyncio.sleep(interval)


async def _wait_for_schema(db: Database) -> None:
    """Check the schema; retry while the database is unreachable, fail when unmigrated."""
    backoff = ErrorBackoff("startup")
    while True:
        try:
            await check_migrated(db.engine)
            return
        except SchemaError as exc:
            cause = exc.__cause__
            if cause is not None and login_refused(cause):
                # a setting to fix: exit 2, which the unit does not restart
                raise BadDatabaseURL(
                    f"the database refused the login ({error_line(cause)})"
                ) from cause
            if cause is None or not is_transient(cause):
                raise
            await asyncio.sleep(backoff.failed(cause))


async def _until_stopped(work: Coroutine[Any, Any, None], stop: asyncio.Event) -> bool:
    """Run ``work`` unless ``stop`` is set first (then cancel it); whether it finished."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return False
    task.result()  # its error, if any
    return True


def engine_config(
    settings: Settings,
    *,
    concurrency: int | None = None,
    poll_interval: float | None = None,
    queues: QueueSpec | None = None,
) -> EngineConfig:
    """Settings (and CLI overrides) → the engine's plain configuration."""
    return EngineConfig(
        database_url=settings.database_url,
        concurrency=concurrency or settings.max_concurrent,
        queues=queues or settings.queues or None,
        rate_limits=settings.rate_limits,
        key_limits=settings.key_limits,
        poll_interval=poll_interval or settings.poll_interval,
        prefetch_window=settings.prefetch_window,
        lease_seconds=settings.lease_seconds,
        shutdown_grace=settings.shutdown_grace,
        backoff_base=settings.retry_backoff_base,
        backoff_max=settings.retry_backoff_max,
        retention_days=settings.retention_days,
        failed_retention_days=settings.failed_retention_days,
    )


async def serve(settings: Settings, config: EngineConfig) -> int:
    """Run the daemon until a signal stops it; returns the exit code."""
    faults.warn_if_armed(logger)
    try:
        import_handler_modules(settings.handler_modules)
    except HandlerImportError as exc:
        logger.critical("%s", exc)
        return 2 if exc.bad_setting or isinstance(exc.__cause__, ScheduleError) else 1
    if REGISTRY.kinds():
        logger.info("handlers: %s", ", ".join(REGISTRY.kinds()), extra={"action": "handlers"})
    else:  # e.g. HANDLER_MODULES=",," or a package whose handlers live in submodules
        logger.warning(
            "no handlers registered (ASYNC_PROCESSOR_HANDLER_MODULES=%s): every job this "
            "daemon claims fails with 'no handler registered'",
            ",".join(settings.handler_modules),
            extra={"action": "no_handlers"},
        )
    try:
        periodic = resolve_schedules(REGISTRY, settings.schedules, **schedule_defaults(settings))
    except ScheduleError as exc:
        logger.critical("cannot start: %s", exc)
        return 2
    config = dataclasses.replace(config, schedules=tuple(periodic))
    db = Database.from_url(
        settings.database_url,
        pool_size=5,
        pre_ping=False,
        write_thread=True,
        sqlite_synchronous=settings.sqlite_synchronous,
    )
    loop = asyncio.get_running_loop()
    started: list[ProcessorEngine] = []  # the engine, once start() returned
    stop_before_start = asyncio.Event()

    def on_signal() -> None:
        sd_notify("STOPPING=1")
        if started:
            started[0].request_stop()
        else:
            stop_before_start.set()  # waiting for the database, or starting: give up

    # Before the wait for the database, which lasts as long as it is unreachable, and the
    # engine's start, which retries its registration as long: a stop then ends them (exit
    # 0, logged) instead of killing the process mid-step, or being lost in a retry loop.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        try:
            if not await _until_stopped(_wait_for_schema(db), stop_before_start):
                logger.info("stopped before the database could be reached")
                return 0
        except BadDatabaseURL as exc:
            logger.critical("cannot start: ASYNC_PROCESSOR_DATABASE_URL: %s", exc)
            return 2
        except SchemaError as exc:
            logger.critical("cannot start: %s", exc)
            return 1
        engine = ProcessorEngine(db, REGISTRY, config)
        PROCESS_CONTEXT["processor_id"] = engine.processor_id
        if not await _until_stopped(engine.start(), stop_before_start):
            await engine.stop(grace=0)  # nothing runs yet; marks its row stopped (bounded)
            logger.info("stopped while starting")
            return 0
        started.append(engine)
        sd_notify("READY=1")
        interval = watchdog_interval()
        dog = asyncio.create_task(_watchdog(interval), name="watchdog") if interval else None
        await engine.run_until_stopped()
        if dog is not None:
            dog.cancel()
        return 1 if engine.fatal is not None else 0
    finally:
        await db.dispose()


#: How long a thread holding the GIL keeps it while another waits (CPython's default is
#: 5 ms). Plain ``def`` handlers run in threads, and a CPU-bound one holds the GIL for whole
#: intervals: the event loop, and the heartbeat with it, waits for one at every step (on
#: SQLite each statement also hops to aiosqlite's thread and back). With six such threads
#: the heartbeat's largest gap measured 2.6-2.8 s on SQLite against a 3 s lease (beat every
#: second) at 5 ms, 1.4 s at 0.5 ms; drains of no-op jobs did not change (docs/reliability.md,
#: finding 2).
SWITCH_INTERVAL_SECONDS = 0.0005


def run(
    *,
    concurrency: int | None = None,
    poll_interval: float | None = None,
    queues: QueueSpec | None = None,
) -> int:
    """Load settings, configure logging, run the daemon; returns the exit code."""
    try:
        settings = load_settings()
        config = engine_config(
            settings, concurrency=concurrency, poll_interval=poll_interval, queues=queues
        )
    except (SettingsError, ValueError) as exc:
        print(f"async-processor: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_format)
    for message in unknown_settings():
        logger.warning("%s", message, extra={"action": "unknown_setting"})
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
    capacity = config.concurrency + sum(n or 0 for _, n in config.queues or ())
    return run_loop(serve(settings, config), max(32, 4 * capacity))


R = TypeVar("R")

#: The name of the default executor's threads (handlers' ``asyncio.to_thread`` work).
POOL_THREAD_PREFIX = "handler-pool"
#: How long the exit waits for that pool's threads to end once the daemon has stopped.
POOL_EXIT_WAIT_SECONDS = 1.0


#: at exit, how long tasks still running get to end once cancelled
EXIT_TASKS_WAIT_SECONDS = 2.0


def _run_past_stray_exits(loop: asyncio.AbstractEventLoop, main: asyncio.Future[R]) -> R:
    """``loop.run_until_complete(main)``, carried on past a SystemExit that another task
    raised. asyncio lets SystemExit out of the loop from any task, so one a handler started
    and left running (``sys.exit()`` in it, or when it is cancelled at exit) ended the
    daemon on the spot: no shutdown, its jobs left to expire and be charged a retry, and
    with status 2 systemd's ``RestartPreventExitStatus=2`` kept it down. Only ``main``'s
    own SystemExit (the daemon's) is raised. (KeyboardInterrupt is left alone: before the
    signal handlers are installed it is the operator's Ctrl-C.)"""
    while True:
        try:
            return loop.run_until_complete(main)
        except SystemExit as exc:
            if main.done() and not main.cancelled() and main.exception() is exc:
                raise
            logger.error(
                "a task outside any job (one a handler started and left running?) raised"
                " SystemExit(%s): ignored, the daemon carries on",
                exc.code,
                extra={"action": "stray_exit"},
            )


def run_loop(main: Coroutine[Any, Any, int], pool_threads: int) -> int:
    """``asyncio.run(main)``, with a default executor of ``pool_threads`` (asyncio's default
    is min(32, CPUs + 4): six here, fewer than ten jobs at once each needing one), and an
    exit that does not wait for threads of that pool still busy after the daemon stopped.
    A handler's ``asyncio.to_thread`` work cannot be stopped: a job timed out or released at
    shutdown is over for the daemon, but its thread runs on, and asyncio.run (and Python's
    exit) waited for it, however long after SHUTDOWN_GRACE. The daemon's jobs are written
    or released by then; such threads are left (logged), the process exits."""
    pool = ThreadPoolExecutor(max_workers=pool_threads, thread_name_prefix=POOL_THREAD_PREFIX)
    loop = asyncio.new_event_loop()
    loop.set_default_executor(pool)
    asyncio.set_event_loop(loop)
    busy = 0
    try:
        code = _run_past_stray_exits(loop, loop.create_task(main))
    finally:
        try:
            left = asyncio.all_tasks(loop)
            for task in left:
                task.cancel()
            if left:
                # Bounded: a task that catches CancelledError and carries on (a handler's
                # own, or one it left behind) had kept the process alive after it said it
                # had stopped, deaf to further signals.
                waiting = loop.create_task(asyncio.wait(left, timeout=EXIT_TASKS_WAIT_SECONDS))
                done, stuck = _run_past_stray_exits(loop, waiting)
                for task in done:
                    if not task.cancelled():
                        task.exception()  # retrieved: no "never retrieved" noise
                if stuck:
                    logger.warning(
                        "exiting with %d task(s) that ignored cancellation (%s): not waiting",
                        len(stuck),
                        ", ".join(sorted(t.get_name() for t in stuck)),
                        extra={"action": "tasks_left"},
                    )
            _run_past_stray_exits(loop, loop.create_task(loop.shutdown_asyncgens()))
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            # before the loop closes: work ending meanwhile still finds it open
            busy = _busy_pool_threads(POOL_EXIT_WAIT_SECONDS)
            asyncio.set_event_loop(None)
            loop.close()
    if busy:
        logger.warning(
            "exiting with %d handler thread(s) (asyncio.to_thread work) still running: "
            "their jobs already ended or were released; not waiting for them",
            busy,
            extra={"action": "threads_left"},
        )
        logging.shutdown()  # flush the log and the streams, which os._exit would not
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)
    return code


def _busy_pool_threads(wait: float) -> int:
    """How many of the default executor's threads are still alive after up to ``wait``
    seconds (idle ones end at once once the pool is shut down)."""
    deadline = time.monotonic() + wait
    threads = [t for t in threading.enumerate() if t.name.startswith(POOL_THREAD_PREFIX)]
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return sum(thread.is_alive() for thread in threads)


def main() -> None:
    """Entry point of ``python -m app.background_processor``."""
    try:
        code = run()
    except KeyboardInterrupt:  # before the signal handlers were installed
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
