"""R6 and R7: a frozen daemon thawed after its job was rescued and completed elsewhere
changes nothing; leases hold while handlers load the CPU and block the event loop."""

from __future__ import annotations

import pytest

from app.db import Database
from tests.reliability.harness import Figures, Ledger, Profile
from tests.reliability.invariants import describe, rules
from tests.reliability.scenarios import Supervise, lease_under_load, stale_daemon

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
KNOWN = {"rescued_live", "lease_expired_live"}


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
    result = await lease_under_load(db, supervise, ledger, profile)
    figures.values.update(result.figures)
    if result.violations and set(rules(result.violations)) <= KNOWN:
        # Known bug (docs/reliability.md, "Findings"): six CPU-bound handler threads starve
        # the event loop of the GIL, so the heartbeat stalls for seconds and the lease
        # expires under live jobs. SQLite always (every statement hops to aiosqlite's thread
        # and back); PostgreSQL comes within a fraction of a second of it.
        figures["known_bug"] = "heartbeat starved of the GIL by CPU-bound handler threads"
        pytest.xfail(f"known: heartbeat starved ({describe(result.violations, most=2)})")
    assert not result.violations, describe(result.violations)
