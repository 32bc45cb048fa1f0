"""The shared shape of the daemon's periodic loops: run_once on an interval, never die."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.exc import DBAPIError, OperationalError

from app.db import TRANSIENT_SQLSTATES, database_unavailable, sqlstate
from app.text import error_line

logger = logging.getLogger("app.processor")

ERROR_BACKOFF_FIRST_SECONDS = 0.1
ERROR_BACKOFF_MAX_SECONDS = 5.0
_RNG = random.Random()  # noqa: S311 - jitter


def is_transient(exc: BaseException) -> bool:
    """True for database errors worth retrying: locked, unreachable, restarting.

    An error the server (or the driver, for a value it cannot send) classed with a SQLSTATE
    is judged by that code alone, never by its text, which can echo the values bound: a
    job's error text holding the word "connection" and a character PostgreSQL refuses made
    its failure look transient, and the completer retried the batch, and every outcome
    after it, forever. A value that could not be converted (ValueError, TypeError) is never
    transient. Only errors with neither say what they are by their text."""
    if isinstance(exc, OperationalError | OSError | TimeoutError | ConnectionError):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if database_unavailable(exc):  # wrapped by SQLAlchemy or a bare asyncpg error
        return True
    orig = getattr(exc, "orig", None)
    code = sqlstate(exc)
    if code is not None:
        return code in TRANSIENT_SQLSTATES
    if isinstance(exc, ValueError | TypeError) or isinstance(orig, ValueError | TypeError):
        return False
    text = str(orig if orig is not None else exc).lower()
    return any(
        marker in text
        for marker in ("database is locked", "connection", "closed", "terminat", "shutdown")
    )


class ErrorBackoff:
    """Delays after consecutive errors: doubling from 0.1 s up to 5 s; logs once per step."""

    def __init__(
        self,
        name: str,
        *,
        first: float = ERROR_BACKOFF_FIRST_SECONDS,
        cap: float = ERROR_BACKOFF_MAX_SECONDS,
    ) -> None:
        self.name = name
        self._first = first
        self._cap = cap
        self._delay = 0.0
        self.failures = 0

    def failed(self, exc: BaseException) -> float:
        """Record a failure; log it (once per backoff step) and return the delay to wait."""
        self.failures += 1
        self._delay = min(self._cap, self._delay * 2 if self._delay else self._first)
        if self._delay < self._cap or self.failures % 10 == 1:
            logger.warning(
                "%s: database error (%s); retrying in %.1f s",
                self.name,
                error_line(exc),
                self._delay,
                extra={"action": f"{self.name}_error"},
            )
        return self._delay

    def succeeded(self) -> None:
        """Reset after a success (and say so when it follows failures)."""
        if self.failures:
            logger.info(
                "%s: database reachable again after %d failed tries",
                self.name,
                self.failures,
                extra={"action": f"{self.name}_recovered"},
            )
        self.failures = 0
        self._delay = 0.0


def jittered(interval: float, spread: float = 0.1) -> float:
    """``interval`` ± ``spread`` (a fraction), so daemons do not fire together."""
    return max(0.0, interval * (1 + _RNG.uniform(-spread, spread)))


async def sleep_or_stop(
    stop: asyncio.Event, seconds: float, poke: asyncio.Event | None = None
) -> bool:
    """Sleep up to ``seconds``, or until ``poke`` is set (which this clears); True when
    ``stop`` was set meanwhile."""
    if poke is None:
        try:
            await asyncio.wait_for(stop.wait(), timeout=seconds)
        except TimeoutError:
            return stop.is_set()
        return True
    waits = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(poke.wait())}
    try:
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
    poke.clear()
    return stop.is_set()


async def guarded_loop(
    name: str,
    run_once: Callable[[], Awaitable[Any]],
    *,
    interval: float,
    stop: asyncio.Event,
    run_first: bool = False,
    next_delay: Callable[[], float] | None = None,
    poke: asyncio.Event | None = None,
) -> None:
    """Call ``run_once`` every ``interval`` (jittered) until ``stop``; errors are logged and
    backed off, never fatal. Only cancellation or ``stop`` ends the loop. ``next_delay``,
    when given, says how long to wait after a successful run instead (not jittered). A
    ``poke`` (an event set by someone else) runs it at once, whatever the wait left."""
    backoff = ErrorBackoff(name)
    delay = 0.0 if run_first else jittered(interval)
    # a poke does not cut an error's backoff short
    while not await sleep_or_stop(stop, delay, None if backoff.failures else poke):
        try:
            await run_once()
        except Exception as exc:
            if not is_transient(exc):
                logger.exception("%s: unexpected error", name, extra={"action": f"{name}_error"})
            delay = backoff.failed(exc)
            continue
        backoff.succeeded()
        delay = next_delay() if next_delay is not None else jittered(interval)
