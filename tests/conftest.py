"""Shared fixtures: the same tests run on a real SQLite file and on the real PostgreSQL."""

from __future__ import annotations

import gc
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from app import schema
from app.db import Database
from tests import pg
from tests.pgcluster import Cluster

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
ENGINES = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


@pytest.fixture(autouse=True)
def _collect_garbage() -> Iterator[None]:
    """Collect garbage after every test, so a connection or file a test leaks is reported
    (ResourceWarning, an error here) against that test, not against whichever later test
    the collector happens to run in."""
    yield
    gc.collect()


@pytest.fixture(scope="session")
def pg_available() -> bool:
    """Whether PostgreSQL tests can run; in CI they must."""
    ok = pg.reachable()
    if not ok and IN_CI:
        pytest.fail(f"CI=true but PostgreSQL at {pg.admin_url()} is not reachable")
    return ok


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file, copied for each test."""
    path = tmp_path_factory.mktemp("template") / "template.db"
    schema.upgrade(f"sqlite+aiosqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def pg_template(pg_available: bool) -> Iterator[str]:
    """A migrated PostgreSQL database, cloned for each test."""
    if not pg_available:
        pytest.skip("PostgreSQL is not reachable")
    name = pg.new_name("ap_tpl")
    url = pg.create_database(name)
    try:
        schema.upgrade(url)
        yield name
    finally:
        pg.drop_database(name)


@pytest.fixture(params=ENGINES)
def engine_name(request: pytest.FixtureRequest) -> str:
    """ "sqlite" or "postgresql"."""
    return str(request.param)


@pytest.fixture
def database_url(engine_name: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, migrated database of the parametrized engine, dropped afterwards."""
    if engine_name == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        path = tmp_path / "queue.db"
        shutil.copyfile(template, path)
        yield f"sqlite+aiosqlite:///{path}"
        return
    template_name: str = request.getfixturevalue("pg_template")
    name = pg.new_name()
    url = pg.create_database(name, template=template_name)
    try:
        yield url
    finally:
        pg.drop_database(name)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    """A Database over the fresh database."""
    database = Database.from_url(database_url)
    try:
        yield database
    finally:
        await database.dispose()


@pytest.fixture
def cluster(pg_available: bool) -> Iterator[Cluster]:
    """A throwaway PostgreSQL cluster the test may stop and start (never the shared server)."""
    if not Cluster.available():
        pytest.fail("PostgreSQL 15 server binaries are missing")
    c = Cluster().init()
    c.start()
    try:
        yield c
    finally:
        c.destroy()
