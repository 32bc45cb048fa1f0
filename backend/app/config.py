"""Settings: every setting, read from the environment (prefix ``ASYNC_PROCESSOR_``). Only
systemd's variables (background_processor) and the tests' fault hooks (services.faults) are
read elsewhere."""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Literal, Self

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from app.cron import Cron, CronError

ENV_PREFIX = "ASYNC_PROCESSOR_"

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./data/async_processor.db"
DEFAULT_MAX_CONCURRENT = 3
DEFAULT_POLL_INTERVAL_SECONDS = 5.0
DEFAULT_PREFETCH_WINDOW_SECONDS = 0.1
DEFAULT_PROCESSING_TIMEOUT_SECONDS = 600
DEFAULT_MAX_RETRIES = 3
DEFAULT_RETRY_BACKOFF_BASE_SECONDS = 10.0
DEFAULT_RETRY_BACKOFF_MAX_SECONDS = 3600.0
DEFAULT_LEASE_SECONDS = 30.0
DEFAULT_SHUTDOWN_GRACE_SECONDS = 30.0
DEFAULT_HANDLER_MODULES = ("app.services.analysis",)
DEFAULT_RETENTION_DAYS = 14.0
DEFAULT_FAILED_RETENTION_DAYS = 30.0
DEFAULT_MAX_PAYLOAD_BYTES = 1_048_576
#: A request body larger than this is refused (413) before it is read to the end.
DEFAULT_MAX_REQUEST_BYTES = 16 * 1_048_576

SUPPORTED_DRIVERS = ("sqlite+aiosqlite", "postgresql+asyncpg")

#: Durations are finite and at most a year (days: a century): a larger one (or inf) would
#: overflow a datetime or an event loop timer at run time instead of being refused here.
MAX_SECONDS = 366 * 24 * 3600
PositiveSeconds = Annotated[float, Field(gt=0, le=MAX_SECONDS, allow_inf_nan=False)]
PositiveDays = Annotated[float, Field(gt=0, le=36_600, allow_inf_nan=False)]
QueueSpec = tuple[tuple[str, int | None], ...]
ScheduleSpec = tuple[tuple[str, str], ...]
SCHEDULE_OFF = "off"
DEFAULT_SCHEDULE_CATCH_UP = 1


#: A queue name is what ``--queues``/``QUEUES`` can name: 1-100 characters, none of them
#: whitespace, a comma, "=" or a control character. The same pattern for Python's ``re``
#: and the API's JSON Schema (pydantic's Rust regex).
QUEUE_NAME_PATTERN = r"^[^\s,=\x00-\x1f\x7f-\x9f]{1,100}$"
QUEUE_NAME_RULE = "1-100 characters, no whitespace, comma, '=' or control character"
_QUEUE_NAME = re.compile(QUEUE_NAME_PATTERN)


MAX_QUEUE_NAME_LENGTH = 100


def is_queue_name(name: str) -> bool:
    """Whether ``name`` can be a queue's name. The length first: the check is cached, and a
    cache keyed by whatever a request sends (a 60,000-character URL) held ~270 MB of
    refused names per process."""
    return 0 < len(name) <= MAX_QUEUE_NAME_LENGTH and _queue_name_matches(name)


@lru_cache(maxsize=4096)
def _queue_name_matches(name: str) -> bool:
    return _QUEUE_NAME.fullmatch(name) is not None  # cached: a process uses few names


def _decimal(text: str) -> bool:
    """ASCII digits only (str.isdigit also takes "٣" and "²", which int() reads or refuses)."""
    return text.isascii() and text.isdigit()


def parse_schedules(spec: str) -> ScheduleSpec:
    """``report=0 3 * * *;sync=*/5 * * * *`` → ((kind, cron), …); ``kind=off`` turns off a
    schedule declared in code. Entries are separated by ``;`` (cron uses spaces and commas).
    ValueError names the bad entry and says why."""
    parsed: list[tuple[str, str]] = []
    for part in (p.strip() for p in spec.split(";")):
        if not part:
            continue
        kind, sep, expression = (x.strip() for x in part.partition("="))
        if not kind or not sep or not expression or len(kind) > 100:
            raise ValueError(f"{part!r} is not KIND=CRON (entries separated by ';')")
        if kind in (k for k, _ in parsed):
            raise ValueError(f"kind {kind!r} is listed twice")
        if expression.lower() == SCHEDULE_OFF:
            parsed.append((kind, SCHEDULE_OFF))
            continue
        try:
            cron = Cron.parse(expression)
        except CronError as exc:
            raise ValueError(f"kind {kind!r}: {exc}") from None
        parsed.append((kind, cron.expression))
    return tuple(parsed)


