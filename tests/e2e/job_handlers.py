"""Handlers for tests that start real daemons (HANDLER_MODULES=tests.e2e.job_handlers)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from typing import Any

from app.services.handlers import JobContext, PermanentError, Snooze, handler


def _ledger(ctx: JobContext, event: str) -> None:
    path = ctx.payload.get("ledger")
    if not path:
        return
    line = json.dumps(
        {
            "task_id": ctx.task_id,
            "attempt": ctx.attempt,
            "pid": os.getpid(),
            "event": event,
            "at": time.time(),
        }
    )
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


@handler("noop")
async def noop(ctx: JobContext) -> dict[str, Any]:
    return {"n": ctx.payload.get("n")}


@handler("sleep")
async def sleep(ctx: JobContext) -> dict[str, Any]:
    _ledger(ctx, "start")
    await ctx.progress(0, 2, "sleeping")
    await asyncio.sleep(float(ctx.payload.get("seconds", 0.1)))
    await ctx.progress(2, 2, "done")
    _ledger(ctx, "end")
    return {"slept": ctx.payload.get("seconds"), "pid": os.getpid()}


@handler("sync_sleep")
def sync_sleep(ctx: JobContext) -> dict[str, Any]:
    _ledger(ctx, "start")
    time.sleep(float(ctx.payload.get("seconds", 0.1)))
    _ledger(ctx, "end")
    return {"slept": ctx.payload.get("seconds"), "pid": os.getpid()}


@handler("fail")
async def fail(ctx: JobContext) -> None:
    if ctx.payload.get("permanent"):
        raise PermanentError("bad input")
    raise RuntimeError(f"boom on attempt {ctx.attempt}")


class LibraryInterrupt(BaseException):
    """What some libraries raise: a BaseException subclass, not an Exception."""


@handler("base_exception")
async def base_exception(ctx: JobContext) -> None:
    raise LibraryInterrupt(f"attempt {ctx.attempt}")


@handler("to_thread_sleep")
async def to_thread_sleep(ctx: JobContext) -> dict[str, Any]:
    """Blocking work on the loop's default executor, as the built-in analysis does."""
    await asyncio.to_thread(time.sleep, float(ctx.payload.get("seconds", 0.1)))
    return {"slept": ctx.payload.get("seconds")}


@handler("suicide")
async def suicide(ctx: JobContext) -> None:
    _ledger(ctx, "start")
    os.kill(os.getpid(), signal.SIGKILL)


@handler("snooze_then_finish")
async def snooze_then_finish(ctx: JobContext) -> dict[str, Any]:
    """Snoozes ``snoozes`` times (runs are counted in the ``runs`` file), then completes."""
    runs_file = ctx.payload["runs"]
    fd = os.open(runs_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps({"attempt": ctx.attempt, "at": time.time()}) + "\n").encode())
    finally:
        os.close(fd)
    fd = os.open(runs_file, os.O_RDONLY)
    try:
        runs = os.read(fd, 1 << 16).count(b"\n")
    finally:
        os.close(fd)
    if runs <= int(ctx.payload.get("snoozes", 1)):
        raise Snooze(float(ctx.payload.get("seconds", 1.0)))
    return {"runs": runs, "attempt": ctx.attempt}


@handler("block_loop")
async def block_loop(ctx: JobContext) -> dict[str, Any]:
    """Blocking work in an async def: holds the daemon's event loop for ``seconds``."""
    time.sleep(float(ctx.payload["seconds"]))  # noqa: ASYNC251 (the point of it)
    return {"blocked": True}


@handler("chdir")
async def chdir(ctx: JobContext) -> dict[str, Any]:
    """A handler that moves the daemon's working directory."""
    os.chdir(str(ctx.payload["to"]))
    return {"cwd": os.getcwd()}


@handler("stubborn")
async def stubborn(ctx: JobContext) -> None:
    """Catches every CancelledError and carries on: never ends (a bare except: in a loop)."""
    while True:
        try:
            await asyncio.sleep(0.2)
        except asyncio.CancelledError:
            pass


_LEFT_BEHIND: list[asyncio.Task[None]] = []


@handler("leave_exiting_task")
async def leave_exiting_task(ctx: JobContext) -> dict[str, Any]:
    """Starts a task that calls sys.exit() a moment later, outside any job, and returns."""

    async def exit_later() -> None:
        await asyncio.sleep(float(ctx.payload.get("after", 0.2)))
        sys.exit(int(ctx.payload.get("code", 2)))

    _LEFT_BEHIND.append(asyncio.get_running_loop().create_task(exit_later()))
    return {"left": True}


@handler("leave_stubborn_task")
async def leave_stubborn_task(ctx: JobContext) -> dict[str, Any]:
    """Starts a task that ignores cancellation, and returns."""
    _LEFT_BEHIND.append(asyncio.get_running_loop().create_task(stubborn(ctx)))
    return {"left": True}
