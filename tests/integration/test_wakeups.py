"""SQLite's doorbell (app.services.wakeups): an enqueue wakes the daemon's waker at once,
not at its next data_version read."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from app.db import Database
from app.services import queue
from app.services import wakeups as wakeups_module
from app.services.processor import waker as waker_module
from app.services.processor.waker import SQLiteWaker
from app.services.wakeups import CANCEL, MAX_SOCKET_PATH, Bell, Doorbell, bell_dir

pytestmark = pytest.mark.parametrize("engine_name", ["sqlite"])


async def _waker_with_slow_poll(
    db_file: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[SQLiteWaker, asyncio.Event, asyncio.Event, asyncio.Task[None]]:
    # data_version is read every 30 s here: a wake within seconds can only be the bell.
    monkeypatch.setattr(waker_module, "DATA_VERSION_IDLE_INTERVAL_SECONDS", 30.0)
    monkeypatch.setattr(waker_module, "DATA_VERSION_HOT_INTERVAL_SECONDS", 30.0)
    woke, stop = asyncio.Event(), asyncio.Event()
    waker = SQLiteWaker(db_file, woke.set)
    runner = asyncio.create_task(waker.run(stop))
    for _ in range(100):
        if list(bell_dir(db_file).glob("*.sock")):
            break
        await asyncio.sleep(0.01)
    return waker, woke, stop, runner


async def test_an_enqueue_rings_the_bell_at_commit(
    db: Database, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db_file = Path(db.engine.url.database or "")
    waker, woke, stop, runner = await _waker_with_slow_poll(db_file, monkeypatch)
    try:
        async with db.write_transaction() as s:
            await queue.enqueue_task(s, kind="noop")
            await asyncio.sleep(0.2)
            assert not woke.is_set()  # not before the commit
        await asyncio.wait_for(woke.wait(), timeout=5)
        assert waker.rings == 1
        woke.clear()
        # A rolled-back enqueue rings nothing.
        with pytest.raises(RuntimeError):
            async with db.write_transaction() as s:
                await queue.enqueue_task(s, kind="noop")
                raise RuntimeError("rolled back")
        # Another process's enqueue rings too (the API, the CLI).
        code = (
            "import asyncio\n"
            "from app.db import Database\n"
            "from app.services import queue\n"
            "async def main():\n"
            f"    db = Database.from_url({database_url!r})\n"
            "    async with db.write_transaction() as s:\n"
            "        await queue.enqueue_task(s, kind='noop')\n"
            "    await db.dispose()\n"
            "asyncio.run(main())\n"
        )
        await asyncio.to_thread(subprocess.run, [sys.executable, "-c", code], check=True)
        await asyncio.wait_for(woke.wait(), timeout=5)
        assert waker.rings == 2
    finally:
        stop.set()
        await runner
    assert list(bell_dir(db_file).glob("*.sock")) == []  # the doorbell is removed on stop


async def test_an_applications_own_session_rings_the_bell_at_commit(
    db: Database, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The library contract: enqueue inside the application's own transaction, on its own
    engine and sessions (not app.db.Database); its commit still wakes the daemons."""
    db_file = Path(db.engine.url.database or "")
    waker, woke, stop, runner = await _waker_with_slow_poll(db_file, monkeypatch)
    engine = create_async_engine(database_url)
    try:
        async with async_sessionmaker(engine)() as s:
            await queue.enqueue_task(s, kind="noop")
            await s.rollback()  # nothing to wake for
            await queue.enqueue_task(s, kind="noop")
            savepoint = await s.begin_nested()
            await savepoint.rollback()  # the enqueue before it still commits
            await asyncio.sleep(0.2)
            assert not woke.is_set()
            await s.commit()
        await asyncio.wait_for(woke.wait(), timeout=5)
        assert waker.rings == 1
    finally:
        await engine.dispose()
        stop.set()
        await runner


