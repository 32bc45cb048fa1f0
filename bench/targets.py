"""The two engines as benchmark targets: a migrated template, cheap clones of it, history
fill, settings, and cleanup of everything created (and nothing else)."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

from app import schema
from app.db import Database, sqlite_path
from bench.floors import SQLITE_PRAGMAS, sqlite_time

DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
#: Finished rows look like jobs completed an hour ago (inside retention: the daemon's
#: pruner leaves them alone during the run).
HISTORY_AGE_SECONDS = 3600.0

_HISTORY_COLUMNS = (
    "kind, queue, status, priority, payload, result, retry_count, max_retries, attempts,"
    " timeout_seconds, user_id, scheduled_at, created_at, started_at, completed_at,"
    " updated_at, cancel_requested, duration_seconds, token_usage"
)
SQLITE_FILL = (
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < ?)"
    f" INSERT INTO pending_analysis ({_HISTORY_COLUMNS})"
    " SELECT 'bench_noop', 'default', 'completed', 5, '{\"n\": 0}', '{\"n\": 0}', 0, 3, 1,"
    " 600, 'bench', ?, ?, ?, ?, ?, 0, 0.001, 0 FROM c"
)
PG_FILL = (
    f"INSERT INTO pending_analysis ({_HISTORY_COLUMNS})"
    " SELECT 'bench_noop', 'default', 'completed', 5, '{\"n\": 0}'::jsonb,"
    " '{\"n\": 0}'::jsonb, 0, 3, 1, 600, 'bench', t, t, t, t, t, false, 0.001, 0"
    " FROM generate_series(1, $1) AS g(x),"
    " LATERAL (SELECT now() - make_interval(secs => $2)) AS s(t)"
)

#: W5's other scale: pending tasks scheduled a day ahead at the top priority (retries in
#: their backoff, work enqueued early), which a claim must pass over to reach the due ones.
LATER_SECONDS = 86_400.0
SQLITE_LATER_FILL = (
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < ?)"
    f" INSERT INTO pending_analysis ({_HISTORY_COLUMNS})"
    " SELECT 'bench_noop', 'default', 'pending', 10, '{\"n\": 0}', NULL, 0, 3, 0,"
    " 600, 'bench', ?, ?, NULL, NULL, ?, 0, NULL, 0 FROM c"
)
PG_LATER_FILL = (
    f"INSERT INTO pending_analysis ({_HISTORY_COLUMNS})"
    " SELECT 'bench_noop', 'default', 'pending', 10, '{\"n\": 0}'::jsonb,"
    " NULL, 0, 3, 0, 600, 'bench', now() + make_interval(secs => $2), now(), NULL, NULL,"
    " now(), false, NULL, 0 FROM generate_series(1, $1) AS g(x)"
)


def _unlink_database(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


class Target(ABC):
    """One engine: ``setup()`` once, ``clone()`` per workload, ``cleanup()`` at the end."""

    name: str
    floor_driver: str  # the bare driver the application's sessions use (the library's)
    daemon_driver: str  # the bare driver the daemon writes through
    floor_drivers: tuple[str, ...]
    pickup_drivers: tuple[str, ...]

    @abstractmethod
    async def setup(self) -> None:
        """Create and migrate the template."""

    @abstractmethod
    async def clone(self, label: str) -> str:
        """A fresh migrated database; its SQLAlchemy URL."""

    @abstractmethod
    async def drop(self, url: str) -> None:
        """Delete a clone."""

    @abstractmethod
    async def cleanup(self) -> None:
        """Delete every database this target created."""

    @abstractmethod
    def driver_target(self, url: str) -> str:
        """What a bare driver connects to: the SQLite path or the PostgreSQL DSN."""

    @abstractmethod
    async def fill_history(self, url: str, rows: int) -> None:
        """Insert ``rows`` completed jobs in one statement."""

    @abstractmethod
    async def fill_later(self, url: str, rows: int) -> None:
        """Insert ``rows`` pending jobs scheduled LATER_SECONDS ahead, at priority 10."""

    @abstractmethod
    async def prepare_claims(self, url: str, *, vacuum: bool) -> None:
        """Bring statistics up to date as a long-running database would have them."""

    @abstractmethod
    async def relax(self, url: str) -> str:
        """Make a clone use the relaxed durability setting; returns its description."""

    @abstractmethod
    async def settings(self, url: str) -> dict[str, Any]:
        """The durability settings the application's connections run with."""


