"""Queue status: counts, oldest pending age, recent durations, live daemons."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from app.api.deps import CallerDep, DbDep, SettingsDep
from app.api.errors import ERRORS
from app.api.schemas import NO_NUL
from app.services import queue, stats
from app.services.handlers import REGISTRY
from app.services.schedules import shown_schedules

router = APIRouter(tags=["status"], responses=ERRORS)
#: What a user token sees of each daemon: not its id, host name, pid, nor its counts of
#: every user's jobs.
USER_PROCESSOR_FIELDS = ("state", "concurrency", "in_flight", "last_seen_at", "silent_seconds")


@router.get("/status")
async def get_status(
    caller: CallerDep,
    db: DbDep,
    settings: SettingsDep,
    project_id: Annotated[str | None, Query(max_length=255, pattern=NO_NUL)] = None,
) -> dict[str, Any]:
    """Counts per status and queue (the caller's own, for user tokens), the oldest pending
    task's age, durations over the last hour, the live processors and the silent ones
    (not stopped, no heartbeat for three leases: their process died; ``project_id``
    narrows all but the processors to one project); for admin tokens also a per-minute
    timeline, the periodic schedules (next tick, last task) and the flow
    limits (rate limits with the starts in their window, per-key limits)."""
    summary = await stats.summary(
        db, user_id=caller.scope, project_id=project_id, lease_seconds=settings.lease_seconds
    )
    if not caller.is_admin:  # the fleet's names and its work are the operators' business
        for key in ("processors", "silent_processors"):
            summary[key] = [{k: p[k] for k in USER_PROCESSOR_FIELDS} for p in summary[key]]
    if caller.is_admin:
        summary["timeline"] = await stats.timeline(db, project_id=project_id)
        summary["schedules"] = await stats.schedule_overview(
            db, shown_schedules(REGISTRY, settings)
        )
        async with db.read_transaction() as session:
            summary["limits"] = await queue.flow_limits(
                session, settings.rate_limits, settings.key_limits
            )
    return summary


@router.get("/me")
async def whoami(caller: CallerDep) -> dict[str, Any]:
    """Who the token belongs to, and whether it is an admin token."""
    return {"user_id": caller.user_id, "is_admin": caller.is_admin}
