"""Fixtures for real-process tests (the throwaway `cluster` is in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.daemon import Api, Daemon


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
    api = Api(database_url, tmp_path).start()
    yield api.base
    api.stop()
