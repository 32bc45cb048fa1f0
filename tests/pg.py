"""Throwaway PostgreSQL databases for tests (never touches anything it did not create)."""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg
from sqlalchemy.engine import make_url

DEFAULT_ADMIN_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
R = TypeVar("R")


def admin_url() -> str:
    """The server the tests may create databases on."""
    return os.environ.get("ASYNC_PROCESSOR_TEST_PG_URL", DEFAULT_ADMIN_URL)


def run_in_thread(factory: Callable[[], Awaitable[R]]) -> R:
    """Run a coroutine to completion on a fresh loop in another thread (safe anywhere)."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(factory())  # type: ignore[arg-type]
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def _dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def url_for(database: str) -> str:
    """The SQLAlchemy URL of ``database`` on the test server."""
    return make_url(admin_url()).set(database=database).render_as_string(hide_password=False)


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(_dsn(admin_url()), timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def reachable() -> bool:
    """True when the test server answers."""
    try:
        run_in_thread(lambda: _admin("SELECT 1"))
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    return True


def new_name(prefix: str = "ap_test") -> str:
    """A random database name."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def create_database(name: str, template: str | None = None) -> str:
    """Create ``name`` (from ``template`` when given) and return its URL."""
    clause = f' TEMPLATE "{template}" STRATEGY FILE_COPY' if template else ""
    run_in_thread(lambda: _admin(f'CREATE DATABASE "{name}"{clause}'))
    return url_for(name)


def drop_database(name: str) -> None:
    """Drop ``name``, disconnecting whoever is still connected."""
    run_in_thread(lambda: _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
