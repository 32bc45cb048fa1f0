"""Settings: DESIGN.md §4 defaults, environment parsing, and readable errors."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from app.config import ENV_PREFIX, Settings, SettingsError, load_settings, unknown_settings

# DESIGN.md §4, "Settings (contract)": variable (without the prefix) -> default.
CONTRACT_DEFAULTS: dict[str, object] = {
    "DATABASE_URL": "sqlite+aiosqlite:///./data/async_processor.db",
    "MAX_CONCURRENT": 3,
    "POLL_INTERVAL": 5,
    "PROCESSING_TIMEOUT": 600,
    "MAX_RETRIES": 3,
    "RETRY_BACKOFF_BASE": 10,
    "RETRY_BACKOFF_MAX": 3600,
    "LEASE_SECONDS": 30,
    "SHUTDOWN_GRACE": 30,
    "HANDLER_MODULES": ("app.services.analysis",),
    "INLINE": False,
    "RETENTION_DAYS": 14,
    "MAX_PAYLOAD_BYTES": 1_048_576,
}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No ASYNC_PROCESSOR_* variable of the surrounding environment leaks in."""
    for key in list(os.environ):
        if key.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    yield


def test_defaults_match_the_contract() -> None:
    s = load_settings()
    actual = {name: getattr(s, name.lower()) for name in CONTRACT_DEFAULTS}
    assert actual == CONTRACT_DEFAULTS
    assert s.is_sqlite
    assert Settings() == s


def test_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "DATABASE_URL": "postgresql+asyncpg://u:p@db.example:5433/queue",
        "MAX_CONCURRENT": "12",
        "POLL_INTERVAL": "0.25",
        "PROCESSING_TIMEOUT": "90",
        "MAX_RETRIES": "0",
        "RETRY_BACKOFF_BASE": "2",
        "RETRY_BACKOFF_MAX": "60",
        "LEASE_SECONDS": "9",
        "SHUTDOWN_GRACE": "0",
        "INLINE": "true",
        "RETENTION_DAYS": "1.5",
        "MAX_PAYLOAD_BYTES": "1024",
    }
    for key, value in env.items():
        monkeypatch.setenv(ENV_PREFIX + key, value)
    s = load_settings()
    assert (s.database_url, s.is_sqlite) == (env["DATABASE_URL"], False)
    assert (s.max_concurrent, s.poll_interval, s.processing_timeout, s.max_retries) == (
        12,
        0.25,
        90,
        0,
    )
    assert (s.retry_backoff_base, s.retry_backoff_max, s.lease_seconds, s.shutdown_grace) == (
        2,
        60,
        9,
        0,
    )
    assert (s.inline, s.retention_days, s.max_payload_bytes) == (True, 1.5, 1024)


def test_variable_names_are_case_insensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("async_processor_max_concurrent", "7")
    assert load_settings().max_concurrent == 7


def test_overrides_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_PREFIX + "MAX_CONCURRENT", "7")
    assert load_settings(max_concurrent=2).max_concurrent == 2


@pytest.mark.parametrize(
    ("raw", "parsed"),
    [
        ("a, b", ("a", "b")),
        ("a,b", ("a", "b")),
        (" a , b ,", ("a", "b")),
        ("app.jobs.one", ("app.jobs.one",)),
        ("", ()),
    ],
)
def test_handler_modules_are_comma_separated(
    monkeypatch: pytest.MonkeyPatch, raw: str, parsed: tuple[str, ...]
) -> None:
    monkeypatch.setenv(ENV_PREFIX + "HANDLER_MODULES", raw)
    assert load_settings().handler_modules == parsed


@pytest.mark.parametrize(
    ("env", "variable", "value"),
    [
        ({"MAX_CONCURRENT": "0"}, "MAX_CONCURRENT", "'0'"),
        ({"MAX_CONCURRENT": "zero"}, "MAX_CONCURRENT", "'zero'"),
        ({"POLL_INTERVAL": "-1"}, "POLL_INTERVAL", "'-1'"),
        ({"LEASE_SECONDS": "abc"}, "LEASE_SECONDS", "'abc'"),
        # Finite and at most a year (days: a century), or they overflow at run time.
        ({"LEASE_SECONDS": "inf"}, "LEASE_SECONDS", "'inf'"),
        ({"POLL_INTERVAL": "1e400"}, "POLL_INTERVAL", "'1e400'"),
        ({"RETRY_BACKOFF_MAX": "1e300"}, "RETRY_BACKOFF_MAX", "'1e300'"),
        ({"RETENTION_DAYS": "99999999999"}, "RETENTION_DAYS", "'99999999999'"),
        ({"SHUTDOWN_GRACE": "nan"}, "SHUTDOWN_GRACE", "'nan'"),
        ({"PROCESSING_TIMEOUT": "99999999999"}, "PROCESSING_TIMEOUT", "'99999999999'"),
        ({"MAX_RETRIES": "-1"}, "MAX_RETRIES", "'-1'"),
        ({"DATABASE_URL": "nonsense"}, "DATABASE_URL", "'nonsense'"),
        ({"DATABASE_URL": "mysql://x"}, "DATABASE_URL", "'mysql://x'"),
        ({"DATABASE_URL": "sqlite:///sync.db"}, "DATABASE_URL", "'sqlite:///sync.db'"),
        ({"INLINE": "maybe"}, "INLINE", "'maybe'"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT", "'xml'"),
    ],
)
def test_bad_values_name_the_variable_and_the_value(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], variable: str, value: str
) -> None:
    for key, raw in env.items():
        monkeypatch.setenv(ENV_PREFIX + key, raw)
    with pytest.raises(SettingsError) as info:
        load_settings()
    message = str(info.value)
    assert f"{ENV_PREFIX}{variable}={value}" in message, message


