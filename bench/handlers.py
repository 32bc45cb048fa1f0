"""Handlers the benchmark's daemons and API run (HANDLER_MODULES=bench.handlers).

Kinds are prefixed ``bench_`` so this module can share a process with any other handler
module without a name clash.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from app.services.handlers import JobContext, handler

NOOP = "bench_noop"
SLEEP = "bench_sleep"
STAMP = "bench_stamp"


@handler(NOOP)
async def noop(ctx: JobContext) -> dict[str, Any]:
    """Does nothing; the result is small, like a real job's acknowledgement."""
    return {"n": ctx.payload.get("n")}


@handler(SLEEP)
async def sleep(ctx: JobContext) -> dict[str, Any]:
    """Sleeps ``payload["seconds"]`` on the event loop (an I/O-bound job)."""
    await asyncio.sleep(float(ctx.payload.get("seconds", 0.05)))
    return {"n": ctx.payload.get("n")}


@handler(STAMP)
async def stamp(ctx: JobContext) -> dict[str, Any]:
    """Records the wall-clock time at which the handler started (pick-up latency, W3)."""
    return {"t": time.time()}