class SQLiteTarget(Target):
    """SQLite files in the run's work directory."""

    name = "sqlite"
    floor_driver = "aiosqlite"
    daemon_driver = "sqlite3"  # the daemon's write thread (app.sqlite_writer)
    floor_drivers = ("sqlite3", "aiosqlite")
    pickup_drivers = ("sqlite3",)

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir / "sqlite"
        self.template = self.dir / "template.db"

    @staticmethod
    def url_for(path: Path) -> str:
        return f"sqlite+aiosqlite:///{path}"

    async def setup(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(schema.upgrade, self.url_for(self.template))

    async def clone(self, label: str) -> str:
        path = self.dir / f"{label}-{uuid.uuid4().hex[:6]}.db"
        shutil.copyfile(self.template, path)
        return self.url_for(path)

    async def drop(self, url: str) -> None:
        path = sqlite_path(url)
        if path is not None:
            await asyncio.to_thread(_unlink_database, path)

    async def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def driver_target(self, url: str) -> str:
        return str(sqlite_path(url))

    async def fill_history(self, url: str, rows: int) -> None:
        t = sqlite_time(-HISTORY_AGE_SECONDS)
        await self._fill(url, SQLITE_FILL, (rows, t, t, t, t, t))

    async def fill_later(self, url: str, rows: int) -> None:
        later, now = sqlite_time(LATER_SECONDS), sqlite_time()
        await self._fill(url, SQLITE_LATER_FILL, (rows, later, now, now))

    async def _fill(self, url: str, sql: str, params: tuple[Any, ...]) -> None:
        """One INSERT … SELECT in one transaction, then the WAL written back."""

        def fill() -> None:
            conn = sqlite3.connect(self.driver_target(url), isolation_level=None)
            try:
                for pragma in SQLITE_PRAGMAS:
                    conn.execute(pragma)
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(sql, params)
                conn.execute("COMMIT")
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                conn.close()

        await asyncio.to_thread(fill)

    async def prepare_claims(self, url: str, *, vacuum: bool) -> None:
        # The application never runs ANALYZE on SQLite: measure it as deployed.
        return None

    async def relax(self, url: str) -> str:
        raise NotImplementedError("the daemon sets its SQLite pragmas itself")

    async def settings(self, url: str) -> dict[str, Any]:
        db = Database.from_url(url, pool_size=1)
        try:
            async with db.engine.connect() as conn:
                journal = (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar()
                sync = (await conn.exec_driver_sql("PRAGMA synchronous")).scalar()
                busy = (await conn.exec_driver_sql("PRAGMA busy_timeout")).scalar()
        finally:
            await db.dispose()
        names = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}
        return {
            "journal_mode": journal,
            "synchronous": names.get(int(sync or 0), str(sync)),
            "busy_timeout_ms": busy,
            "sqlite_version": sqlite3.sqlite_version,
        }


def pg_dsn(url: str) -> str:
    """A plain ``postgresql://`` DSN for asyncpg from any PostgreSQL URL."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class PostgresTarget(Target):
    """Random-named databases on the server behind ``admin_url``, dropped at the end."""

    name = "postgres"
    floor_driver = "asyncpg"
    daemon_driver = "asyncpg"
    floor_drivers = ("asyncpg",)
    pickup_drivers = ("asyncpg",)

    def __init__(self, admin_url: str) -> None:
        self.admin_dsn = pg_dsn(admin_url)
        self.prefix = f"ap_bench_{uuid.uuid4().hex[:8]}"
        self.template = f"{self.prefix}_tpl"
        self.created: list[str] = []

    @staticmethod
    async def reachable(admin_url: str) -> bool:
        try:
            conn = await asyncpg.connect(pg_dsn(admin_url), timeout=5)
        except (OSError, asyncpg.PostgresError, TimeoutError):
            return False
        await conn.close()
        return True

    async def _admin(self, sql: str) -> None:
        conn = await asyncpg.connect(self.admin_dsn, timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    def _url(self, database: str) -> str:
        return (
            make_url(self.admin_dsn)
            .set(drivername="postgresql+asyncpg", database=database)
            .render_as_string(hide_password=False)
        )

    async def setup(self) -> None:
        await self._admin(f'CREATE DATABASE "{self.template}"')
        self.created.append(self.template)
        await asyncio.to_thread(schema.upgrade, self._url(self.template))

    async def clone(self, label: str) -> str:
        name = f"{self.prefix}_{label.replace('-', '_')}_{uuid.uuid4().hex[:4]}"
        await self._admin(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"')
        self.created.append(name)
        return self._url(name)

    async def drop(self, url: str) -> None:
        name = make_url(url).database
        if name in self.created:
            await self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            self.created.remove(name)

    async def cleanup(self) -> None:
        for name in list(reversed(self.created)):
            await self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            self.created.remove(name)

    def driver_target(self, url: str) -> str:
        return pg_dsn(url)

    async def _execute(self, url: str, sql: str, *args: Any) -> None:
        conn = await asyncpg.connect(self.driver_target(url), timeout=10)
        try:
            await conn.execute(sql, *args, timeout=3600)
        finally:
            await conn.close()

    async def fill_history(self, url: str, rows: int) -> None:
        await self._execute(url, PG_FILL, rows, HISTORY_AGE_SECONDS)

    async def fill_later(self, url: str, rows: int) -> None:
        await self._execute(url, PG_LATER_FILL, rows, LATER_SECONDS)

    async def prepare_claims(self, url: str, *, vacuum: bool) -> None:
        # Autovacuum would have analysed (and vacuumed) a table this size by now, and the
        # checkpointer written the history out: the timing should not pay for either.
        await self._execute(url, "VACUUM ANALYZE pending_analysis" if vacuum else "ANALYZE")
        await self._execute(url, "CHECKPOINT")

    async def relax(self, url: str) -> str:
        name = make_url(url).database
        await self._admin(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
        return "synchronous_commit=off (database-level, every session)"

    async def settings(self, url: str) -> dict[str, Any]:
        conn = await asyncpg.connect(self.driver_target(url), timeout=10)
        try:
            found = {
                name: await conn.fetchval(f"SHOW {name}")
                for name in (
                    "server_version",
                    "synchronous_commit",
                    "fsync",
                    "wal_level",
                    "shared_buffers",
                    "max_connections",
                )
            }
        finally:
            await conn.close()
        return found
