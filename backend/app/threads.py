"""Blocking work the daemon's own machinery waits for, on threads of its own.

``asyncio.to_thread`` runs on the event loop's default executor, a pool that handlers share
(their ``asyncio.to_thread`` work, the built-in analysis handler's among it). A handler
whose thread outlives its job (a timeout cannot stop a thread) keeps a worker busy, and a
shutdown step queued behind such work waited for it: the daemon's stop took as long as the
slowest abandoned handler. The daemon's steps use ``in_own_thread`` instead.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def in_own_thread(func: Callable[..., T], *args: Any, name: str = "step") -> T:
    """``func(*args)`` on a fresh daemon thread; its result (or exception) here."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(value: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)

    def target() -> None:
        try:
            value, error = func(*args), None
        except BaseException as exc:
            value, error = None, exc
        try:
            loop.call_soon_threadsafe(settle, value, error)
        except RuntimeError:  # the loop closed meanwhile: nobody waits any more
            pass

    threading.Thread(target=target, name=name, daemon=True).start()
    return await future
