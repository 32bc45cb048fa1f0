"""Settings: the one place that reads the environment (prefix ``ASYNC_PROCESSOR_``)."""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Literal, Self

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

ENV_PREFIX = "ASYNC_PROCESSOR_"

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./data/async_processor.db"
DEFAULT_MAX_CONCURRENT = 3
DEFAULT_POLL_INTERVAL_SECONDS = 5.0
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

SUPPORTED_DRIVERS = ("sqlite+aiosqlite", "postgresql+asyncpg")

PositiveSeconds = Annotated[float, Field(gt=0)]


class Settings(BaseSettings):
    """Every knob of async-processor; see deployment/async-processor.env.example."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, case_sensitive=False, extra="ignore", frozen=True
    )

    database_url: str = DEFAULT_DATABASE_URL
    max_concurrent: int = Field(default=DEFAULT_MAX_CONCURRENT, ge=1, le=10_000)
    poll_interval: PositiveSeconds = DEFAULT_POLL_INTERVAL_SECONDS
    processing_timeout: int = Field(default=DEFAULT_PROCESSING_TIMEOUT_SECONDS, gt=0)
    max_retries: int = Field(default=DEFAULT_MAX_RETRIES, ge=0, le=1000)
    retry_backoff_base: PositiveSeconds = DEFAULT_RETRY_BACKOFF_BASE_SECONDS
    retry_backoff_max: PositiveSeconds = DEFAULT_RETRY_BACKOFF_MAX_SECONDS
    lease_seconds: PositiveSeconds = DEFAULT_LEASE_SECONDS
    shutdown_grace: float = Field(default=DEFAULT_SHUTDOWN_GRACE_SECONDS, ge=0)
    handler_modules: Annotated[tuple[str, ...], NoDecode] = DEFAULT_HANDLER_MODULES
    inline: bool = False
    retention_days: PositiveSeconds = DEFAULT_RETENTION_DAYS
    failed_retention_days: PositiveSeconds = DEFAULT_FAILED_RETENTION_DAYS
    max_payload_bytes: int = Field(default=DEFAULT_MAX_PAYLOAD_BYTES, gt=0)
    cors_origins: Annotated[tuple[str, ...], NoDecode] = ()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"

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

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _backoff_order(self) -> Self:
        if self.retry_backoff_base > self.retry_backoff_max:
            raise ValueError(
                f"RETRY_BACKOFF_BASE ({self.retry_backoff_base}) must not exceed "
                f"RETRY_BACKOFF_MAX ({self.retry_backoff_max})"
            )
        return self

    @property
    def is_sqlite(self) -> bool:
        """True when the database is an embedded SQLite file."""
        return self.database_url.startswith("sqlite")


class SettingsError(Exception):
    """Raised with a readable message when the environment holds a bad setting."""


def describe_validation_error(error: ValidationError) -> str:
    """Render a pydantic error as lines naming each variable and its bad value."""
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "settings"
        name = f"{ENV_PREFIX}{field.upper()}" if item["loc"] else "settings"
        value = item.get("input")
        shown = "" if isinstance(value, dict) else f"={value!r}"
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"invalid setting {name}{shown}: {message}")
    return "\n".join(lines)


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment, raising SettingsError with a readable message."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise SettingsError(describe_validation_error(exc)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()
