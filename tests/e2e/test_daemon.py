"""The daemon as a real process: drain, retries, cancel, start-up errors, sd_notify, a lost
lease, logs. Kills, signals, timeouts, a stale daemon, poison jobs and outages are in
tests/reliability (with the ledger and the invariant checker)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import delete, func, select, update

from app.db import Database
from app.models import AnalysisNotification, PendingAnalysis, Processor
from app.services import queue
from app.services.analysis import analyze_chapter
from tests import pg
from tests.e2e.daemon import REPO, Daemon
from tests.helpers import all_in, enqueue_many, eventually, task_row

pytestmark = [pytest.mark.e2e]
Spawn = Callable[..., Daemon]


async def test_drains_200_chapter_analyses_with_exact_notifications(
    db: Database, spawn: Spawn
) -> None:
    texts = [
        f"Chapter {i} begins. It has {i} words maybe.\n\nThe end of part {i}." for i in range(200)
    ]
    async with db.write_transaction() as s:
        ids = [
            r.id
            for r in await queue.enqueue_tasks(
                s,
                [
                    {"kind": "chapter_analysis", "user_id": "u1", "payload": {"text": t}}
                    for t in texts
                ],
            )
        ]
    daemon = spawn(max_concurrent="10")
    await eventually(lambda: all_in(db, "completed", 200), within=90)
    assert daemon.stop() == 0
    async with db.read_transaction() as s:
        rows = (
            await s.execute(
                select(PendingAnalysis.id, PendingAnalysis.result, PendingAnalysis.token_usage)
            )
        ).all()
        notes = Counter(
            dict(
                (
                    await s.execute(
                        select(AnalysisNotification.type, func.count()).group_by(
                            AnalysisNotification.type
                        )
                    )
                ).all()
            )
        )
        proc = (await s.scalars(select(Processor))).one()
    by_id = {r.id: (r.result, r.token_usage) for r in rows}
    for task_id, text in zip(ids, texts, strict=True):
        expected = analyze_chapter(text)
        assert by_id[task_id] == (expected, expected["word_count"])
    # started, progress at 0 %, 33 %, 67 % and 100 % (each a step of 10 points or more), completed
    assert notes == Counter({"started": 200, "progress": 800, "completed": 200})
    assert (proc.state, proc.processed, proc.failed, proc.in_flight) == ("stopped", 200, 0, 0)


async def _finished(db: Database, task_id: int) -> PendingAnalysis | None:
    row = await task_row(db, task_id)
    return row if queue.is_finished(row.status) else None


async def test_retries_then_fails_with_notifications(db: Database, spawn: Spawn) -> None:
    [task_id] = await enqueue_many(db, "fail", 1, max_retries=2)
    [perm] = await enqueue_many(db, "fail", 1, max_retries=2, payload={"permanent": True})
    [unknown] = await enqueue_many(db, "no_such_kind", 1)
    spawn()
    row = await eventually(lambda: _finished(db, task_id), within=30)
    assert (row.status, row.attempts, row.retry_count) == ("failed", 3, 2)
    assert row.error is not None and row.error.startswith("RuntimeError: boom on attempt 3")
    row = await eventually(lambda: _finished(db, perm), within=30)
    assert (row.status, row.attempts, row.error) == ("failed", 1, "PermanentError: bad input")
    row = await eventually(lambda: _finished(db, unknown), within=30)
    assert row.status == "failed" and "no handler registered for kind 'no_such_kind'" in (
        row.error or ""
    )
    async with db.read_transaction() as s:
        types = (
            await s.scalars(
                select(AnalysisNotification.type)
                .where(AnalysisNotification.task_id == task_id)
                .order_by(AnalysisNotification.id)
            )
        ).all()
    assert types == ["started", "retrying", "started", "retrying", "started", "failed"]


async def test_cancel_pending_and_running(db: Database, spawn: Spawn) -> None:
    [running] = await enqueue_many(db, "sleep", 1, payload={"seconds": 60})
    daemon = spawn(max_concurrent="1")
    await eventually(lambda: all_in(db, "processing", 1), within=20)
    [pending] = await enqueue_many(db, "noop", 1)
    async with db.write_transaction() as s:
        assert await queue.request_cancel(s, pending) is queue.CancelOutcome.CANCELLED
        assert await queue.request_cancel(s, running) is queue.CancelOutcome.REQUESTED
    row = await eventually(lambda: _finished(db, running), within=10)
    assert row.status == "cancelled"
    assert (await task_row(db, pending)).status == "cancelled"
    assert daemon.stop() == 0


async def test_a_cancel_request_stops_a_running_job_at_once(db: Database, spawn: Spawn) -> None:
    """Not at the next heartbeat (a third of the lease: 20 s here), but when the request is
    committed: the daemon hears it (doorbell or NOTIFY) and reads its jobs' flags then."""
    [running] = await enqueue_many(db, "sleep", 1, payload={"seconds": 60})
    daemon = spawn(max_concurrent="2", lease_seconds="60")
    await eventually(lambda: all_in(db, "processing", 1), within=20)
    await asyncio.sleep(0.5)  # the daemon settled: whatever beat came with the claim is done
    async with db.write_transaction() as s:
        assert await queue.request_cancel(s, running) is queue.CancelOutcome.REQUESTED
    row = await eventually(lambda: _finished(db, running), within=5)
    assert row.status == "cancelled"
    [after] = await enqueue_many(db, "noop", 1)  # the daemon goes on
    assert (await eventually(lambda: _finished(db, after), within=10)).status == "completed"
    assert daemon.stop() == 0