def test_unsupported_driver_says_which_are_supported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_PREFIX + "DATABASE_URL", "mysql://x")
    with pytest.raises(SettingsError, match="driver 'mysql' is not supported") as info:
        load_settings()
    assert "sqlite+aiosqlite" in str(info.value) and "postgresql+asyncpg" in str(info.value)


def _backoff_error(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(ENV_PREFIX + "RETRY_BACKOFF_BASE", "100")
    monkeypatch.setenv(ENV_PREFIX + "RETRY_BACKOFF_MAX", "10")
    with pytest.raises(SettingsError) as info:
        load_settings()
    return str(info.value)


def test_backoff_base_above_max_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    message = _backoff_error(monkeypatch)
    assert "RETRY_BACKOFF_BASE" in message and "RETRY_BACKOFF_MAX" in message, message
    assert "100" in message and "10" in message, message


def test_backoff_error_names_the_full_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    message = _backoff_error(monkeypatch)
    assert f"{ENV_PREFIX}RETRY_BACKOFF_BASE" in message, message
    assert f"{ENV_PREFIX}RETRY_BACKOFF_MAX" in message, message


def test_every_bad_variable_is_reported_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_PREFIX + "MAX_CONCURRENT", "0")
    monkeypatch.setenv(ENV_PREFIX + "LEASE_SECONDS", "abc")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert f"{ENV_PREFIX}MAX_CONCURRENT='0'" in str(info.value)
    assert f"{ENV_PREFIX}LEASE_SECONDS='abc'" in str(info.value)


def test_a_bad_setting_stops_the_daemon_without_a_traceback() -> None:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(ENV_PREFIX)}
    env["ASYNC_PROCESSOR_MAX_CONCURRENT"] = "zero"
    result = subprocess.run(
        [sys.executable, "-m", "app.background_processor"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "ASYNC_PROCESSOR_MAX_CONCURRENT='zero'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql+asyncpg://u:ret@h@host:5432/db", "postgresql+asyncpg://u:***@host:5432/db"),
        ("postgresql+asyncpg://u:pa ss@host/db", "postgresql+asyncpg://u:***@host/db"),
        ("postgresql+asyncpg://u:p@host/db?x=a@b", "postgresql+asyncpg://u:***@host/db?x=a@b"),
        ("postgresql+asyncpg://u@host/db", "postgresql+asyncpg://u@host/db"),
        ("sqlite+aiosqlite:///./data/x.db", "sqlite+aiosqlite:///./data/x.db"),
    ],
)
def test_a_urls_password_is_hidden_whatever_it_holds(url: str, shown: str) -> None:
    """A raw "@" or a space in the password left the rest of it in the message."""
    from app.config import redact_url

    assert redact_url(url) == shown


def test_a_variable_that_names_no_setting_is_reported_with_the_closest() -> None:
    """pydantic-settings ignores unknown names: MAX_CONCURRENCY (the CLI's flag is
    --concurrency) ran the daemon at the default 3, silently (a newcomer's walk-through)."""
    environ = {
        "ASYNC_PROCESSOR_MAX_CONCURRENCY": "10",
        "async_processor_handlers_modules": "x",
        "ASYNC_PROCESSOR_FOO": "1",
        "ASYNC_PROCESSOR_MAX_CONCURRENT": "4",  # a setting
        "ASYNC_PROCESSOR_FAULT_POINT": "before_handler",  # a test switch, not a setting
        "ASYNC_PROCESSOR_TEST_PG_URL": "postgresql://x",
        "OTHER_MAX_CONCURRENCY": "1",
    }
    assert unknown_settings(environ) == [
        "ASYNC_PROCESSOR_FOO is not a setting: ignored",
        "ASYNC_PROCESSOR_MAX_CONCURRENCY is not a setting: ignored;"
        " did you mean ASYNC_PROCESSOR_MAX_CONCURRENT?",
        "async_processor_handlers_modules is not a setting: ignored;"
        " did you mean ASYNC_PROCESSOR_HANDLER_MODULES?",
    ]
    assert (
        unknown_settings({f"{ENV_PREFIX}{name.upper()}": "" for name in Settings.model_fields})
        == []
    )
