"""Retry delays: exponential backoff with jitter, a pure function."""

from __future__ import annotations

import random

_SHARED_RNG = random.Random()  # noqa: S311 - jitter, not cryptography


def next_retry_delay(
    retry_number: int, *, base: float, cap: float, rng: random.Random | None = None
) -> float:
    """Seconds to wait before retry number ``retry_number`` (1 for the first retry).

    The ceiling doubles with each retry (``base``, ``2*base``, ``4*base`` …) up to ``cap``;
    the delay is drawn uniformly from the upper half of it, so retries of jobs that failed
    together spread out, and no delay is ever shorter than half its ceiling.
    """
    if retry_number < 1:
        raise ValueError(f"retry_number must be >= 1, got {retry_number}")
    if base <= 0 or cap < base:
        raise ValueError(f"need 0 < base <= cap, got base={base} cap={cap}")
    ceiling = min(cap, base * 2.0 ** min(retry_number - 1, 64))
    return (rng or _SHARED_RNG).uniform(ceiling / 2.0, ceiling)
