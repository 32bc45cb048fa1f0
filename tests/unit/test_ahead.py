"""The claim-ahead allowance (app.services.processor.ahead), on a hand-driven clock."""

from __future__ import annotations

import pytest

from app.services.processor.ahead import Ahead


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_nothing_ahead_before_a_job_ended_or_with_the_window_off() -> None:
    clock = Clock()
    assert Ahead(10, 0.1, clock=clock).allowance() == 0
    off = Ahead(10, 0.0, clock=clock)
    off.freed(0.001)
    assert off.allowance() == 0


def test_allowance_is_what_the_slots_start_within_the_window() -> None:
    clock = Clock()
    ahead = Ahead(10, 0.1, clock=clock)
    ahead.freed(0.05)  # 10 slots of 50 ms jobs start 200 jobs a second: 20 in 0.1 s
    assert ahead.allowance() == 20
    small = Ahead(3, 0.1, clock=clock)
    small.freed(0.1)  # 3 slots, 100 ms jobs: 3 in the window
    assert small.allowance() == 3


def test_allowance_is_capped_per_slot() -> None:
    clock = Clock()
    ahead = Ahead(4, 0.1, clock=clock)
    ahead.freed(0.0)
    assert ahead.allowance() == 100
    assert Ahead(4, 0.1, cap_per_slot=2, clock=clock).cap == 8


def test_long_jobs_are_never_claimed_ahead() -> None:
    clock = Clock()
    ahead = Ahead(10, 0.1, clock=clock)
    ahead.freed(2.5)  # 10 * 0.1 / 2.5 = 0.4 jobs: none
    assert ahead.allowance() == 0
    ahead = Ahead(10, 0.1, clock=clock)
    ahead.freed(1.5)  # 0.67: one
    assert ahead.allowance() == 1


def test_the_mean_follows_the_jobs_as_they_get_longer() -> None:
    clock = Clock()
    ahead = Ahead(2, 0.1, clock=clock)
    ahead.freed(0.01)
    assert ahead.allowance() == 20
    for _ in range(30):
        ahead.freed(1.0)
    assert ahead.mean_duration == pytest.approx(1.0, rel=0.01)
    assert ahead.allowance() == 0


def test_no_slot_freed_lately_means_nothing_ahead() -> None:
    """Every slot stuck in a long job (or no work at all): the history of short jobs no
    longer counts once no slot freed for two windows."""
    clock = Clock()
    ahead = Ahead(10, 0.1, clock=clock)
    ahead.freed(0.001)
    clock.now += 0.19
    assert ahead.allowance() == 250
    clock.now += 0.02
    assert ahead.allowance() == 0
    ahead.freed(0.001)
    assert ahead.allowance() == 250


def test_a_negative_window_is_refused() -> None:
    with pytest.raises(ValueError, match="window must be >= 0"):
        Ahead(1, -0.1)
