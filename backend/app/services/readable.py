"""Rows a hand edit left unreadable, shown value by value instead of failing the read.

SQLite keeps any value in any column (text in ``attempts``, ``'garbage'`` in
``created_at``, JSON that does not parse), and PostgreSQL keeps what Python cannot hold (a
date before year 1, JSON nested deeper than Python decodes). One row edited by hand into
such a value failed every read that met it: the whole page of ``GET /tasks`` and the
dashboard (500 for every admin), the CLI's ``tasks list`` (a traceback), a user's
notification feed. The reads decode with the columns' own types first (no cost when every
row is sound); when that fails they read the same rows again as raw values and convert
each value alone. A value that cannot be read becomes None and its column is named in the
row's ``unreadable`` list, so the rest of that row, and every other row, show as stored.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

from sqlalchemy import JSON, Boolean, Float, Integer, Text, cast, extract, type_coerce
from sqlalchemy.sql.elements import ColumnElement, KeyedColumnElement
from sqlalchemy.types import NullType

from app.models.types import UTCDateTime

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: What decoding a stored value can raise (JSON too deep: RecursionError; a BC date:
#: OverflowError or ValueError; 'infinity' as seconds: ArithmeticError).
UNREADABLE_ERRORS = (ValueError, TypeError, ArithmeticError, RecursionError, AttributeError)


def _int(value: Any) -> int:
    if isinstance(value, int):  # bool included: a hand-written true is 1
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        return int(value.strip())
    raise TypeError(f"not a whole number: {value!r}")


def _float(value: Any) -> float:
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        return float(value)
    raise TypeError(f"not a number: {value!r}")


def _bool(value: Any) -> bool:
    if isinstance(value, int | float):  # SQLite's 0 / 1 (and a hand-written 2)
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in {"true", "t", "1", "false", "f", "0"}:
        return value.strip().lower() in {"true", "t", "1"}
    raise TypeError(f"not a boolean: {value!r}")


def _datetime(value: Any) -> datetime:
    if isinstance(value, Decimal):  # PostgreSQL's seconds since the epoch (raw_columns)
        return _EPOCH + timedelta(microseconds=int(value * 1_000_000))
    if isinstance(value, str):
        value = datetime.fromisoformat(value.strip())
    if not isinstance(value, datetime):
        raise TypeError(f"not a time: {value!r}")
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _json(value: Any) -> Any:
    if isinstance(value, str | bytes):
        return json.loads(value)
    return value


def _str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):  # SQLite's affinity may keep a number
        return str(value)
    raise TypeError(f"not text: {value!r}")


def as_text(value: Any) -> str:
    """A stored name as text, whatever a hand edit wrote (SQLite keeps bytes or a number
    where a kind or a queue belongs), for a notification's data, a sort, a metric's label."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def converter(column: KeyedColumnElement[Any]) -> Callable[[Any], Any]:
    """The function that reads one stored value of ``column`` (raises when it cannot)."""
    kind = column.type
    if isinstance(kind, UTCDateTime):
        return _datetime
    if isinstance(kind, JSON):
        return _json
    if isinstance(kind, Boolean):
        return _bool
    if isinstance(kind, Integer):
        return _int
    if isinstance(kind, Float):
        return _float
    return _str


def raw_columns(
    columns: Iterable[KeyedColumnElement[Any]], dialect: str
) -> list[ColumnElement[Any]]:
    """``columns`` selected so that the driver hands over what is stored, undecoded.
    SQLite's as they are. PostgreSQL's times as seconds since the epoch (asyncpg itself
    fails on a BC date; a time as text would follow the session's DateStyle), JSON as
    text; the rest as they are (asyncpg reads any number, boolean or text it holds)."""
    if dialect != "postgresql":
        return [type_coerce(c, NullType()).label(c.key) for c in columns]
    shown: list[ColumnElement[Any]] = []
    for c in columns:
        if isinstance(c.type, UTCDateTime):
            shown.append(extract("epoch", c).label(c.key))
        elif isinstance(c.type, JSON):
            shown.append(cast(c, Text()).label(c.key))
        else:
            shown.append(c)
    return shown


def readable(columns: Iterable[KeyedColumnElement[Any]], row: Any) -> SimpleNamespace:
    """``row`` (raw values, or values already decoded) with each value read alone: one that
    cannot be read is None, its column named in ``unreadable``."""
    values: dict[str, Any] = {}
    unreadable: list[str] = []
    for column in columns:
        value = getattr(row, column.key)
        if value is not None:
            try:
                value = converter(column)(value)
            except UNREADABLE_ERRORS:
                value = None
                unreadable.append(column.key)
        values[column.key] = value
    return SimpleNamespace(**values, unreadable=sorted(unreadable))
