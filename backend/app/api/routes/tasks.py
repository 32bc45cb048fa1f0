"""Tasks: enqueue (one or many), read, list, retry, cancel."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Request, Response, status
from fastapi.responses import JSONResponse
from sqlalchemy.ext.asyncio import AsyncSession

from app.api.deps import MAX_ID, CallerDep, DbDep, SettingsDep, TaskId
from app.api.errors import ERRORS
from app.api.schemas import NO_NUL, BulkCreate, BulkResult, TaskCreate, TaskPage, TaskPublic
from app.config import Settings
from app.db import Database
from app.models import TaskStatus
from app.services import queue, stats
from app.services.auth import Principal
from app.services.handlers import REGISTRY

router = APIRouter(prefix="/tasks", tags=["tasks"], responses=ERRORS)
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "No such task (or not yours)"}}


class BadTask(Exception):
    """A task that cannot be enqueued: status code and detail."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


def to_spec(body: TaskCreate, caller: Principal, settings: Settings) -> queue.TaskSpec:
    """Validate against the registry and settings, and fill in the owner and defaults."""
    if body.kind not in REGISTRY:
        known = ", ".join(REGISTRY.kinds()) or "none"
        raise BadTask(422, f"unknown kind {body.kind!r}; registered kinds: {known}")
    size = queue.payload_size(body.payload)
    if size > settings.max_payload_bytes:
        raise BadTask(413, f"payload is {size} bytes; the limit is {settings.max_payload_bytes}")
    if body.user_id is not None and not caller.is_admin:
        raise BadTask(422, "user_id may only be set by admin tokens")
    try:
        return queue.TaskSpec(
            kind=body.kind,
            payload=body.payload,
            priority=body.priority,
            queue=body.queue,
            max_retries=settings.max_retries if body.max_retries is None else body.max_retries,
            timeout_seconds=body.timeout_seconds or settings.processing_timeout,
            scheduled_at=body.scheduled_at,
            user_id=body.user_id or caller.user_id,
            project_id=body.project_id,
            chapter_id=body.chapter_id,
            idempotency_key=body.idempotency_key,
        )
    except queue.InvalidTaskError as exc:
        raise BadTask(422, str(exc)) from None


async def _load(db: Database, task_id: int, caller: Principal) -> Any:
    task = await queue.read_task(db, task_id, user_id=caller.scope)
    if task is None:
        raise HTTPException(404, f"task {task_id} not found")
    return task


async def _owned(session: AsyncSession, task_id: int, caller: Principal) -> None:
    """404 unless the task exists and the caller may act on it."""
    if (await queue.task_rows(session, [task_id], user_id=caller.scope))[0] is None:
        raise HTTPException(404, f"task {task_id} not found")


async def _answer(session: AsyncSession, task_id: int) -> TaskPublic:
    """The task as the caller may see it, read in ``session``'s transaction."""
    await session.flush()
    [task] = await queue.task_rows(session, [task_id])
    if task is None:
        raise HTTPException(404, f"task {task_id} not found")
    return TaskPublic.of(task)


def _task_location(request: Request, task_id: int) -> str:
    """GET /tasks/{id}'s path, from a template the app builds once (Starlette's
    url_path_for walks every route: ~5 % of a POST's CPU)."""
    state = request.app.state
    template: str | None = getattr(state, "task_location", None)
    if template is None:
        template = state.task_location = request.app.url_path_for("get_task", task_id="0")[:-1]
    return template + str(task_id)


def _owned_or_conflict(task: Any, spec: queue.TaskSpec) -> Any:
    if task is None or task.user_id != spec.user_id:
        raise BadTask(409, "idempotency_key already used")
    return task


@router.post(
    "",
    status_code=202,
    response_model=TaskPublic,
    responses={
        200: {"model": TaskPublic, "description": "The task that holds this idempotency_key"},
        409: {"description": "idempotency_key held by another user's task"},
        413: {"description": "Payload too large"},
        415: {"description": "A body sent with a Content-Type other than JSON"},
        422: {"description": "Invalid task"},
    },
)
async def create_task(
    body: TaskCreate,
    caller: CallerDep,
    db: DbDep,
    settings: SettingsDep,
    request: Request,
    response: Response,
) -> Any:
    """Enqueue a task: 202 with the task, or 200 with the existing one for a known key."""
    try:
        spec = to_spec(body, caller, settings)
        # Without a key: a transaction of its own whose INSERT returns the whole task.
        task = await queue.enqueue_task_alone_row(db, spec)
        if task is not None:
            result = queue.EnqueuedTask(task.id, True)
        else:  # a key (its owner is checked where it is found), or no such path here
            async with db.write_transaction() as session:
                [result] = await queue.enqueue_tasks(session, [spec])
                [task] = await queue.task_rows(session, [result.id])
                if not result.created:
                    task = _owned_or_conflict(task, spec)
    except BadTask as exc:
        return JSONResponse({"detail": exc.detail}, status_code=exc.code)
    if result.created and settings.inline:
        from app.services.inline import run_inline

        await run_inline(db, REGISTRY, result.id, settings)
        task = await _load(db, result.id, caller)
    response.status_code = 202 if result.created else 200
    response.headers["Location"] = _task_location(request, result.id)
    return TaskPublic.of(task)


