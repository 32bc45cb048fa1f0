"""Retry backoff: exponential ceilings, jitter in the upper half, the cap, bad arguments."""

from __future__ import annotations

import math
import random

import pytest

from app.services.backoff import next_retry_delay

BASE, CAP = 10.0, 3600.0  # DESIGN.md §4 defaults


@pytest.mark.parametrize(
    ("retry", "ceiling"),
    [(1, 10), (2, 20), (3, 40), (4, 80), (6, 320), (9, 2560), (10, 3600), (30, 3600)],
)
def test_delay_lies_in_the_upper_half_of_the_ceiling(retry: int, ceiling: float) -> None:
    rng = random.Random(1234)
    delays = [next_retry_delay(retry, base=BASE, cap=CAP, rng=rng) for _ in range(500)]
    assert all(ceiling / 2 <= d <= ceiling for d in delays)
    # jittered across the whole half-range, not a constant
    assert len(set(delays)) == len(delays)
    assert min(delays) < ceiling * 0.55 and max(delays) > ceiling * 0.95


def test_the_cap_is_never_exceeded_even_for_huge_retry_numbers() -> None:
    rng = random.Random(99)
    for retry in (11, 12, 63, 64, 65, 1_000, 10**9):
        delay = next_retry_delay(retry, base=BASE, cap=CAP, rng=rng)
        assert CAP / 2 <= delay <= CAP
        assert math.isfinite(delay)


def test_ceiling_doubles_until_the_cap() -> None:
    rng = random.Random(5)
    # the upper bound over many draws approaches base * 2**(n-1), then stays at the cap
    highs = [
        max(next_retry_delay(n, base=1, cap=50, rng=rng) for _ in range(300))
        for n in (1, 2, 3, 4, 5, 6, 7)
    ]
    expected = [1, 2, 4, 8, 16, 32, 50]
    for high, ceiling in zip(highs, expected, strict=True):
        assert ceiling * 0.97 <= high <= ceiling


def test_equal_base_and_cap() -> None:
    delays = [next_retry_delay(n, base=4, cap=4, rng=random.Random(n)) for n in range(1, 20)]
    assert all(2 <= d <= 4 for d in delays)


def test_a_seeded_rng_makes_delays_reproducible() -> None:
    first = [next_retry_delay(n, base=BASE, cap=CAP, rng=random.Random(42)) for n in range(1, 8)]
    again = [next_retry_delay(n, base=BASE, cap=CAP, rng=random.Random(42)) for n in range(1, 8)]
    assert first == again


def test_without_an_rng_the_shared_one_is_used() -> None:
    delays = {next_retry_delay(3, base=BASE, cap=CAP) for _ in range(50)}
    assert all(20 <= d <= 40 for d in delays) and len(delays) > 1


@pytest.mark.parametrize(
    ("retry", "base", "cap"),
    [
        (0, 10, 100),  # retries are numbered from 1
        (-1, 10, 100),
        (1, 0, 100),  # base must be positive
        (1, -5, 100),
        (1, 10, 5),  # cap below base
        (1, 10, 0),
    ],
)
def test_bad_arguments_raise_value_error(retry: int, base: float, cap: float) -> None:
    with pytest.raises(ValueError):
        next_retry_delay(retry, base=base, cap=cap, rng=random.Random(0))


def test_a_retrying_notification_says_a_short_delay_in_tenths() -> None:
    """A delay of 0.78 s reads "in 0.8 s", not "in 1 s"; whole seconds from ten on."""
    from app.services.queue import _seconds_text

    assert [_seconds_text(s) for s in (0.78, 0.04, 9.94, 9.96, 10.4, 3599.6)] == [
        "0.8",
        "0.0",
        "9.9",
        "10",
        "10",
        "3600",
    ]
