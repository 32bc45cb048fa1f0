"""Dependencies: the database, the settings, and who is calling."""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.convertors import PathConvertor, register_url_convertor

from app.config import Settings
from app.db import Database
from app.services import auth
from app.services.auth import Principal
from app.text import error_line

logger = logging.getLogger("app.api")
bearer = HTTPBearer(auto_error=False, description="An API token: `async-processor token create`")
UNAUTHORIZED_HEADERS = {"WWW-Authenticate": "Bearer"}


async def get_db(request: Request) -> Database:
    """The app's Database (async: FastAPI runs a plain ``def`` dependency in a thread)."""
    db: Database = request.app.state.db
    return db


async def get_settings(request: Request) -> Settings:
    """The app's Settings."""
    settings: Settings = request.app.state.settings
    return settings


MAX_ID = 2**63 - 1
#: A task or notification id in a path: 1 .. the largest BIGINT.
TaskId = Annotated[int, Path(ge=1, le=MAX_ID)]


class AnyText(PathConvertor):
    """``{name:anytext}``: a path parameter that may hold "/" (sent as %2F, which the router
    sees decoded) and any other character. Starlette's ``path`` stops at a line break, so
    a value holding one would reach no route (404); this way the parameter's own
    validation answers it, as it answers every other bad value (422)."""

    regex = r"[\s\S]*"


register_url_convertor("anytext", AnyText())
NotificationId = Annotated[int, Path(ge=1, le=MAX_ID)]

DbDep = Annotated[Database, Depends(get_db)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail, headers=UNAUTHORIZED_HEADERS)


async def current_principal(
    db: DbDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    """The token's owner; 401 for a missing, malformed, unknown or revoked token."""
    if credentials is None:
        raise _unauthorized("missing bearer token (Authorization: Bearer <token>)")
    if credentials.scheme.lower() != "bearer" or not auth.looks_like_token(credentials.credentials):
        raise _unauthorized("malformed bearer token")
    principal = await auth.authenticate(db, credentials.credentials)
    if principal is None:
        raise _unauthorized("unknown or revoked token")
    key = (id(db), principal.token_id)
    if principal.needs_touch and key not in _TOUCHING:
        # Best effort, after the answer is on its way: a request that only reads must not
        # wait for (or fail on) the write lock another process holds (SQLite: 503 after
        # the busy timeout), for a bookkeeping column written once a minute at most.
        _TOUCHING[key] = asyncio.create_task(_touch(db, key))
    return principal


#: (database, token id) whose last_used_at is being written; the task is kept until it ends.
_TOUCHING: dict[tuple[int, int], asyncio.Task[None]] = {}


async def _touch(db: Database, key: tuple[int, int]) -> None:
    try:
        if db.dialect == "sqlite":
            # Only when the write lock is free now: waiting for it would hold this
            # process's own writers (an enqueue) behind a bookkeeping column.
            await db.write_if_free(partial(auth.touch_token_sqlite3, token_id=key[1]))
            return
        async with db.write_transaction() as session:
            await auth.touch_token(session, key[1])
    except Exception as exc:  # the next request tries again
        logger.info("could not record the use of token %s (%s)", key[1], error_line(exc))
    finally:
        _TOUCHING.pop(key, None)


async def finish_touches(db: Database) -> None:
    """Wait for this database's last_used_at writes (before it is closed)."""
    pending = [task for (owner, _), task in list(_TOUCHING.items()) if owner == id(db)]
    if pending:
        await asyncio.wait(pending, timeout=10)


CallerDep = Annotated[Principal, Depends(current_principal)]
