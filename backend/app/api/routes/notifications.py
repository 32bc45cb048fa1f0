"""Notifications: a user's feed, paged forward by id; mark read."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query

from app.api.deps import CallerDep, DbDep
from app.api.errors import ERRORS
from app.api.schemas import Marked, NotificationPage, NotificationPublic
from app.services import notifications

router = APIRouter(prefix="/notifications", tags=["notifications"], responses=ERRORS)


@router.get("", response_model=NotificationPage)
async def list_notifications(
    caller: CallerDep,
    db: DbDep,
    after_id: Annotated[
        int | None, Query(ge=0, description="Only ids after this one, oldest first")
    ] = None,
    unread_only: bool = False,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> NotificationPage:
    """Newest first; with ``after_id``, the ones after it oldest first (poll with the
    largest id seen), and the unread count."""
    async with db.read_transaction() as session:
        rows = await notifications.list_for_user(
            session, user_id=caller.scope, after_id=after_id, unread_only=unread_only, limit=limit
        )
        unread = await notifications.unread_count(session, user_id=caller.scope)
    return NotificationPage(items=[NotificationPublic.of(n) for n in rows], unread_count=unread)


@router.post("/read-all", response_model=Marked)
async def mark_all_read(caller: CallerDep, db: DbDep) -> Marked:
    """Mark every unread notification read."""
    async with db.write_transaction() as session:
        return Marked(marked=await notifications.mark_all_read(session, user_id=caller.scope))


@router.post(
    "/{notification_id}/read",
    response_model=Marked,
    responses={404: {"description": "No such notification (or not yours)"}},
)
async def mark_read(notification_id: int, caller: CallerDep, db: DbDep) -> Marked:
    """Mark one notification read."""
    async with db.write_transaction() as session:
        found = await notifications.mark_read(session, notification_id, user_id=caller.scope)
    if not found:
        raise HTTPException(404, f"notification {notification_id} not found")
    return Marked(marked=1)
