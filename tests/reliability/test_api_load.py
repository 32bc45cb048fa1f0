"""R9: concurrent API writers and feed pollers against SQLite while the daemon drains."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.db import Database
from tests.reliability.harness import Figures, Ledger, Profile
from tests.reliability.invariants import describe
from tests.reliability.scenarios import Supervise, api_writers

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_api_writers_and_pollers_beside_the_daemon_on_sqlite(
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
        clients=profile.api_clients,
        enqueues=profile.api_enqueues,
        pollers=profile.api_pollers,
    )
    figures.values.update(result.figures)
    assert not result.violations, describe(result.violations)
