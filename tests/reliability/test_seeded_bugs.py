"""Seeded-bug twins: each safety mechanism is switched off (ASYNC_PROCESSOR_SEEDED_BUG, a
test-only switch in app.services.faults) and the scenario that claims to guard it must then
fail, with the violation it names — so every scenario is proven to catch what it claims."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.db import Database
from app.services.faults import SEEDED_BUG_ENV
from tests.reliability.harness import Figures, Ledger, Profile
from tests.reliability.invariants import describe, rules
from tests.reliability.scenarios import (
    Result,
    Supervise,
    api_writers,
    chaos,
    lease_under_load,
    stale_daemon,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def caught(result: Result, figures: Figures, bug: str) -> dict[str, int]:
    found = dict(rules(result.violations))
    figures.values.update(result.figures)
    figures.values.update(seeded_bug=bug, violations=found)
    return found


async def test_without_the_fence_a_stale_daemon_overwrites_the_rescued_run(
    db: Database, supervise: Supervise, ledger: Ledger, profile: Profile, figures: Figures
) -> None:
    result = await stale_daemon(db, supervise, ledger, profile, extra_env={SEEDED_BUG_ENV: "fence"})
    found = caught(result, figures, "fence")
    assert found.get("stale", 0) >= 1, describe(result.violations)
    assert found.get("final_run", 0) + found.get("one_terminal", 0) >= 1, describe(
        result.violations
    )


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_without_begin_immediate_writers_hit_database_is_locked(
    db: Database,
    database_url: str,
    supervise: Supervise,
    ledger: Ledger,
    profile: Profile,
    figures: Figures,
    tmp_path: Path,
) -> None:
    result = await api_writers(
        db,
        database_url,
        supervise,
        ledger,
        profile,
        tmp_path,
        clients=100,
        enqueues=4,
        pollers=10,
        extra_env={SEEDED_BUG_ENV: "begin_immediate"},
    )
    found = caught(result, figures, "begin_immediate")
    assert found.get("busy", 0) >= 1, describe(result.violations)
    assert result.figures["busy_errors"] + result.figures["http_5xx"] > 0


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_without_lease_renewal_live_jobs_are_rescued(
    db: Database, supervise: Supervise, ledger: Ledger, profile: Profile, figures: Figures
) -> None:
    result = await lease_under_load(
        db, supervise, ledger, profile, extra_env={SEEDED_BUG_ENV: "lease_renewal"}
    )
    found = caught(result, figures, "lease_renewal")
    assert found.get("rescued_live", 0) >= 1, describe(result.violations)


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_without_the_rescue_sweep_killed_jobs_are_lost(
    db: Database, supervise: Supervise, ledger: Ledger, profile: Profile, figures: Figures
) -> None:
    result = await chaos(
        db,
        supervise,
        ledger,
        profile,
        jobs=300,
        kills=1,
        extra_env={SEEDED_BUG_ENV: "rescue"},
        settle_within=3 * profile.lease + 5,
    )
    found = caught(result, figures, "rescue")
    assert found.get("terminal", 0) >= 1, describe(result.violations)
    assert result.figures["lost"] >= 1
