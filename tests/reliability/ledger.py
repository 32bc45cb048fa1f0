"""Test-only handlers for the reliability suite (HANDLER_MODULES=tests.reliability.ledger).

Each run appends ``{task_id, attempt, pid, event: start|end, t}`` to the file named by
``RELIABILITY_LEDGER`` (opened with O_APPEND, one ``write`` per line, so a SIGKILL never
leaves half a line and lines of several daemons interleave whole). The ledger lives
outside the database: it survives rollbacks and kills, and tells what really ran.

Payload knobs (all optional):
  sleep       seconds to wait (async: asyncio.sleep; sync: time.sleep in its thread)
  cpu         seconds of busy loop (sync: in its own thread; async: in a worker thread)
  block_loop  async only: block the event loop this many ms in every second of ``sleep``
  fail_times  raise on attempts 1..N
  hang        async: wait forever (cancellable); sync: sleep this many seconds, ignoring
              cancellation
  kill        SIGKILL the daemon (after ``sleep``)
  once        apply sleep/cpu/hang/kill only on the task's first start in the ledger

The result is ``{"attempt": ctx.attempt, "pid": os.getpid()}``: the invariant checker
compares it with the ledger to prove the stored result came from the final run.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from typing import Any

from app.services.handlers import JobContext, handler

LEDGER_ENV = "RELIABILITY_LEDGER"
ASYNC_KIND = "ledger"
SYNC_KIND = "ledger_sync"


def record(ctx: JobContext, event: str) -> None:
    """Append one ledger line for this run (no-op when no ledger is configured)."""
    path = os.environ.get(LEDGER_ENV)
    if not path:
        return
    line = json.dumps(
        {
            "task_id": ctx.task_id,
            "attempt": ctx.attempt,
            "pid": os.getpid(),
            "event": event,
            "t": time.time(),
        }
    )
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def _earlier_start(task_id: int) -> bool:
    """True when the ledger holds more than this run's own start of ``task_id``."""
    path = os.environ.get(LEDGER_ENV)
    if not path or not os.path.exists(path):
        return False
    needle = f'"task_id": {task_id}, '
    with open(path) as f:
        starts = sum(1 for line in f if needle in line and '"event": "start"' in line)
    return starts > 1


def _busy(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sum(range(1000))


def _knobs(ctx: JobContext) -> dict[str, Any]:
    """The payload, without the slow parts when ``once`` is set and this is a re-run."""
    knobs = dict(ctx.payload)
    if knobs.get("once") and _earlier_start(ctx.task_id):
        for key in ("sleep", "cpu", "hang", "kill", "block_loop"):
            knobs.pop(key, None)
    return knobs


def _fail_or_kill(ctx: JobContext, knobs: dict[str, Any]) -> None:
    if knobs.get("kill"):
        os.kill(os.getpid(), signal.SIGKILL)
    if ctx.attempt <= int(knobs.get("fail_times", 0)):
        raise RuntimeError(f"planned failure on attempt {ctx.attempt}")


@handler(ASYNC_KIND)
async def ledger(ctx: JobContext) -> dict[str, Any]:
    record(ctx, "start")
    knobs = _knobs(ctx)
    if knobs.get("cpu"):
        await asyncio.to_thread(_busy, float(knobs["cpu"]))
    seconds = float(knobs.get("sleep", 0))
    block = float(knobs.get("block_loop", 0)) / 1000
    if block:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            _busy(block)  # the event loop is blocked, heartbeat included
            await asyncio.sleep(max(0.0, 1 - block))
    elif seconds:
        await asyncio.sleep(seconds)
    if knobs.get("hang"):
        await asyncio.Event().wait()
    _fail_or_kill(ctx, knobs)
    record(ctx, "end")
    return {"attempt": ctx.attempt, "pid": os.getpid()}


@handler(SYNC_KIND)
def ledger_sync(ctx: JobContext) -> dict[str, Any]:
    record(ctx, "start")
    knobs = _knobs(ctx)
    if knobs.get("cpu"):
        _busy(float(knobs["cpu"]))
    time.sleep(float(knobs.get("sleep", 0)) + float(knobs.get("hang", 0)))
    _fail_or_kill(ctx, knobs)
    record(ctx, "end")
    return {"attempt": ctx.attempt, "pid": os.getpid()}
