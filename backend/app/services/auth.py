"""API tokens: created once and shown once, stored only as SHA-256 hashes."""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Integer, Table, and_, bindparam, select, update
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement

from app.db import Database, dialect_of, now_sql
from app.models import ApiToken
from app.models.types import UTCDateTime, utcnow
from app.services import hotpath

TOKEN_PREFIX = "ap_"  # noqa: S105 - a prefix, not a secret
TOKEN_BYTES = 32
LAST_USED_RESOLUTION = timedelta(minutes=1)
#: Built once: every API request runs it, and building a statement and its cache key each
#: time cost about a fifth of the lookup's CPU.
_TOKENS: Table = ApiToken.__table__  # type: ignore[assignment]
_BY_HASH = select(
    _TOKENS.c.id, _TOKENS.c.user_id, _TOKENS.c.is_admin, _TOKENS.c.last_used_at
).where(_TOKENS.c.token_hash == bindparam("token_hash"), _TOKENS.c.revoked_at.is_(None))


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a user's token, or an admin's."""

    token_id: int
    user_id: str
    is_admin: bool
    needs_touch: bool = False

    @property
    def scope(self) -> str | None:
        """The user whose rows this caller may see; None means every user's (admin)."""
        return None if self.is_admin else self.user_id


def hash_token(token: str) -> str:
    """The stored form of a token."""
    return hashlib.sha256(token.encode()).hexdigest()


def looks_like_token(token: str) -> bool:
    """A cheap shape check before any database work."""
    return token.startswith(TOKEN_PREFIX) and 16 <= len(token) <= 128 and token.isascii()


async def create_token(
    session: AsyncSession, *, user_id: str, is_admin: bool = False, name: str | None = None
) -> tuple[ApiToken, str]:
    """A new token for ``user_id``; returns the row and the plain token (shown once)."""
    if not user_id or len(user_id) > 255:
        raise ValueError(f"user must be 1..255 characters, got {user_id!r}")
    if name is not None and len(name) > 255:
        raise ValueError(f"name must be at most 255 characters, got {len(name)}")
    plain = TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)
    row = ApiToken(token_hash=hash_token(plain), user_id=user_id, is_admin=is_admin, name=name)
    session.add(row)
    await session.flush()
    return row, plain


async def authenticate(db: Database, token: str) -> Principal | None:
    """The caller behind ``token``, or None when it is unknown or revoked: a read of its
    own, on the bare driver where it can (every API request runs it)."""
    if not looks_like_token(token):
        return None
    params = {"token_hash": hash_token(token)}
    rows = await db.read_alone(_BY_HASH, params)
    if rows is None:
        async with db.read_transaction() as session:
            rows = list((await session.execute(_BY_HASH, params)).all())
    if not rows:
        return None
    [row] = rows
    return Principal(row.id, row.user_id, row.is_admin, needs_touch(row.last_used_at))


def needs_touch(last_used_at: datetime | None) -> bool:
    """True when last_used_at is older than its resolution (write at most once a minute)."""
    return last_used_at is None or utcnow() - last_used_at >= LAST_USED_RESOLUTION


async def touch_token(session: AsyncSession, token_id: int) -> None:
    """Record a use, at most once a minute."""
    cutoff = utcnow() - LAST_USED_RESOLUTION
    await session.execute(
        update(ApiToken)
        .where(ApiToken.id == token_id)
        .where((ApiToken.last_used_at.is_(None)) | (ApiToken.last_used_at < cutoff))
        .values(last_used_at=now_sql(dialect_of(session)))
    )


#: touch_token's statement with its values bound (for a bare sqlite3 connection).
_TOUCH = (
    update(ApiToken)
    .where(ApiToken.id == bindparam("t_id", type_=Integer()))
    .where(
        ApiToken.last_used_at.is_(None)
        | (ApiToken.last_used_at < bindparam("t_cutoff", type_=UTCDateTime()))
    )
    .values(last_used_at=bindparam("t_now", type_=UTCDateTime()))
)


def touch_token_sqlite3(conn: sqlite3.Connection, dialect: Dialect, token_id: int) -> None:
    """``touch_token`` on a bare sqlite3 connection (Database.write_if_free)."""
    now = utcnow()
    params = {"t_id": token_id, "t_cutoff": now - LAST_USED_RESOLUTION, "t_now": now}
    hotpath.sqlite3_fetch(conn, dialect, _TOUCH, params)


def token_active_where() -> ColumnElement[bool]:
    """The token ``:token_id`` exists and is not revoked (a stream's poll reads it)."""
    return and_(_TOKENS.c.id == bindparam("token_id"), _TOKENS.c.revoked_at.is_(None))


async def list_tokens(session: AsyncSession) -> list[ApiToken]:
    """Every token row (hashes stay inside)."""
    return list((await session.scalars(select(ApiToken).order_by(ApiToken.id))).all())


async def revoke_token(session: AsyncSession, token_id: int) -> bool:
    """Revoke a token; False when it does not exist or was already revoked."""
    result = await session.execute(
        update(ApiToken)
        .where(ApiToken.id == token_id, ApiToken.revoked_at.is_(None))
        .values(revoked_at=now_sql(dialect_of(session)))
        .returning(ApiToken.id)
    )
    return result.first() is not None


async def revoke_named(session: AsyncSession, *, user_id: str, name: str) -> int:
    """Revoke the user's active tokens labelled ``name`` (a rotation: ``token create
    --replace``); returns how many."""
    result = await session.execute(
        update(ApiToken)
        .where(
            ApiToken.user_id == user_id,
            ApiToken.name == name,
            ApiToken.revoked_at.is_(None),
        )
        .values(revoked_at=now_sql(dialect_of(session)))
        .returning(ApiToken.id)
    )
    return len(result.all())
