"""Fixtures for real-process tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.daemon import Daemon
from tests.e2e.test_make_run import free_port
from tests.pgcluster import Cluster


@pytest.fixture
def spawn(database_url: str, tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Start daemons on the test database; every one is killed at teardown."""
    started: list[Daemon] = []

    def start(name: str = "daemon", **env: str) -> Daemon:
        daemon = Daemon(database_url, tmp_path, f"{name}{len(started)}", **env).start()
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.kill()


@pytest.fixture
def api_url(database_url: str, tmp_path: Path) -> Iterator[str]:
    """A real `async-processor api` process on the test database; its base URL."""
    port = free_port()
    env = {**os.environ, "ASYNC_PROCESSOR_DATABASE_URL": database_url}
    script = Path(sys.executable).with_name("async-processor")
    log = (tmp_path / "api.log").open("wb")
    proc = subprocess.Popen(
        [str(script), "api", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, (
            tmp_path / "api.log"
        ).read_text()
        time.sleep(0.1)
    yield base
    proc.terminate()
    proc.wait(20)
    log.close()


@pytest.fixture
def cluster(pg_available: bool) -> Iterator[Cluster]:
    """A throwaway PostgreSQL cluster the test may stop and start."""
    if not Cluster.available():
        pytest.fail("PostgreSQL 15 server binaries are missing")
    c = Cluster().init()
    c.start()
    try:
        yield c
    finally:
        c.destroy()