async def test_a_handler_raising_a_base_exception_fails_its_job(db: Database, spawn: Spawn) -> None:
    """Not held in processing (its lease renewed) for as long as the daemon lives."""
    [task_id] = await enqueue_many(db, "base_exception", 1, max_retries=1)
    daemon = spawn()
    row = await eventually(lambda: _finished(db, task_id), within=30)
    assert (row.status, row.attempts, row.retry_count) == ("failed", 2, 1)
    assert row.error is not None and row.error.startswith("LibraryInterrupt: attempt 2")
    assert daemon.stop() == 0


async def test_shutdown_does_not_wait_for_a_handlers_to_thread_work(
    db: Database, spawn: Spawn
) -> None:
    """A job whose handler waits on asyncio.to_thread work is released at the end of the
    grace period, and the daemon exits then: the thread, which nothing can stop, is left
    (logged), where the daemon used to wait for it (60 s here)."""
    [task_id] = await enqueue_many(db, "to_thread_sleep", 1, payload={"seconds": 60})
    daemon = spawn(shutdown_grace="1")
    await eventually(lambda: all_in(db, "processing", 1), within=20)
    await asyncio.sleep(0.3)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(15) == 0
    row = await task_row(db, task_id)
    assert (row.status, row.attempts, row.retry_count) == ("pending", 0, 0)
    assert "still running: their jobs already ended or were released" in daemon.log()


async def _progress_is(db: Database, task_id: int, message: str) -> bool:
    return (await task_row(db, task_id)).progress_message == message


async def test_unmigrated_database_exits_with_a_hint(tmp_path: Path) -> None:
    daemon = Daemon(f"sqlite+aiosqlite:///{tmp_path}/empty.db", tmp_path).start()
    assert daemon.wait(30) == 1
    assert "async-processor migrate" in daemon.log()
    assert not (tmp_path / "empty.db").exists()


async def test_a_login_the_database_refuses_stops_the_start(
    tmp_path: Path, pg_available: bool
) -> None:
    """No such database (3D000; a wrong password is class 28 alike): a setting to fix, not
    an outage to wait out. Exit 2 (a bad setting, which the unit does not restart) with one
    line naming it (it retried, never READY, until systemd's start timeout killed it)."""
    if not pg_available:
        pytest.skip("PostgreSQL not reachable")
    url = pg.url_for("async_processor_no_such_database")
    daemon = Daemon(url, tmp_path).start()
    assert daemon.wait(30) == 2
    log = daemon.log()
    assert "cannot start: ASYNC_PROCESSOR_DATABASE_URL: the database refused the login (" in log
    assert 'database "async_processor_no_such_database" does not exist' in log
    assert "Traceback" not in log