async def test_enqueues_alone_ring_the_bell_once_each(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An enqueue as a transaction of its own rings after its commit, whichever way it went:
    one row on the bare connection, many through a session, a keyed one through
    enqueue_tasks (which rings at its commit, not twice)."""
    db_file = Path(db.engine.url.database or "")
    waker, woke, stop, runner = await _waker_with_slow_poll(db_file, monkeypatch)
    try:
        for rings, call in enumerate(
            [
                lambda: queue.enqueue_task_alone(db, kind="noop"),
                lambda: queue.enqueue_tasks_alone(db, [{"kind": "noop"}] * 3),
                lambda: queue.enqueue_tasks_alone(db, [{"kind": "noop", "idempotency_key": "k"}]),
            ],
            start=1,
        ):
            await call()
            await asyncio.wait_for(woke.wait(), timeout=5)
            woke.clear()
            await asyncio.sleep(0.1)  # a second datagram would have arrived by now
            assert waker.rings == rings
    finally:
        stop.set()
        await runner


async def test_a_manual_retry_rings_the_bell(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    async with db.write_transaction() as s:
        task = await queue.enqueue_task(s, kind="noop")
        await queue.request_cancel(s, task.id)
    db_file = Path(db.engine.url.database or "")
    waker, woke, stop, runner = await _waker_with_slow_poll(db_file, monkeypatch)
    try:
        async with db.write_transaction() as s:
            await queue.retry_task(s, task.id)
        await asyncio.wait_for(woke.wait(), timeout=5)
        assert waker.rings == 1
    finally:
        stop.set()
        await runner


def test_a_long_path_is_reached_through_proc_and_dead_doorbells_are_reaped(
    tmp_path: Path, engine_name: str
) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    db_file = deep / "queue.db"
    assert len(str(bell_dir(db_file) / "x.sock")) > MAX_SOCKET_PATH
    # A doorbell left by a process that is gone (pid of an exited child).
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    bell_dir(db_file).mkdir()
    stale = bell_dir(db_file) / f"{child.stdout.strip()}-deadbeef.sock"
    stale.touch()
    door = Doorbell(db_file)
    assert door.open()
    try:
        assert not stale.exists()
        [mine] = list(bell_dir(db_file).glob("*.sock"))
        assert mine.name.startswith(f"{os.getpid()}-")
        bell = Bell(db_file)
        try:
            assert bell.ring() == 1
            assert bell.ring() == 1
            assert door.drain() == 2 and not door.cancel_rung
            assert door.drain() == 0
            # a cancel request's ring carries its word; the next drain forgets it
            assert (bell.ring(), bell.ring(CANCEL), bell.ring()) == (1, 1, 1)
            assert door.drain() == 3 and door.cancel_rung
            assert door.drain() == 0 and not door.cancel_rung
        finally:
            bell.close()
    finally:
        door.close()
    assert list(bell_dir(db_file).glob("*.sock")) == []
    # No daemon, no directory: ringing is a no-op.
    assert Bell(tmp_path / "other.db").ring() == 0


def test_the_bell_lists_the_directory_again_whenever_it_changes(
    tmp_path: Path, engine_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ring reuses its listing while the directory is unchanged, and only once the
    directory's last change is settled (older than the filesystem's timestamp tick could
    hide); a daemon that starts or stops in between is seen by the very next ring."""
    db_file = tmp_path / "queue.db"
    scans: list[int] = []
    real_scandir = os.scandir

    def counting_scandir(path: Any) -> Any:
        scans.append(1)
        return real_scandir(path)

    monkeypatch.setattr(wakeups_module.os, "scandir", counting_scandir)
    first = Doorbell(db_file)
    assert first.open()
    bell = Bell(db_file)
    try:
        scans.clear()
        assert (bell.ring(), bell.ring()) == (1, 1)
        assert len(scans) == 2  # the change is fresh: not trusted yet, listed each time
        settled = time.time_ns() - 10 * wakeups_module.TRUST_AFTER_NS
        os.utime(bell_dir(db_file), ns=(settled, settled))
        assert (bell.ring(), bell.ring(), bell.ring()) == (1, 1, 1)
        assert len(scans) == 3  # settled: listed once, then reused
        second = Doorbell(db_file)
        assert second.open()
        try:
            assert bell.ring() == 2  # a new daemon: the directory changed
            assert (first.drain(), second.drain()) == (6, 1)
        finally:
            second.close()
        assert bell.ring() == 1  # it left: changed again
        assert first.drain() == 1
    finally:
        bell.close()
        first.close()
