"""hotpath.Prepared.bind: a value repeated in positions of equal types is processed once,
and nothing else is shared."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Dialect, String, bindparam, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.types import TypeDecorator

from app.models.types import UTCDateTime
from app.services import hotpath


class Counted(TypeDecorator[str]):
    """Upper-cases bound strings and counts every call of its bind processor."""

    impl = String
    cache_ok = True
    calls = 0

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        Counted.calls += 1
        return None if value is None else value.upper()


class Uncached(Counted):
    """The same, but not safe to cache: never shared."""

    cache_ok = False


def _bind(statement: Any, params: dict[str, Any]) -> list[Any]:
    return hotpath.Prepared(statement, sqlite.dialect()).bind(params)[1]


def test_the_same_object_in_equal_types_is_processed_once() -> None:
    Counted.calls = 0
    word = "clock"
    statement = select(
        bindparam("a", type_=Counted()),
        bindparam("b", type_=Counted()),
        bindparam("c", type_=Counted()),
    )
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


def test_unequal_or_uncacheable_types_are_never_shared() -> None:
    Counted.calls = 0
    word = "w"
    statement = select(
        bindparam("a", type_=Counted()),
        bindparam("b", type_=String(5)),
        bindparam("c", type_=Uncached()),
        bindparam("d", type_=Uncached()),
    )
    assert _bind(statement, {"a": word, "b": word, "c": word, "d": word}) == ["W", "w", "W", "W"]
    assert Counted.calls == 3


def test_enqueue_clocks_bind_as_before() -> None:
    """UTCDateTime (the enqueue's three clocks): naive UTC text on SQLite, each position."""
    now = datetime(2026, 12, 6, 3, 4, 5, 123456, tzinfo=UTC)
    statement = select(*(bindparam(n, type_=UTCDateTime()) for n in ("s", "c", "u")))
    assert _bind(statement, {"s": now, "c": now, "u": None}) == [
        "2026-12-06 03:04:05.123456",
        "2026-12-06 03:04:05.123456",
        None,
    ]


def test_types_holding_an_uncacheable_type_are_never_shared() -> None:
    """ARRAY(Uncached()) twice: equal outer keys, but the inner type opted out of caching,
    so its state may differ: each position keeps its own processor."""
    statement = select(
        bindparam("a", type_=ARRAY(Uncached())), bindparam("b", type_=ARRAY(Uncached()))
    )
    assert hotpath._type_key(ARRAY(Uncached())) is None
    assert hotpath._type_key(ARRAY(Counted())) is not None
    prepared = hotpath.Prepared(statement, postgresql.dialect(paramstyle="numeric_dollar"))
    assert [before for _, _, before in prepared._shapes[()][1]] == [-1, -1]
