"""Notifications: a user's feed, paged forward by id; mark read."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Query, Request
from fastapi.responses import StreamingResponse

from app.api.deps import MAX_ID, CallerDep, DbDep, NotificationId
from app.api.errors import ERRORS
from app.api.schemas import Marked, NotificationPage, NotificationPublic
from app.db import Database
from app.services import notifications
from app.services.auth import Principal

router = APIRouter(prefix="/notifications", tags=["notifications"], responses=ERRORS)


@router.get("", response_model=NotificationPage)
async def list_notifications(
    caller: CallerDep,
    db: DbDep,
    after_id: Annotated[
        int | None, Query(ge=0, le=MAX_ID, description="Only ids after this one, oldest first")
    ] = None,
    unread_only: bool = False,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    task_id: Annotated[int | None, Query(ge=1, le=MAX_ID, description="Only this task's")] = None,
) -> NotificationPage:
    """Newest first; with ``after_id``, the ones after it oldest first (poll with the
    largest id seen), and the unread count."""
    rows, unread = await notifications.page_for_user(
        db,
        user_id=caller.scope,
        after_id=after_id,
        unread_only=unread_only,
        limit=limit,
        task_id=task_id,
    )
    return NotificationPage(items=[NotificationPublic.of(n) for n in rows], unread_count=unread)


STREAM_POLL_SECONDS = 0.5
STREAM_KEEPALIVE_SECONDS = 15.0
_EVENT_ID = re.compile(r"[0-9]{1,19}")


def _sse(note: NotificationPublic) -> str:
    return f"id: {note.id}\nevent: notification\ndata: {note.model_dump_json()}\n\n"


async def _latest_id(db: Database, scope: str | None) -> int:
    async with db.read_transaction() as session:
        newest = await notifications.list_for_user(session, user_id=scope, limit=1)
    return newest[0].id if newest else 0


async def _events(
    request: Request, db: Database, caller: Principal, after_id: int
) -> AsyncIterator[str]:
    last, idle = after_id, 0.0
    stopping: asyncio.Event | None = getattr(request.app.state, "stopping", None)
    # The position first: a client that gets no notification before the stream ends (a
    # restart of the API) reconnects with it as Last-Event-ID instead of starting after
    # the newest, which skipped what was written meanwhile. (An id with no data moves the
    # client's last event id and dispatches no event.)
    yield f"retry: 2000\nid: {after_id}\n\n"
    while not await request.is_disconnected():
        if stopping is not None and stopping.is_set():
            return  # the server is stopping: the client reconnects (to another, or later)
        try:
            # Each poll checks the token in the same snapshot as the page it reads:
            # nothing committed after a revocation goes out.
            rows, active = await notifications.stream_page(
                db, user_id=caller.scope, after_id=last, token_id=caller.token_id, limit=100
            )
        except Exception:  # the database is away: keep the stream, try again
            rows, active = [], True
        if not active:
            return  # revoked: the client's reconnection gets its 401
        for row in rows:
            note = NotificationPublic.of(row)
            last = note.id
            yield _sse(note)
        idle = 0.0 if rows else idle + STREAM_POLL_SECONDS
        if idle >= STREAM_KEEPALIVE_SECONDS:
            idle = 0.0
            yield ": keep-alive\n\n"
        if len(rows) < 100:
            await _pause(stopping)


async def _pause(stopping: asyncio.Event | None) -> None:
    """STREAM_POLL_SECONDS, or less when the server begins to stop."""
    if stopping is None:
        await asyncio.sleep(STREAM_POLL_SECONDS)
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(STREAM_POLL_SECONDS):
            await stopping.wait()


@router.get(
    "/stream",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"}},
)
async def stream_notifications(
    request: Request,
    caller: CallerDep,
    db: DbDep,
    after_id: Annotated[int | None, Query(ge=0, le=MAX_ID)] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    """Server-Sent Events: each new notification of the caller as it commits. Resumes after
    ``Last-Event-ID`` (or ``after_id``); without either, starts with the next one. The
    stream ends once its token is revoked (checked every few seconds)."""
    start = after_id
    if last_event_id is not None and last_event_id.strip():
        event_id = last_event_id.strip()
        if not _EVENT_ID.fullmatch(event_id) or int(event_id) > MAX_ID:
            raise HTTPException(422, "Last-Event-ID must be a notification id (0 .. 2^63-1)")
        start = int(event_id)
    if start is None:
        start = await _latest_id(db, caller.scope)
    return StreamingResponse(
        _events(request, db, caller, start),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.post("/read-all", response_model=Marked)
async def mark_all_read(
    caller: CallerDep,
    db: DbDep,
    up_to_id: Annotated[
        int | None,
        Query(
            ge=0,
            le=MAX_ID,
            description="Only ids up to this one (the largest the client has shown), so "
            "that notifications that came after it stay unread",
        ),
    ] = None,
) -> Marked:
    """Mark every unread notification read, or with ``up_to_id`` those up to that id."""
    async with db.write_transaction() as session:
        marked = await notifications.mark_all_read(session, user_id=caller.scope, up_to_id=up_to_id)
    return Marked(marked=marked)


@router.post(
    "/{notification_id}/read",
    response_model=Marked,
    responses={404: {"description": "No such notification (or not yours)"}},
)
async def mark_read(notification_id: NotificationId, caller: CallerDep, db: DbDep) -> Marked:
    """Mark one notification read."""
    async with db.write_transaction() as session:
        found = await notifications.mark_read(session, notification_id, user_id=caller.scope)
    if not found:
        raise HTTPException(404, f"notification {notification_id} not found")
    return Marked(marked=1)