async def test_a_stop_while_the_database_is_unreachable_ends_the_wait(tmp_path: Path) -> None:
    """The daemon waits for an unreachable database (logging its retries); SIGTERM ends
    that wait with exit 0 and a line saying so, not a traceback (nor a silent 143)."""
    daemon = Daemon("postgresql+asyncpg://postgres@127.0.0.1:1/x", tmp_path).start()
    await eventually(lambda: _logged(daemon, "startup: database error"), within=20)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(20) == 0
    log = daemon.log()
    assert "stopped before the database could be reached" in log and "Traceback" not in log


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_a_stop_while_the_daemon_registers_ends_its_start(
    db: Database, database_url: str, tmp_path: Path
) -> None:
    """The schema can be read but the daemon cannot register (another connection holds
    SQLite's write lock): it retries; a SIGTERM then ends the start with exit 0, where the
    signal reached an engine still starting and the daemon went on retrying for good."""
    import sqlite3

    path = database_url.split("///", 1)[1]
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        daemon = Daemon(database_url, tmp_path).start()
        await eventually(lambda: _logged(daemon, "register: database error"), within=30)
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
    finally:
        holder.rollback()
        holder.close()
    log = daemon.log()
    assert "stopped while starting" in log and "Traceback" not in log


async def test_a_daemon_says_which_handlers_it_runs_and_warns_when_none(
    db: Database, spawn: Spawn
) -> None:
    daemon = spawn()
    await eventually(lambda: _logged(daemon, " started: concurrency"), within=20)
    [line] = [x for x in daemon.log().splitlines() if "app.processor: handlers: " in x]
    kinds = line.split("handlers: ", 1)[1].split(", ")
    assert kinds == sorted(kinds) and {"base_exception", "chapter_analysis", "fail"} <= set(kinds)
    assert daemon.stop() == 0
    none = spawn(handler_modules=",,")
    await eventually(lambda: _logged(none, " started: concurrency"), within=20)
    assert "no handlers registered" in none.log() and none.stop() == 0


async def test_a_database_url_the_driver_refuses_is_a_bad_setting(tmp_path: Path) -> None:
    daemon = Daemon("postgresql+asyncpg://postgres@127.0.0.1/x?sslmode=require", tmp_path).start()
    assert daemon.wait(30) == 2
    log = daemon.log()
    assert "ASYNC_PROCESSOR_DATABASE_URL" in log and "sslmode" in log and "Traceback" not in log


async def _logged(daemon: Daemon, text: str) -> bool:
    return text in daemon.log()


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_sd_notify_ready_watchdog_stopping(database_url: str, tmp_path: Path) -> None:
    import socket

    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(20)
    daemon = Daemon(
        database_url,
        tmp_path,
        "notify",
        extra_env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"},
    ).start()
    try:
        messages = [sock.recv(64).decode()]
        assert messages == ["READY=1"]
        assert sock.recv(64).decode() == "WATCHDOG=1"
        daemon.signal(signal.SIGTERM)
        while messages[-1] != "STOPPING=1":
            messages.append(sock.recv(64).decode())
        assert daemon.wait(30) == 0
    finally:
        daemon.kill()
        sock.close()


