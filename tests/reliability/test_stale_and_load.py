"""R6 and R7: a frozen daemon thawed after its job was rescued and completed elsewhere
changes nothing; leases hold while handlers load the CPU and block the event loop."""

from __future__ import annotations

import pytest

from app.db import Database
from tests.reliability.harness import Figures, Ledger, Profile
from tests.reliability.invariants import describe
from tests.reliability.scenarios import Supervise, lease_under_load, stale_daemon

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


async def test_stale_daemon_changes_nothing_after_sigcont(
    db: Database, supervise: Supervise, ledger: Ledger, profile: Profile, figures: Figures
) -> None:
    result = await stale_daemon(db, supervise, ledger, profile)
    figures.values.update(result.figures)
    assert not result.violations, describe(result.violations)
    assert result.figures["rows_changed_by_stale"] == 0


async def test_leases_hold_under_cpu_load_and_a_blocked_loop(
    db: Database,
    supervise: Supervise,
    ledger: Ledger,
    profile: Profile,
    figures: Figures,
) -> None:
    """Six CPU-bound handler threads contend for the GIL with the event loop; the daemon's
    0.5 ms switch interval (app.background_processor) keeps the heartbeat's gaps well
    inside the lease (docs/reliability.md, finding 2)."""
    result = await lease_under_load(db, supervise, ledger, profile)
    figures.values.update(result.figures)
    assert not result.violations, describe(result.violations)
