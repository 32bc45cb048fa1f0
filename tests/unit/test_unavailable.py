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
