"""Which driver errors mean "the database cannot serve right now" (API 503, daemon backs off)."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import DBAPIError, IntegrityError, ProgrammingError

from app.db import database_unavailable
from app.services.processor.looper import is_transient


class _DriverError(Exception):
    def __init__(self, message: str, sqlstate: str | None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def _error(
    sqlstate: str | None, message: str = "x", kind: type[DBAPIError] = DBAPIError
) -> DBAPIError:
    return kind("SELECT 1", None, _DriverError(message, sqlstate))


@pytest.mark.parametrize(
    ("sqlstate", "message"),
    [
        ("08006", "connection failure"),
        ("08001", "could not connect"),
        ("53300", "sorry, too many clients already"),
        ("57P01", "terminating connection due to administrator command"),
        ("57P03", "the database system is starting up"),
        ("28P01", "password authentication failed"),
        ("3D000", 'database "x" does not exist'),
        ("55000", 'database "x" is not currently accepting connections'),
    ],
)
def test_unavailable(sqlstate: str, message: str) -> None:
    error = _error(sqlstate, message)
    assert database_unavailable(error) and is_transient(error)


@pytest.mark.parametrize(
    ("sqlstate", "message", "kind"),
    [
        ("23505", "duplicate key value", IntegrityError),
        ("42P01", 'relation "x" does not exist', ProgrammingError),
        ("55000", "cannot refresh materialized view concurrently", DBAPIError),
        ("57014", "canceling statement due to user request", DBAPIError),
        (None, "no code at all", DBAPIError),
    ],
)
def test_a_statement_error_is_not_unavailability(
    sqlstate: str | None, message: str, kind: type[DBAPIError]
) -> None:
    assert not database_unavailable(_error(sqlstate, message, kind))


@pytest.mark.parametrize(
    ("sqlstate", "message", "transient"),
    [
        # a value the driver could not send, its text echoing the value: judged by its code
        ("22000", "invalid input for query argument $2: 'RuntimeError: connection \\ud800'", False),
        ("22P05", "unsupported Unicode escape sequence; connection closed", False),
        ("23505", "duplicate key value violates unique constraint", False),
        ("40001", "could not serialize access due to concurrent update", True),
        ("40P01", "deadlock detected", True),
        ("55P03", "could not obtain lock on row", True),
        ("57014", "canceling statement due to statement timeout", True),
        (None, "connection is closed", True),  # no code: the text says what it is
        (None, "no such savepoint", False),
    ],
)
def test_transient_by_sqlstate_not_by_text(
    sqlstate: str | None, message: str, transient: bool
) -> None:
    assert is_transient(_error(sqlstate, message)) is transient


def test_a_value_that_cannot_be_converted_is_never_transient() -> None:
    error = DBAPIError("SELECT 1", None, UnicodeEncodeError("utf-8", "connection", 0, 1, "x"))
    assert not is_transient(error)
    assert not is_transient(ValueError("connection reset"))


@pytest.mark.parametrize(
    ("sqlstate", "message", "transient"),
    [
        ("08003", "connection does not exist", True),
        ("57P01", "terminating connection due to administrator command", True),
        ("40P01", "deadlock detected", True),
        ("22000", "invalid input for query argument $1: 'connection closed \\ud800'", False),
    ],
)
def test_a_bare_driver_error_is_judged_by_its_own_sqlstate(
    sqlstate: str, message: str, transient: bool
) -> None:
    """The hot path can meet asyncpg's errors unwrapped: their own sqlstate counts."""
    assert is_transient(_DriverError(message, sqlstate)) is transient


@pytest.mark.parametrize(
    ("sqlstate", "status"), [("40P01", 503), ("40001", 503), ("23505", None), ("08006", 503)]
)
async def test_the_api_answers_503_to_a_deadlock(sqlstate: str, status: int | None) -> None:
    """A deadlock or a serialization failure is the database asking for a retry: a 503 with
    Retry-After, not a 500. Any other statement error stays a bug (re-raised)."""
    from starlette.requests import Request

    from app.api.errors import _on_dbapi_error

    request = Request({"type": "http", "method": "POST", "path": "/x", "headers": []})
    error = _error(sqlstate, "deadlock detected")
    if status is None:
        with pytest.raises(DBAPIError):
            await _on_dbapi_error(request, error)
        return
    response = await _on_dbapi_error(request, error)
    assert (response.status_code, response.headers["retry-after"]) == (503, "5")