def parse_queues(spec: str) -> QueueSpec:
    """``ingest=2,extract=4,default`` → ((name, own concurrency or None), …). A queue with
    no number shares the daemon's MAX_CONCURRENT. ValueError names the bad part."""
    parsed: list[tuple[str, int | None]] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, sep, limit = (x.strip() for x in part.partition("="))
        if not is_queue_name(name) or (sep and not (_decimal(limit) and 0 < int(limit) <= 10_000)):
            raise ValueError(
                f"{part!r} is not QUEUE or QUEUE=N with 1 <= N <= 10000"
                f" (a queue's name: {QUEUE_NAME_RULE})"
            )
        if name in (n for n, _ in parsed):
            raise ValueError(f"queue {name!r} is listed twice")
        parsed.append((name, int(limit) if sep else None))
    if spec.strip() and not parsed:  # "," is not a way to say "every queue"
        raise ValueError(f"{spec!r} names no queue; leave it empty to serve every queue")
    return tuple(parsed)


#: What a per-key limit counts by; ``kind`` is the kind itself: at most N running tasks of
#: the kind over every daemon (one nightly report at a time).
KEY_COLUMNS = ("user_id", "project_id", "chapter_id", "kind")
_PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most ``count`` starts of ``kind`` per ``seconds``, across every daemon."""

    kind: str
    count: int
    seconds: float


@dataclass(frozen=True, slots=True)
class KeyLimit:
    """At most ``limit`` running tasks of ``kind`` per value of ``column``, across daemons."""

    kind: str
    column: str
    limit: int


def _entries(spec: str) -> list[tuple[str, str]]:
    entries: list[tuple[str, str]] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        kind, sep, rule = (x.strip() for x in part.partition("="))
        if not kind or not sep or not rule:
            raise ValueError(f"{part!r} is not KIND=RULE")
        if kind in (k for k, _ in entries):
            raise ValueError(f"kind {kind!r} is listed twice")
        entries.append((kind, rule))
    return entries


def parse_rate_limits(spec: str) -> tuple[RateLimit, ...]:
    """``llm_call=10/1s,report=100/m`` → rate limits (periods in s, m or h)."""
    limits = []
    for kind, rule in _entries(spec):
        count, _, period = rule.partition("/")
        number, unit = period[:-1] or "1", period[-1:]
        try:
            seconds = float(number) * _PERIODS[unit]
        except (KeyError, ValueError):
            seconds = math.nan
        if not _decimal(count.strip()) or math.isnan(seconds):
            raise ValueError(f"{kind}={rule!r} is not N/PERIOD like 10/1s, 100/m or 5/2h")
        n = int(count)
        if not math.isfinite(seconds) or not 0.001 <= seconds <= MAX_SECONDS or n < 1:
            raise ValueError(
                f"{kind}={rule!r}: N must be positive and PERIOD from 1 ms to 366 days"
            )
        limits.append(RateLimit(kind, n, seconds))
    return tuple(limits)


def parse_key_limits(spec: str) -> tuple[KeyLimit, ...]:
    """``chapter_analysis=chapter_id:1`` → per-key concurrency limits."""
    limits = []
    for kind, rule in _entries(spec):
        column, _, limit = rule.partition(":")
        if column not in KEY_COLUMNS or not (_decimal(limit) and int(limit) > 0):
            raise ValueError(
                f"{kind}={rule!r} is not COLUMN:N with COLUMN one of {', '.join(KEY_COLUMNS)}"
                " and N >= 1"
            )
        limits.append(KeyLimit(kind, column, int(limit)))
    return tuple(limits)


class Settings(BaseSettings):
    """Every knob of async-processor; see deployment/async-processor.env.example."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, case_sensitive=False, extra="ignore", frozen=True
    )

    database_url: str = DEFAULT_DATABASE_URL
    max_concurrent: int = Field(default=DEFAULT_MAX_CONCURRENT, ge=1, le=10_000)
    poll_interval: PositiveSeconds = DEFAULT_POLL_INTERVAL_SECONDS
    prefetch_window: float = Field(default=DEFAULT_PREFETCH_WINDOW_SECONDS, ge=0, le=60)
    processing_timeout: int = Field(
        default=DEFAULT_PROCESSING_TIMEOUT_SECONDS, gt=0, le=MAX_SECONDS
    )
    max_retries: int = Field(default=DEFAULT_MAX_RETRIES, ge=0, le=1000)
    retry_backoff_base: PositiveSeconds = DEFAULT_RETRY_BACKOFF_BASE_SECONDS
    retry_backoff_max: PositiveSeconds = DEFAULT_RETRY_BACKOFF_MAX_SECONDS
    lease_seconds: PositiveSeconds = DEFAULT_LEASE_SECONDS
    shutdown_grace: float = Field(
        default=DEFAULT_SHUTDOWN_GRACE_SECONDS, ge=0, le=MAX_SECONDS, allow_inf_nan=False
    )
    handler_modules: Annotated[tuple[str, ...], NoDecode] = DEFAULT_HANDLER_MODULES
    queues: Annotated[QueueSpec, NoDecode] = ()
    rate_limits: Annotated[tuple[RateLimit, ...], NoDecode] = ()
    key_limits: Annotated[tuple[KeyLimit, ...], NoDecode] = ()
    inline: bool = False
    retention_days: PositiveDays = DEFAULT_RETENTION_DAYS
    failed_retention_days: PositiveDays = DEFAULT_FAILED_RETENTION_DAYS
    max_payload_bytes: int = Field(default=DEFAULT_MAX_PAYLOAD_BYTES, gt=0)
    max_request_bytes: int = Field(default=DEFAULT_MAX_REQUEST_BYTES, gt=0)
    sqlite_synchronous: Literal["NORMAL", "FULL", "EXTRA"] = "NORMAL"
    cors_origins: Annotated[tuple[str, ...], NoDecode] = ()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    schedules: Annotated[ScheduleSpec, NoDecode] = ()
    schedule_catch_up: int = Field(default=DEFAULT_SCHEDULE_CATCH_UP, ge=1, le=1000)

    @field_validator("database_url")
    @classmethod
    def _parseable_url(cls, value: str) -> str:
        try:
            url = make_url(value)
        except ArgumentError as exc:
            raise ValueError(f"not a database URL SQLAlchemy can parse ({exc})") from None
        if url.drivername not in SUPPORTED_DRIVERS:
            raise ValueError(
                f"driver {url.drivername!r} is not supported; use one of {SUPPORTED_DRIVERS}"
            )
        return value

    @field_validator("handler_modules", "cors_origins", mode="before")
    @classmethod
    def _split_modules(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("queues", mode="before")
    @classmethod
    def _parse_queues(cls, value: object) -> object:
        return parse_queues(value) if isinstance(value, str) else value

    @field_validator("rate_limits", mode="before")
    @classmethod
    def _parse_rate_limits(cls, value: object) -> object:
        return parse_rate_limits(value) if isinstance(value, str) else value

    @field_validator("key_limits", mode="before")
    @classmethod
    def _parse_key_limits(cls, value: object) -> object:
        return parse_key_limits(value) if isinstance(value, str) else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("schedules", mode="before")
    @classmethod
    def _parse_schedules(cls, value: object) -> object:
        return parse_schedules(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _backoff_order(self) -> Self:
        if self.retry_backoff_base > self.retry_backoff_max:
            raise ValueError(
                f"{ENV_PREFIX}RETRY_BACKOFF_BASE ({self.retry_backoff_base:g}) must not "
                f"exceed {ENV_PREFIX}RETRY_BACKOFF_MAX ({self.retry_backoff_max:g})"
            )
        return self

    @property
    def is_sqlite(self) -> bool:
        """True when the database is an embedded SQLite file."""
        return self.database_url.startswith("sqlite")


class SettingsError(Exception):
    """Raised with a readable message when the environment holds a bad setting."""


#: The password of a URL (scheme://user:password@host), up to the last "@" before the
#: host's path: a raw "@" or a space in the password is hidden too.
_PASSWORD_IN_URL = re.compile(r"(://[^:/@\s]*:)[^/?#]*@")


def redact_url(value: str) -> str:
    """``value`` with a URL's password written as ***, for messages and logs."""
    return _PASSWORD_IN_URL.sub(r"\1***@", value)


def describe_validation_error(error: ValidationError) -> str:
    """Render a pydantic error as lines naming each variable and its bad value."""
    lines = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ")
        if not item["loc"]:
            # A cross-field rule: its message names the variables involved.
            lines.append(f"invalid settings: {message}")
            continue
        field = ".".join(str(part) for part in item["loc"])
        value = item.get("input")
        if isinstance(value, str):
            value = redact_url(value)  # the journal keeps it
        shown = "" if isinstance(value, dict) else f"={value!r}"
        lines.append(f"invalid setting {ENV_PREFIX}{field.upper()}{shown}: {message}")
    return "\n".join(lines)


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment, raising SettingsError with a readable message."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise SettingsError(describe_validation_error(exc)) from None


#: Variables with the settings' prefix that are not settings: the test-only switches of
#: app.services.faults (docs/reliability.md) and the test suite's PostgreSQL server.
NOT_SETTINGS = frozenset(
    f"{ENV_PREFIX}{name}" for name in ("FAULT_POINT", "SEEDED_BUG", "TEST_PG_URL")
)


def unknown_settings(environ: Mapping[str, str] | None = None) -> list[str]:
    """One message per ``ASYNC_PROCESSOR_*`` variable that names no setting (a typo, or a
    guess such as MAX_CONCURRENCY for MAX_CONCURRENT): pydantic-settings ignores them, so
    the program ran on the default, silently. With the closest setting's name."""
    known = [name.upper() for name in Settings.model_fields]
    messages = []
    for variable in sorted(os.environ if environ is None else environ):
        name = variable.upper()
        if not name.startswith(ENV_PREFIX) or name in NOT_SETTINGS:
            continue
        bare = name.removeprefix(ENV_PREFIX)
        if bare in known:
            continue
        close = difflib.get_close_matches(bare, known, n=1, cutoff=0.7)
        hint = f"; did you mean {ENV_PREFIX}{close[0]}?" if close else ""
        messages.append(f"{variable} is not a setting: ignored{hint}")
    return messages


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()