@router.post(
    "/bulk",
    status_code=202,
    response_model=BulkResult,
    responses={
        200: {
            "model": BulkResult,
            "description": "Every item's idempotency_key was known: nothing created",
        },
        409: {"description": "An idempotency_key held by another user's task"},
        413: {"description": "A payload too large"},
        415: {"description": "A body sent with a Content-Type other than JSON"},
        422: {"description": "Invalid task"},
    },
)
async def create_tasks(
    body: BulkCreate, caller: CallerDep, db: DbDep, settings: SettingsDep, response: Response
) -> Any:
    """Enqueue up to 1,000 tasks in one transaction: all or none. 202 when any task was
    created; 200 when every item named an existing task by its idempotency_key (as a
    single POST answers)."""
    specs = []
    for index, item in enumerate(body.tasks):
        try:
            specs.append(to_spec(item, caller, settings))
        except BadTask as exc:
            return JSONResponse({"detail": f"tasks[{index}]: {exc.detail}"}, status_code=exc.code)
    async with db.write_transaction() as session:
        results = await queue.enqueue_tasks(session, specs)
        tasks = await queue.task_rows(session, [r.id for r in results])
        for index, (spec, result, task) in enumerate(zip(specs, results, tasks, strict=True)):
            if not result.created and (task is None or task.user_id != spec.user_id):
                await session.rollback()
                detail = f"tasks[{index}]: idempotency_key already used"
                return JSONResponse({"detail": detail}, status_code=409)
    if not any(r.created for r in results):
        response.status_code = 200
    if settings.inline and any(r.created for r in results):
        from app.services.inline import run_inline

        for result in results:  # each once (a key repeated in the call answers not created)
            if result.created:
                await run_inline(db, REGISTRY, result.id, settings)
        async with db.read_transaction() as session:
            tasks = await queue.task_rows(session, [r.id for r in results])
    shown = [(TaskPublic.of(t), r.created) for t, r in zip(tasks, results, strict=True) if t]
    return BulkResult(tasks=[t for t, _ in shown], created=[c for _, c in shown])


@router.get("", response_model=TaskPage)
async def list_tasks(
    caller: CallerDep,
    db: DbDep,
    status_: Annotated[TaskStatus | None, Query(alias="status")] = None,
    kind: Annotated[str | None, Query(max_length=100, pattern=NO_NUL)] = None,
    project_id: Annotated[str | None, Query(max_length=255, pattern=NO_NUL)] = None,
    chapter_id: Annotated[str | None, Query(max_length=255, pattern=NO_NUL)] = None,
    cursor: Annotated[
        int | None, Query(ge=0, le=MAX_ID, description="The last id of the previous page")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> TaskPage:
    """Tasks newest first, filtered; page with ``cursor``."""
    rows = await queue.read_tasks(
        db,
        user_id=caller.scope,
        status=status_,
        kind=kind,
        project_id=project_id,
        chapter_id=chapter_id,
        before_id=cursor,
        limit=limit,
    )
    next_cursor = rows[-1].id if len(rows) == limit else None
    return TaskPage(items=[TaskPublic.of(t) for t in rows], next_cursor=next_cursor)


@router.get("/{task_id}", response_model=TaskPublic, responses=NOT_FOUND)
async def get_task(task_id: TaskId, caller: CallerDep, db: DbDep) -> TaskPublic:
    """One task: status, progress, result, error, attempts, timings."""
    return TaskPublic.of(await _load(db, task_id, caller))


@router.post(
    "/{task_id}/retry",
    response_model=TaskPublic,
    responses={**NOT_FOUND, 409: {"description": "Not failed or cancelled"}},
)
async def retry_task(task_id: TaskId, caller: CallerDep, db: DbDep) -> TaskPublic:
    """A failed or cancelled task back to pending, with a fresh retry budget."""
    # One transaction reads, changes and answers: a 503 never follows a committed change
    # (a client retrying it as told would get a 409).
    async with db.write_transaction() as session:
        await _owned(session, task_id, caller)
        outcome = await queue.retry_task(session, task_id)
        answer = await _answer(session, task_id)
    if outcome is queue.RetryOutcome.NOT_FOUND:
        raise HTTPException(404, f"task {task_id} not found")
    if outcome is queue.RetryOutcome.NOT_RETRYABLE:
        raise HTTPException(409, "only failed or cancelled tasks can be retried")
    stats.forget(db)  # the task is no longer among the finished ones /status counts
    return answer


@router.post(
    "/{task_id}/cancel",
    response_model=TaskPublic,
    responses={
        **NOT_FOUND,
        202: {
            "model": TaskPublic,
            "description": "Running: its daemon, told at once, cancels it within moments",
        },
        409: {"description": "Already finished"},
    },
)
async def cancel_task(
    task_id: TaskId, caller: CallerDep, db: DbDep, response: Response
) -> TaskPublic:
    """pending → cancelled now (200); processing → cancelled by its daemon (202)."""
    async with db.write_transaction() as session:  # one transaction: see retry_task
        await _owned(session, task_id, caller)
        outcome = await queue.request_cancel(session, task_id)
        answer = await _answer(session, task_id)
    if outcome is queue.CancelOutcome.NOT_FOUND:
        raise HTTPException(404, f"task {task_id} not found")
    if outcome is queue.CancelOutcome.FINISHED:
        raise HTTPException(409, "the task has already finished")
    response.status_code = 202 if outcome is queue.CancelOutcome.REQUESTED else 200
    return answer


# A chapter id may hold "/" (deps.AnyText).
@router.get("/{chapter_id:anytext}/latest", response_model=TaskPublic, responses=NOT_FOUND)
async def latest_for_chapter(
    chapter_id: Annotated[str, Path(min_length=1, max_length=255, pattern=NO_NUL)],
    caller: CallerDep,
    db: DbDep,
) -> TaskPublic:
    """The newest task of a chapter (a "/" in its id is sent as %2F)."""
    found = await queue.read_tasks(db, chapter_id=chapter_id, user_id=caller.scope, limit=1)
    task = found[0] if found else None
    if task is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no task for chapter {chapter_id!r}")
    return TaskPublic.of(task)
