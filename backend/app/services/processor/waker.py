"""Wake the engine within milliseconds of an enqueue from any process.

SQLite: ``PRAGMA data_version`` changes when another connection commits; reading it costs
microseconds and no table read, so a dedicated connection polls it every few ms.
PostgreSQL: LISTEN on the channel the insert trigger notifies.
The engine's poll interval stays the fallback for both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from app.db import sqlite_path
from app.services.processor.looper import ErrorBackoff, sleep_or_stop
from app.services.queue import NOTIFY_CHANNEL

logger = logging.getLogger("app.processor")
DATA_VERSION_INTERVAL_SECONDS = 0.002
LISTEN_CHECK_INTERVAL_SECONDS = 1.0


class SQLiteWaker:
    """Polls ``PRAGMA data_version`` on its own connection and wakes on change."""

    def __init__(
        self,
        path: Path,
        wake: Callable[[], None],
        *,
        interval: float = DATA_VERSION_INTERVAL_SECONDS,
    ) -> None:
        self._path = path
        self._wake = wake
        self.interval = interval
        self._conn: sqlite3.Connection | None = None
        self._version: int | None = None

    def run_once(self) -> bool:
        """Read data_version once; True (and wake) when it moved. Never blocks: a locked
        database reads as 'no change'."""
        try:
            if self._conn is None:
                self._conn = sqlite3.connect(self._path, timeout=0, check_same_thread=False)
            version = int(self._conn.execute("PRAGMA data_version").fetchone()[0])
        except sqlite3.Error:
            self.close()
            return False
        moved = self._version is not None and version != self._version
        self._version = version
        if moved:
            self._wake()
        return moved

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until ``stop``."""
        try:
            while not stop.is_set():
                self.run_once()
                await asyncio.sleep(self.interval)
        finally:
            self.close()

    def close(self) -> None:
        """Close the watcher connection."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class PostgresWaker:
    """LISTENs on the task channel with a dedicated asyncpg connection; reconnects."""

    def __init__(self, url: str, wake: Callable[[], None]) -> None:
        self._dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        self._wake = wake
        self._conn: Any = None
        self._backoff = ErrorBackoff("listener")

    def _on_notify(self, *_args: object) -> None:
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


def make_waker(url: str, wake: Callable[[], None]) -> SQLiteWaker | PostgresWaker | None:
    """The waker for the database behind ``url`` (None for in-memory SQLite)."""
    if make_url(url).get_backend_name() == "postgresql":
        return PostgresWaker(url, wake)
    path = sqlite_path(url)
    return SQLiteWaker(path, wake) if path is not None else None
