"""R1 and R2: SIGKILL at random instants, and at named points of the daemon's code."""

from __future__ import annotations

import pytest

from app.db import Database
from tests.reliability.harness import Figures, Ledger, Profile
from tests.reliability.invariants import describe
from tests.reliability.scenarios import (
    FAULT_POINTS,
    Supervise,
    chaos,
    chaos_recovery_bound,
    fault_points,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


async def test_random_sigkill_chaos(
    db: Database, supervise: Supervise, ledger: Ledger, profile: Profile, figures: Figures
) -> None:
    result = await chaos(
        db, supervise, ledger, profile, jobs=profile.chaos_jobs, kills=profile.chaos_kills
    )
    figures.values.update(result.figures)
    assert not result.violations, describe(result.violations)
    assert result.figures["kills"] == profile.chaos_kills
    assert result.figures["lost"] == 0 and result.figures["duplicated"] == 0
    assert result.figures["max_restart_gap_seconds"] < 0.5
    assert result.figures["recovery_seconds"] is not None
    bound = chaos_recovery_bound(profile, result.figures["most_in_flight_at_a_kill"])
    assert result.figures["recovery_seconds"] <= bound


async def test_sigkill_at_each_fault_point(
    db: Database, supervise: Supervise, ledger: Ledger, profile: Profile, figures: Figures
) -> None:
    result = await fault_points(db, supervise, ledger, profile)
    figures.values.update(result.figures)
    assert not result.violations, describe(result.violations)
    assert result.figures["kills"] == len(FAULT_POINTS)
    assert result.figures["lost"] == 0 and result.figures["duplicated"] == 0
