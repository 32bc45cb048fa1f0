"""Wake the engine within milliseconds of an enqueue from any process.

SQLite: enqueuers ring this daemon's doorbell after their commit (app.services.wakeups), and
the event loop, watching that socket, wakes the engine at once. ``PRAGMA data_version``
changes when another connection commits; reading it costs microseconds and no table read, so
a thread polls it too (the fallback for writers without the bell: an operator's ``sqlite3``,
a library older than the bell).
PostgreSQL: LISTEN on the channel the insert trigger notifies.
The engine's poll interval stays the fallback for both.

A cancel request for a running job rings (SQLite) or notifies (PostgreSQL) with a word of its
own: the waker then calls ``on_cancel`` too, and the engine checks its jobs' cancel flags at
once instead of at its next heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from app.db import sqlite_path
from app.services.processor.looper import ErrorBackoff, sleep_or_stop
from app.services.queue import CANCEL_PAYLOAD, NOTIFY_CHANNEL
from app.services.wakeups import Doorbell
from app.threads import in_own_thread

logger = logging.getLogger("app.processor")
# Poll fast while work is arriving, slower when idle. On a 2-core VM a thread wake-up
# costs ~50 us whatever it does (the PRAGMA itself ~3.5 us): every 50 ms is ~0.1 % of a
# core, every 2 ms ~3 %. So: 2 ms for a second after a claim found work, 50 ms otherwise.
# Enqueues through this package ring the doorbell and wake at once either way; the poll only
# bounds the wait for writers without it (≤ 50 ms after an idle spell, ≤ 2 ms after).
DATA_VERSION_HOT_INTERVAL_SECONDS = 0.002
DATA_VERSION_IDLE_INTERVAL_SECONDS = 0.05
DATA_VERSION_HOT_WINDOW_SECONDS = 1.0
LISTEN_CHECK_INTERVAL_SECONDS = 1.0


class SQLiteWaker:
    """Polls ``PRAGMA data_version`` on its own connection and wakes on change."""

    def __init__(
        self, path: Path, wake: Callable[[], None], on_cancel: Callable[[], None] | None = None
    ) -> None:
        self._path = path
        self._wake = wake
        self._on_cancel = on_cancel
        self._last_change = 0.0
        self._conn: sqlite3.Connection | None = None
        self._version: int | None = None
        self._doorbell = Doorbell(path)
        self.rings = 0

    def run_once(self, rung: bool = False) -> bool:
        """Read data_version once; True (and wake) when it moved or the doorbell ``rung``.
        Never blocks: a locked database reads as 'no change'."""
        try:
            if self._conn is None:
                self._conn = sqlite3.connect(self._path, timeout=0, check_same_thread=False)
            version = int(self._conn.execute("PRAGMA data_version").fetchone()[0])
        except sqlite3.Error:
            self.close_connection()
            version = None
        moved = version is not None and self._version is not None and version != self._version
        if version is not None:
            self._version = version
        if moved or rung:
            self._wake()
        return moved or rung

    def heat(self) -> None:
        """Work was found: poll fast for a while (the daemon's own commits do not count)."""
        self._last_change = time.monotonic()

    def interval(self) -> float:
        """Seconds until the next read: short right after work was found, longer when idle."""
        hot = time.monotonic() - self._last_change < DATA_VERSION_HOT_WINDOW_SECONDS
        return DATA_VERSION_HOT_INTERVAL_SECONDS if hot else DATA_VERSION_IDLE_INTERVAL_SECONDS

    async def run(self, stop: asyncio.Event) -> None:
        """Until ``stop``: the doorbell is watched by the event loop itself (a ring wakes the
        engine with no thread in between); ``data_version`` is polled from a thread of its
        own (a sleeping thread costs far less than waking the loop hundreds of times a
        second)."""
        loop = asyncio.get_running_loop()
        wake = self._wake

        def wake_from_thread() -> None:
            loop.call_soon_threadsafe(wake)

        self._wake = wake_from_thread
        halt = threading.Event()
        bell = self._doorbell.sock if self._doorbell.open() else None
        if bell is not None:
            loop.add_reader(bell, self._on_ring, wake)
        thread = threading.Thread(target=self._poll, args=(halt,), name="waker", daemon=True)
        thread.start()
        try:
            await stop.wait()
        finally:
            halt.set()
            if bell is not None:
                loop.remove_reader(bell)
            await in_own_thread(thread.join, 1.0)
            self._wake = wake
            if not thread.is_alive():
                self._doorbell.close()

    def _on_ring(self, wake: Callable[[], None]) -> None:
        self.rings += self._doorbell.drain()
        if self._doorbell.cancel_rung and self._on_cancel is not None:
            self._on_cancel()
        wake()

    def _poll(self, halt: threading.Event) -> None:
        try:
            while not halt.wait(self.interval()):
                self.run_once()
        finally:
            self.close_connection()

    def close_connection(self) -> None:
        """Close the watcher connection."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def close(self) -> None:
        """Close the watcher connection and the doorbell."""
        self.close_connection()
        self._doorbell.close()


class PostgresWaker:
    """LISTENs on the task channel with a dedicated asyncpg connection; reconnects."""

    def __init__(
        self, url: str, wake: Callable[[], None], on_cancel: Callable[[], None] | None = None
    ) -> None:
        self._dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        self._wake = wake
        self._on_cancel = on_cancel
        self._conn: Any = None
        self._backoff = ErrorBackoff("listener")

    def heat(self) -> None:
        """Nothing to tune: notifications arrive as they happen."""

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        if payload == CANCEL_PAYLOAD and self._on_cancel is not None:
            self._on_cancel()
        self._wake()

    async def connect(self) -> None:
        """Open the connection and LISTEN; wakes once (notifications may have been missed)."""
        import asyncpg  # the postgres extra

        self._conn = await asyncpg.connect(self._dsn, timeout=5)
        await self._conn.add_listener(NOTIFY_CHANNEL, self._on_notify)
        self._backoff.succeeded()
        self._wake()

    async def run(self, stop: asyncio.Event) -> None:
        """Keep the LISTEN connection up until ``stop``."""
        try:
            delay = 0.0
            while not await sleep_or_stop(stop, delay):
                if self._conn is not None and not self._conn.is_closed():
                    delay = LISTEN_CHECK_INTERVAL_SECONDS
                    continue
                try:
                    await self.connect()
                    delay = LISTEN_CHECK_INTERVAL_SECONDS
                except Exception as exc:
                    delay = self._backoff.failed(exc)
        finally:
            await self.close()

    async def close(self) -> None:
        """Close the LISTEN connection."""
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._conn.close(), timeout=2)
            self._conn = None


def make_waker(
    url: str, wake: Callable[[], None], on_cancel: Callable[[], None] | None = None
) -> SQLiteWaker | PostgresWaker | None:
    """The waker for the database behind ``url`` (None for in-memory SQLite): ``wake`` on
    new work, ``on_cancel`` (and ``wake``) on a cancel request for a running job."""
    if make_url(url).get_backend_name() == "postgresql":
        return PostgresWaker(url, wake, on_cancel)
    path = sqlite_path(url)
    return SQLiteWaker(path, wake, on_cancel) if path is not None else None
