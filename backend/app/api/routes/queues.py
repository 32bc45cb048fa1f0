"""Queues: list them, pause and resume them for every daemon (admin tokens only)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, status
from pydantic import AfterValidator

from app.api.deps import CallerDep, DbDep
from app.api.errors import ERRORS
from app.config import QUEUE_NAME_PATTERN, QUEUE_NAME_RULE, is_queue_name
from app.services import queue
from app.services.auth import Principal

router = APIRouter(
    tags=["queues"],
    responses={**ERRORS, 403: {"description": "An admin token is required"}},
)


def _queue_name(name: str) -> str:
    if not is_queue_name(name):
        raise ValueError(f"a queue's name is {QUEUE_NAME_RULE}")
    return name


# The rule's own message, as for a task's queue (a pattern's 422 showed the regex); the
# pattern stays in the OpenAPI document.
QueueName = Annotated[
    str,
    Path(
        description=f"The queue's name: {QUEUE_NAME_RULE}.",
        json_schema_extra={
            "pattern": QUEUE_NAME_PATTERN,
            "minLength": 1,
            "maxLength": queue.MAX_NAME_LENGTH,
        },
    ),
    AfterValidator(_queue_name),
]


def _admin(caller: Principal) -> None:
    if not caller.is_admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "an admin token is required")


@router.get("/queues")
async def list_queues(caller: CallerDep, db: DbDep) -> list[dict[str, Any]]:
    """Queues with live tasks or a pause switch: paused or not, pending and processing."""
    _admin(caller)
    async with db.read_transaction() as session:
        return await queue.queue_overview(session)


async def _switch(caller: Principal, db: DbDep, name: str, *, paused: bool) -> dict[str, Any]:
    _admin(caller)
    async with db.write_transaction() as session:
        switch = await queue.set_queue_paused(
            session, name, paused=paused, by=f"api:{caller.user_id}"
        )
    return {
        "queue": switch.name,
        "paused": switch.paused,
        "changed_at": switch.updated_at,
        "changed_by": switch.updated_by,
    }


# A queue's name may hold "/" (deps.AnyText).
@router.post("/queues/{name:anytext}/pause")
async def pause_queue(caller: CallerDep, db: DbDep, name: QueueName) -> dict[str, Any]:
    """Pause a queue for every daemon at once: nothing more is claimed from it; running
    jobs finish."""
    return await _switch(caller, db, name, paused=True)


@router.post("/queues/{name:anytext}/resume")
async def resume_queue(caller: CallerDep, db: DbDep, name: QueueName) -> dict[str, Any]:
    """Resume a paused queue; daemons are woken at once."""
    return await _switch(caller, db, name, paused=False)