@pytest.mark.parametrize("engine_name", ["sqlite"])
@pytest.mark.parametrize(
    ("module", "code", "cause"),
    [
        # the setting names a module that does not exist: a bad setting, 2
        ("tests.e2e.no_such_module", 2, "No module named 'tests.e2e.no_such_module'"),
        ("no_such_package.handlers", 2, "No module named 'no_such_package'"),
        # the module exists and fails while importing: an error, 1
        ("tests.e2e.broken_handlers", 1, "No module named 'no_such_dependency_of_the_handlers'"),
        ("tests.e2e.exiting_handlers", 1, "SystemExit: 0 (at "),
        # it disables the daemon's loggers first: the report was lost, the log empty
        (
            "tests.e2e.logging_config_broken_handlers",
            1,
            "No module named 'no_such_dependency_of_the_logging_handlers'",
        ),
    ],
)
async def test_handler_module_that_fails_to_import_stops_the_daemon(
    database_url: str, tmp_path: Path, module: str, code: int, cause: str
) -> None:
    daemon = Daemon(database_url, tmp_path, handler_modules=module).start()
    assert daemon.wait(30) == code
    assert f"cannot import handler module {module!r}" in daemon.log()
    assert cause in daemon.log()


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_a_misspelled_setting_is_logged_at_start(db: Database, spawn: Spawn) -> None:
    daemon = spawn(max_concurrency="10")
    await asyncio.to_thread(daemon.wait_for_log, "started: concurrency", 20)
    assert daemon.stop() == 0
    [line] = [x for x in daemon.log().splitlines() if "is not a setting" in x]
    assert "WARNING" in line and "did you mean ASYNC_PROCESSOR_MAX_CONCURRENT?" in line


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_a_task_left_behind_that_calls_sys_exit_does_not_end_the_daemon(
    db: Database, spawn: Spawn
) -> None:
    """A handler starts a task and returns; the task calls sys.exit(2) outside any job. The
    SystemExit left the event loop and ended the daemon at once: no shutdown, its jobs
    left to expire and be charged a retry, and with status 2 systemd's
    RestartPreventExitStatus=2 kept it down. It is logged and the daemon carries on."""
    [left] = await enqueue_many(db, "leave_exiting_task", 1, payload={"after": 0.3, "code": 2})
    daemon = spawn()
    assert (await eventually(lambda: _finished(db, left), within=30)).status == "completed"
    await asyncio.to_thread(daemon.wait_for_log, "raised SystemExit(2)", 20)
    [after] = await enqueue_many(db, "noop", 1)
    assert (await eventually(lambda: _finished(db, after), within=30)).status == "completed"
    assert daemon.stop() == 0
    assert "stopped: 2 completed, 0 failed" in daemon.log()


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_a_handler_module_that_configures_logging_keeps_the_daemons_log(
    db: Database, spawn: Spawn
) -> None:
    """The module calls logging.config.dictConfig as it is imported, which disables every
    logger that exists and is not named (the daemon's): its log held nothing at all, not
    even a job's failure. Its loggers are enabled again, with a warning, and write through
    the handler the application configured."""
    [task_id] = await enqueue_many(db, "configured_fail", 1, max_retries=0)
    daemon = spawn(handler_modules="tests.e2e.logging_config_handlers")
    row = await eventually(lambda: _finished(db, task_id), within=30)
    assert row.status == "failed"
    assert daemon.stop() == 0
    lines = daemon.log().splitlines()
    warned = [line for line in lines if "loggers as it was imported (" in line]
    assert len(warned) == 1 and warned[0].startswith("APPLOG WARNING"), warned
    assert "app.processor" in warned[0] and "asyncio" in warned[0]  # asyncio's lines too
    failed = [line for line in lines if f"task {task_id} (configured_fail): failed" in line]
    assert len(failed) == 1, lines
    assert failed[0].startswith("APPLOG ") and "the failure the operator must see" in failed[0]
    assert any(line.startswith("APPLOG INFO app.processor: processor ") for line in lines)


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_lost_lease_stops_jobs_without_completing_them(
    db: Database, spawn: Spawn, database_url: str, tmp_path: Path
) -> None:
    import sqlite3

    ledger = tmp_path / "ledger.jsonl"
    [task_id] = await enqueue_many(db, "sleep", 1, payload={"seconds": 4, "ledger": str(ledger)})
    daemon = spawn(lease_seconds="1.5")
    await eventually(lambda: _progress_is(db, task_id, "sleeping"), within=20)
    locker = sqlite3.connect(database_url.split("///", 1)[1], timeout=10, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")  # no renewal can get through for longer than a lease
    await asyncio.to_thread(daemon.wait_for_log, "stopping (lease_lost)", 30)
    locker.execute("ROLLBACK")
    locker.close()
    row = await eventually(lambda: _finished(db, task_id), within=40)
    assert (row.status, row.attempts) == ("completed", 2)
    runs = [json.loads(line) for line in ledger.read_text().splitlines()]
    assert [(r["attempt"], r["event"]) for r in runs] == [(1, "start"), (2, "start"), (2, "end")]
    assert daemon.stop() == 0


async def test_a_handler_blocking_the_loop_past_a_lease_costs_the_others_nothing(
    db: Database, spawn: Spawn
) -> None:
    """An async handler that blocks the event loop for longer than a lease: when the loop
    runs again the daemon says so, renews the leases its own stall let lapse (nobody else
    took them), and the job beside it runs on, once, uncharged (it used to be stopped as a
    lost lease, run again with a retry charged, or failed with none left)."""
    [beside] = await enqueue_many(db, "sleep", 1, payload={"seconds": 6}, max_retries=0)
    daemon = spawn(max_concurrent="2", lease_seconds="2")
    await eventually(lambda: _progress_is(db, beside, "sleeping"), within=20)
    [blocker] = await enqueue_many(db, "block_loop", 1, payload={"seconds": 3.5})
    row = await eventually(lambda: _finished(db, beside), within=30)
    assert (row.status, row.attempts, row.retry_count) == ("completed", 1, 0)
    blocked = await eventually(lambda: _finished(db, blocker), within=10)
    assert (blocked.status, blocked.attempts) == ("completed", 1)
    assert "the event loop was blocked for" in daemon.log()
    assert "block_loop" in daemon.log()
    assert "stopping (lease_lost)" not in daemon.log()
    assert daemon.stop() == 0


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_a_handlers_chdir_leaves_a_relative_sqlite_path_on_its_file(
    db: Database, database_url: str, tmp_path: Path
) -> None:
    """DATABASE_URL with a relative path (the default's ./data/…) and a handler that
    changes the working directory: the jobs after it still run, on the same file (new
    connections had opened an empty database in the handler's directory, "no such table"
    for ever, while the heartbeat kept the held jobs' leases alive)."""
    absolute = database_url.split("///", 1)[1]
    relative = os.path.relpath(absolute, REPO)  # noqa: ASYNC240 (no I/O: a path's text)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    [moved] = await enqueue_many(db, "chdir", 1, payload={"to": str(elsewhere)})
    daemon = Daemon(f"sqlite+aiosqlite:///{relative}", tmp_path, "relative").start()
    try:
        assert (await eventually(lambda: _finished(db, moved), within=20)).status == "completed"
        after = await enqueue_many(db, "noop", 3)
        for task_id in after:
            row = await eventually(lambda t=task_id: _finished(db, t), within=20)
            assert row.status == "completed"
        assert list(elsewhere.iterdir()) == []
        assert daemon.stop() == 0
    finally:
        daemon.kill()


@pytest.mark.parametrize("engine_name", ["sqlite"])  # the engine's own bookkeeping
async def test_a_running_job_set_back_to_pending_by_hand_is_not_claimed_in_a_loop(
    db: Database, spawn: Spawn
) -> None:
    """An operator sets a running job's row back to pending: the daemon claims it while the
    old run is still stopping, and puts it back for a second each time (it released it at
    once and claimed it again, hundreds of times a second, a `started` notification each),
    then runs it once the old run has stopped. The claims it put back never ran: their
    `started` notifications are taken back, so its owner sees the two runs, no more."""
    [task_id] = await enqueue_many(db, "sleep", 1, payload={"seconds": 4})
    daemon = spawn(lease_seconds="3", poll_interval="0.2")
    await eventually(lambda: _progress_is(db, task_id, "sleeping"), within=20)
    async with db.write_transaction() as s:
        await s.execute(
            update(PendingAnalysis).where(PendingAnalysis.id == task_id).values(status="pending")
        )
    row = await eventually(lambda: _finished(db, task_id), within=30)
    assert row.status == "completed"
    async with db.read_transaction() as s:
        started = await s.scalar(
            select(func.count())
            .select_from(AnalysisNotification)
            .where(AnalysisNotification.task_id == task_id, AnalysisNotification.type == "started")
        )
    assert started == 2, started
    assert daemon.stop() == 0


@pytest.mark.parametrize("engine_name", ["sqlite"])  # the engine's part: a plain failure
async def test_a_handler_that_swallows_cancellation_is_given_up_on(
    db: Database, spawn: Spawn
) -> None:
    """A handler that catches CancelledError and carries on: past its timeout it is given
    up on (failed, its slot freed: the job beside it runs), and at shutdown one that will
    not stop is released and the daemon exits, as does one whose handler left such a task
    behind (each had held the daemon for ever, deaf to further signals)."""
    [timed] = await enqueue_many(db, "stubborn", 1, timeout_seconds=1, max_retries=0)
    daemon = spawn(max_concurrent="1")
    row = await eventually(lambda: _finished(db, timed), within=30)
    assert row.status == "failed" and row.error is not None
    assert "did not stop when cancelled" in row.error
    [left] = await enqueue_many(db, "leave_stubborn_task", 1)
    assert (await eventually(lambda: _finished(db, left), within=20)).status == "completed"
    [held] = await enqueue_many(db, "stubborn", 1)
    await eventually(lambda: all_in(db, "processing", 1), within=20)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(30) == 0
    row = await task_row(db, held)
    assert (row.status, row.attempts, row.retry_count) == ("pending", 0, 0)
    assert "given up on" in daemon.log()
    assert "ignored cancellation" in daemon.log()


async def test_a_daemon_whose_processors_row_is_deleted_registers_again(
    db: Database, spawn: Spawn
) -> None:
    """An operator deletes a live daemon's processors row: at its next beat it is back
    (running, its counters kept), and said so; it had run on unseen by the status views."""
    daemon = spawn()
    await eventually(lambda: _logged(daemon, " started: concurrency"), within=20)
    [done] = await enqueue_many(db, "noop", 1)
    await eventually(lambda: _finished(db, done), within=20)
    async with db.write_transaction() as s:
        await s.execute(delete(Processor))

    async def back() -> Processor | None:
        async with db.read_transaction() as s:
            return (await s.execute(select(Processor))).scalar_one_or_none()

    row = await eventually(back, within=20)
    assert (row.state, row.pid) == ("running", daemon.pid)
    assert (await eventually(lambda: _processed(db, 1), within=20)) is True
    assert "processors row was gone (deleted?): registered again" in daemon.log()
    assert daemon.stop() == 0


async def _processed(db: Database, count: int) -> bool:
    async with db.read_transaction() as s:
        return (await s.scalar(select(Processor.processed))) == count


async def test_a_restarted_daemon_takes_back_its_killed_predecessors_jobs_at_once(
    db: Database, spawn: Spawn, tmp_path: Path
) -> None:
    """A daemon SIGKILLed in the middle of two jobs whose leases run for 60 s: the daemon
    started after it on this machine sees no process with its predecessor's pid and gives
    the jobs back as it starts, so they are done long before any lease would have let
    them be rescued; each run is charged and said: the "daemon gone" retrying note."""
    ledger = tmp_path / "ledger.jsonl"
    ids = await enqueue_many(db, "sleep", 2, payload={"seconds": 2, "ledger": str(ledger)})
    first = spawn(lease_seconds="60", max_concurrent="2")

    async def both_sleeping() -> bool:
        return all([await _progress_is(db, task_id, "sleeping") for task_id in ids])

    await eventually(both_sleeping, within=20)
    first.kill()  # SIGKILL, and reaped: no process has its pid
    second = spawn(lease_seconds="60", max_concurrent="2")
    await eventually(lambda: all_in(db, "completed", 2), within=30)  # the leases: 60 s
    async with db.read_transaction() as s:
        predecessor = await s.scalar(select(Processor.id).where(Processor.pid == first.pid))
    second.wait_for_log(f"processor {predecessor} is gone")
    assert second.stop() == 0
    for task_id in ids:
        row = await task_row(db, task_id)
        assert (row.status, row.attempts, row.retry_count) == ("completed", 2, 1)
    runs = [json.loads(line) for line in ledger.read_text().splitlines()]
    for task_id in ids:
        events = [(r["attempt"], r["event"]) for r in runs if r["task_id"] == task_id]
        assert events == [(1, "start"), (2, "start"), (2, "end")]
    async with db.read_transaction() as s:
        retrying = (
            await s.execute(
                select(AnalysisNotification.task_id, AnalysisNotification.message).where(
                    AnalysisNotification.type == "retrying"
                )
            )
        ).all()
        states = dict((await s.execute(select(Processor.pid, Processor.state))).all())
    assert sorted(retrying) == [(t, queue.DAEMON_GONE_ERROR + "; retrying.") for t in ids]
    assert states == {first.pid: "stopped", second.pid: "stopped"}


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_json_logs_one_line_per_state_change(db: Database, spawn: Spawn) -> None:
    ids = await enqueue_many(db, "noop", 3)
    daemon = spawn(log_format="json", poll_interval="0.05")
    await eventually(lambda: all_in(db, "completed", 3), within=20)
    await asyncio.sleep(0.5)  # ten idle polls: they must not log
    assert daemon.stop() == 0
    lines = [json.loads(line) for line in daemon.log().splitlines()]
    jobs = [entry for entry in lines if "task_id" in entry]
    assert sorted((e["task_id"], e["action"]) for e in jobs) == sorted(
        (task_id, action) for task_id in ids for action in ("job_started", "job_completed")
    )
    assert all(e["kind"] == "noop" and e["processor_id"] == jobs[0]["processor_id"] for e in jobs)
    assert len(lines) == len(jobs) + 4  # its handlers, the daemon started, stopping, stopped
