"""Queue status: counts, oldest pending age, recent durations, live daemons."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from app.api.deps import CallerDep, DbDep
from app.api.errors import ERRORS
from app.services import stats

router = APIRouter(tags=["status"], responses=ERRORS)


@router.get("/status")
async def get_status(
    caller: CallerDep,
    db: DbDep,
    project_id: Annotated[str | None, Query(max_length=255)] = None,
) -> dict[str, Any]:
    """Counts per status and queue (the caller's own, for user tokens), the oldest pending
    task's age, durations over the last hour, and the live processors."""
    summary = await stats.summary(db, user_id=caller.scope, project_id=project_id)
    if caller.is_admin:
        summary["timeline"] = await stats.timeline(db)
    return summary


@router.get("/me")
async def whoami(caller: CallerDep) -> dict[str, Any]:
    """Who the token belongs to, and whether it is an admin token."""
    return {"user_id": caller.user_id, "is_admin": caller.is_admin}
