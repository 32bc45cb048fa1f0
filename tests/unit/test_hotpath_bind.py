"""hotpath.Prepared.bind: a value repeated in positions of a type that declares
``shares_bind_processor`` is processed once, and nothing else is shared."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Column,
    Dialect,
    Enum,
    Integer,
    MetaData,
    String,
    Table,
    bindparam,
    insert,
    select,
)
from sqlalchemy.dialects import sqlite
from sqlalchemy.dialects.sqlite import DATETIME
from sqlalchemy.types import TypeDecorator

from app.models.types import UTCDateTime
from app.services import hotpath


class Counted(TypeDecorator[str]):
    """Upper-cases bound strings and counts every call of its bind processor; declares
    that its processors are interchangeable."""

    impl = String
    cache_ok = True
    shares_bind_processor = True
    calls = 0

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        Counted.calls += 1
        return None if value is None else value.upper()


class Undeclared(Counted):
    """The same processing, not declared shareable: never shared."""

    shares_bind_processor = False


def _bind(statement: Any, params: dict[str, Any]) -> list[Any]:
    return hotpath.Prepared(statement, sqlite.dialect()).bind(params)[1]


def test_the_same_object_in_a_shared_type_is_processed_once() -> None:
    Counted.calls = 0
    word = "clock"
    statement = select(*(bindparam(n, type_=Counted()) for n in "abc"))
    assert _bind(statement, {"a": word, "b": word, "c": word}) == ["CLOCK"] * 3
    assert Counted.calls == 1


def test_equal_but_distinct_values_are_each_processed() -> None:
    Counted.calls = 0
    statement = select(bindparam("a", type_=Counted()), bindparam("b", type_=Counted()))
    first, second = "".join(["x", "y"]), "".join(["x", "y"])
    assert first is not second
    assert _bind(statement, {"a": first, "b": second}) == ["XY", "XY"]
    assert Counted.calls == 2


def test_a_run_is_processed_once_and_a_different_value_breaks_it() -> None:
    Counted.calls = 0
    statement = select(*(bindparam(n, type_=Counted()) for n in "abcd"))
    assert _bind(statement, {"a": "p", "b": "q", "c": "q", "d": "p"}) == ["P", "Q", "Q", "P"]
    assert Counted.calls == 3  # a, b (c repeats b), d (its neighbour differs)


def test_types_that_do_not_declare_it_are_never_shared() -> None:
    Counted.calls = 0
    word = "w"
    statement = select(*(bindparam(n, type_=Undeclared()) for n in "ab"))
    assert _bind(statement, {"a": word, "b": word}) == ["W", "W"]
    assert Counted.calls == 2


class Color(enum.Enum):
    R = "r"


class Size(enum.Enum):
    S = "s"


def test_enums_with_equal_cache_keys_bind_through_their_own_enum() -> None:
    """Enum's cache key leaves out its enum class: equal keys, different processing."""
    table = Table(
        "t",
        MetaData(),
        Column("id", Integer, primary_key=True),
        Column("color", Enum(Color, length=10)),
        Column("size", Enum(Size, length=10)),
    )
    assert table.c.color.type._static_cache_key == table.c.size.type._static_cache_key
    prepared = hotpath.Prepared(insert(table), sqlite.dialect(), ("color", "size"))
    assert prepared.bind({"color": Color.R, "size": Size.S})[1] == ["R", "S"]


def test_sqlite_datetimes_with_different_formats_keep_their_own() -> None:
    """SQLite DATETIME's storage format is not in its cache key."""
    when = datetime(2024, 1, 1, 1, 1, 1, 123456)
    statement = select(
        bindparam("full", type_=DATETIME()),
        bindparam("short", type_=DATETIME(truncate_microseconds=True)),
    )
    assert _bind(statement, {"full": when, "short": when}) == [
        "2024-01-01 01:01:01.123456",
        "2024-01-01 01:01:01",
    ]


def test_enqueue_clocks_bind_as_before() -> None:
    """UTCDateTime (the enqueue's three clocks): naive UTC text on SQLite, each position."""
    now = datetime(2026, 12, 6, 3, 4, 5, 123456, tzinfo=UTC)
    statement = select(*(bindparam(n, type_=UTCDateTime()) for n in ("s", "c", "u")))
    prepared = hotpath.Prepared(statement, sqlite.dialect())
    assert [before for _, _, before in prepared._shapes[()][1]] == [-1, 0, 1]
    assert prepared.bind({"s": now, "c": now, "u": None})[1] == [
        "2026-12-06 03:04:05.123456",
        "2026-12-06 03:04:05.123456",
        None,
    ]


def test_engines_that_encode_json_differently_do_not_share_a_compiled_statement() -> None:
    """Compiled statements are shared per dialect *flavor*: an engine's own JSON serializer
    gets processors of its own (keyed by the dialect's name alone, the first engine's
    served the other)."""
    from sqlalchemy import JSON

    statement = select(bindparam("doc", type_=JSON()))
    plain, other = sqlite.dialect(), sqlite.dialect()
    compact = sqlite.dialect(json_serializer=lambda value: "compact")
    assert hotpath.prepared(statement, plain) is hotpath.prepared(statement, other)
    assert hotpath.prepared(statement, compact) is not hotpath.prepared(statement, plain)
    assert hotpath.prepared(statement, compact).bind({"doc": {"a": 1}})[1] == ["compact"]
    assert hotpath.prepared(statement, plain).bind({"doc": {"a": 1}})[1] == ['{"a": 1}']


def test_a_serializer_need_not_be_hashable() -> None:
    from sqlalchemy import JSON

    class Encoder:
        __hash__ = None  # type: ignore[assignment]

        def __eq__(self, other: object) -> bool:
            return isinstance(other, Encoder)

        def __call__(self, value: Any) -> str:
            return "encoded"

    statement = select(bindparam("doc", type_=JSON()))
    dialect = sqlite.dialect(json_serializer=Encoder())
    assert hotpath.prepared(statement, dialect).bind({"doc": [1]})[1] == ["encoded"]
