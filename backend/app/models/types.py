"""Column types that behave the same on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Dialect
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.types import TypeDecorator

#: JSON everywhere, stored as JSONB on PostgreSQL.
JSONType = JSON().with_variant(JSONB(), "postgresql")


def pg_array(item: Any) -> ARRAY[Any]:
    """PostgreSQL: a one-dimensional array of ``item``, for a batch bound as one parameter
    per column and unnested. One dimension, said outright: left unsaid, SQLAlchemy takes a
    list whose first element is a list (a JSON result that is an array) for a
    multi-dimensional array, and unnest flattens it, pairing one task with the pieces of
    another's value."""
    return ARRAY(item, dimensions=1)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on both engines.

    PostgreSQL stores ``timestamptz``. SQLite has no such type: values are stored as
    naive UTC text in one fixed format, so comparisons between stored values and bound
    "now" parameters stay correct as string comparisons.
    """

    impl = DateTime(timezone=True)
    cache_ok = True
    #: Its processing depends on the dialect alone (no arguments): the hot path may bind a
    #: value repeated in one statement once (app.services.hotpath).
    shares_bind_processor = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):  # raw text from a hand-written SQLite query
            value = datetime.fromisoformat(value)
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)  # type: ignore[no-any-return]
        return value.astimezone(UTC)  # type: ignore[no-any-return]


def utcnow() -> datetime:
    """The host's current time, timezone-aware UTC."""
    return datetime.now(UTC)
