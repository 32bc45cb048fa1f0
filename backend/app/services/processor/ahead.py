"""Claiming ahead: how many jobs a slot pool may hold claimed beyond its free slots.

A pool claims ahead only the jobs it expects to start within ``window`` seconds: with
``limit`` slots and jobs lasting ``d`` seconds on average, slots free at ``limit / d`` per
second, so ``limit * window / d`` jobs, rounded, capped. Short jobs get a buffer that turns a
slot around without a database round trip and lets one transaction carry more than
``limit`` jobs; jobs longer than ``2 * limit * window`` seconds are never claimed ahead, so a
daemon busy with long jobs cannot hoard work another daemon could start. A pool none of
whose slots freed within the last ``2 * window`` (every slot stuck in a long job, or no
work) claims nothing ahead either, whatever its history says.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

#: weight of the newest job in the running mean of durations
SMOOTHING = 0.2
#: at most this many jobs ahead per slot
CAP_PER_SLOT = 25


class Room(NamedTuple):
    """What one claim may take for a pool: ``total`` jobs (its free slots and its allowance),
    of which kinds with a rate or key limit only ``free``; ``since``: the loop time when the
    room was taken, before the claim's transaction began, so before the claimed jobs'
    leases started (the lease watch counts from it)."""

    total: int
    free: int
    since: float | None = None


class Ahead:
    """The claim-ahead allowance of one pool of ``limit`` slots."""

    __slots__ = ("_clock", "_last_freed", "_mean", "cap", "limit", "window")

    def __init__(
        self,
        limit: int,
        window: float,
        *,
        cap_per_slot: int = CAP_PER_SLOT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if window < 0:
            raise ValueError(f"window must be >= 0, got {window}")
        self.limit = limit
        self.window = window
        self.cap = cap_per_slot * limit
        self._clock = clock
        self._mean: float | None = None
        self._last_freed = float("-inf")

    def freed(self, duration: float) -> None:
        """A slot freed after holding a job ``duration`` seconds."""
        duration = max(duration, 0.0)
        mean = self._mean
        self._mean = duration if mean is None else mean + SMOOTHING * (duration - mean)
        self._last_freed = self._clock()

    @property
    def mean_duration(self) -> float | None:
        """The running mean of job durations (None before the first job ended)."""
        return self._mean

    def allowance(self) -> int:
        """How many jobs to hold claimed beyond the free slots now."""
        mean = self._mean
        if self.window <= 0 or mean is None:
            return 0
        if self._clock() - self._last_freed > 2 * self.window:
            return 0
        expected = self.limit * self.window / max(mean, 1e-6)
        return min(self.cap, int(expected + 0.5))
