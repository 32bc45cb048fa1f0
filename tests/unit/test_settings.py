"""Settings: DESIGN.md defaults, environment parsing, and readable errors."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from app.config import Settings, SettingsError, load_settings
from app.services.backoff import next_retry_delay


def test_defaults_match_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings()
    assert s.database_url == "sqlite+aiosqlite:///./data/async_processor.db"
    assert (s.max_concurrent, s.poll_interval, s.processing_timeout, s.max_retries) == (
        3,
        5,
        600,
        3,
    )
    assert (s.retry_backoff_base, s.retry_backoff_max, s.lease_seconds, s.shutdown_grace) == (
        10,
        3600,
        30,
        30,
    )
    assert s.handler_modules == ("app.services.analysis",)
    assert (s.inline, s.retention_days, s.max_payload_bytes) == (False, 14, 1_048_576)


def test_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASYNC_PROCESSOR_MAX_CONCURRENT", "12")
    monkeypatch.setenv("ASYNC_PROCESSOR_HANDLER_MODULES", "a, b,")
    monkeypatch.setenv("ASYNC_PROCESSOR_INLINE", "true")
    monkeypatch.setenv("ASYNC_PROCESSOR_DATABASE_URL", "postgresql+asyncpg://u@h/db")
    s = load_settings()
    assert (s.max_concurrent, s.handler_modules, s.inline, s.is_sqlite) == (
        12,
        ("a", "b"),
        True,
        False,
    )


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"MAX_CONCURRENT": "0"}, "ASYNC_PROCESSOR_MAX_CONCURRENT='0'"),
        ({"POLL_INTERVAL": "-1"}, "ASYNC_PROCESSOR_POLL_INTERVAL='-1'"),
        ({"LEASE_SECONDS": "abc"}, "ASYNC_PROCESSOR_LEASE_SECONDS='abc'"),
        ({"DATABASE_URL": "nonsense"}, "ASYNC_PROCESSOR_DATABASE_URL='nonsense'"),
        ({"DATABASE_URL": "mysql://x/y"}, "driver 'mysql' is not supported"),
        (
            {"RETRY_BACKOFF_BASE": "100", "RETRY_BACKOFF_MAX": "10"},
            "RETRY_BACKOFF_BASE (100.0) must not exceed",
        ),
        ({"LOG_FORMAT": "xml"}, "ASYNC_PROCESSOR_LOG_FORMAT='xml'"),
    ],
)
def test_bad_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], named: str
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(f"ASYNC_PROCESSOR_{key}", value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert named in str(info.value)


def test_a_bad_setting_stops_the_daemon_without_a_traceback() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "app.background_processor"],
        env={"ASYNC_PROCESSOR_MAX_CONCURRENT": "zero", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "ASYNC_PROCESSOR_MAX_CONCURRENT='zero'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("n", [1, 2, 3, 8, 20])
def test_backoff_bounds(n: int) -> None:
    rng = random.Random(7)
    ceiling = min(60.0, 2.0 * 2 ** (n - 1))
    delays = [next_retry_delay(n, base=2, cap=60, rng=rng) for _ in range(200)]
    assert all(ceiling / 2 <= d <= ceiling for d in delays)
    assert len(set(delays)) > 100  # jittered


@pytest.mark.parametrize(("n", "base", "cap"), [(0, 1, 2), (1, 0, 2), (1, 3, 2)])
def test_backoff_rejects_bad_arguments(n: int, base: float, cap: float) -> None:
    with pytest.raises(ValueError):
        next_retry_delay(n, base=base, cap=cap)
