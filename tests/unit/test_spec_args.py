"""queue._SpecArgs: a one-row enqueue's arguments made straight from a TaskSpec are the
SQL and arguments ``Prepared.bind`` makes from the spec's parameters, on both dialects,
with and without a pinned clock, for the INSERTs that use it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
from sqlalchemy.dialects.sqlite.aiosqlite import SQLiteDialect_aiosqlite
from sqlalchemy.engine import Dialect

from app.services import hotpath, queue

# The dialects of the application's drivers, as its engines make them.
DIALECTS = {"sqlite": SQLiteDialect_aiosqlite, "postgresql": PGDialect_asyncpg}
NOW = datetime(2026, 12, 6, 23, 0, 0, 123456, tzinfo=UTC)


def _statements(dialect: str, pinned: bool) -> list[Any]:
    return [
        queue._insert_statement(dialect, pinned),
        queue._insert_returning_all(dialect, pinned),
    ]


def _expected(statement: Any, dialect: Dialect, spec: queue.TaskSpec, now: datetime) -> Any:
    [params] = queue._with_clock([spec.row()], now)
    return hotpath.prepared(statement, dialect, tuple(params)).bind(params)


SPECS = [
    queue.TaskSpec(kind="k"),
    queue.TaskSpec(
        kind="chapter_analysis",
        payload={"text": "é ✓ \u2028", "n": [1, 2.5, None, True], "deep": {"a": {"b": []}}},
        priority=9,
        queue="reports",
        max_retries=0,
        timeout_seconds=7,
        scheduled_at=datetime(2030, 1, 2, 3, 4, 5, 6, tzinfo=timezone(timedelta(hours=5))),
        user_id="u",
        project_id="p",
        chapter_id="c",
        idempotency_key="key",
    ),
    queue.TaskSpec(kind="k", scheduled_at=datetime(2030, 1, 2, 3, 4, 5)),  # naive: UTC
]


@pytest.mark.parametrize("dialect_name", sorted(DIALECTS))
@pytest.mark.parametrize("pinned", [False, True])
@pytest.mark.parametrize("spec", SPECS, ids=["defaults", "every-field", "naive-schedule"])
def test_the_arguments_are_what_bind_makes(
    dialect_name: str, pinned: bool, spec: queue.TaskSpec
) -> None:
    dialect = DIALECTS[dialect_name]()
    for statement in _statements(dialect_name, pinned):
        binder = queue._SpecArgs(statement, dialect)
        sql, args = _expected(statement, dialect, spec, NOW)
        assert binder.sql == sql
        # Unpinned, SQLite's clock is read at the call: pin it for the comparison.
        assert binder.args(spec, NOW) == args
        assert binder.prepared is hotpath.prepared(statement, dialect, queue._ROW_KEYS)


def test_the_row_keys_are_the_parameters_of_a_one_row_enqueue() -> None:
    [params] = queue._with_clock([queue.TaskSpec(kind="k").row()], NOW)
    assert tuple(params) == queue._ROW_KEYS


def test_unpinned_sqlite_reads_the_clock_once_for_its_three_uses() -> None:
    binder = queue._SpecArgs(queue._insert_statement("sqlite", False), DIALECTS["sqlite"]())
    before = datetime.now(UTC).replace(tzinfo=None)
    args = binder.args(queue.TaskSpec(kind="k"), None)
    clocks = args[-3:]
    assert clocks[0] == clocks[1] == clocks[2]
    assert str(before) <= clocks[0] <= str(datetime.now(UTC).replace(tzinfo=None))


def test_postgresql_unpinned_leaves_the_clock_to_the_server() -> None:
    statement = queue._insert_statement("postgresql", False)
    binder = queue._SpecArgs(statement, DIALECTS["postgresql"]())
    assert "now()" in binder.sql
    assert len(binder.args(queue.TaskSpec(kind="k"), None)) == len(queue._SPEC_FIELDS) + 1


def test_an_engines_own_json_serializer_takes_the_usual_bind() -> None:
    dialect = SQLiteDialect_aiosqlite(json_serializer=lambda v: "x")
    assert queue._spec_args(queue._insert_statement("sqlite", True), dialect) is None


def test_the_applications_statements_have_a_binder() -> None:
    for name, make in DIALECTS.items():
        for pinned in (False, True):
            for statement in _statements(name, pinned):
                assert isinstance(queue._spec_args(statement, make()), queue._SpecArgs)


def test_a_statement_it_does_not_know_takes_the_usual_bind(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Not an error: another parameter order (another SQLAlchemy) or a column that binds
    through Python means the usual bind, said once in the log."""
    from sqlalchemy import String, bindparam, insert
    from sqlalchemy.types import TypeDecorator

    class Lowered(TypeDecorator[str]):
        impl = String
        cache_ok = True

        def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
            return None if value is None else value.lower()

    values = {**queue._insert_values("sqlite", True), "kind": bindparam("kind", type_=Lowered())}
    statement = insert(queue.TASKS).values(**values)
    with caplog.at_level("WARNING"):
        assert queue._spec_args(statement, SQLiteDialect_aiosqlite()) is None
        assert queue._spec_args(statement, SQLiteDialect_aiosqlite()) is None
    assert [r.message for r in caplog.records if "usual way" in r.message] != []
    assert len([r for r in caplog.records if "usual way" in r.message]) == 1


def test_a_dict_subclass_payload_binds_as_its_text() -> None:
    class Subclass(dict[str, Any]):
        pass

    spec = queue.TaskSpec(kind="k", payload=Subclass(a=[1, "é"]))
    for name, make in DIALECTS.items():
        dialect = make()
        statement = queue._insert_statement(name, True)
        assert (
            queue._SpecArgs(statement, dialect).args(spec, NOW)
            == _expected(statement, dialect, spec, NOW)[1]
        )


_TEXT = st.text(min_size=1, max_size=20).filter(lambda s: "\x00" not in s)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=150, deadline=None)
@given(
    payload=st.dictionaries(_TEXT, _JSON, max_size=4),
    user=st.none() | _TEXT,
    when=st.none()
    | st.datetimes(
        min_value=datetime(1970, 1, 2), max_value=datetime(2999, 1, 1), timezones=st.just(UTC)
    ),
    priority=st.integers(1, 10),
)
def test_any_valid_spec_binds_alike(
    payload: dict[str, Any], user: str | None, when: datetime | None, priority: int
) -> None:
    try:
        spec = queue.TaskSpec(
            kind="k", payload=payload, user_id=user, scheduled_at=when, priority=priority
        )
    except queue.InvalidTaskError:
        return  # not a spec anyone can enqueue
    for name, make in DIALECTS.items():
        dialect = make()
        for statement in _statements(name, True):
            assert (
                queue._SpecArgs(statement, dialect).args(spec, NOW)
                == _expected(statement, dialect, spec, NOW)[1]
            )
