"""Fixtures of the reliability suite: the profile, supervised daemons, the ledger, and the
JSON summary (written when RELIABILITY_SUMMARY names a file, as `make reliability` does)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.harness import Figures, Ledger, Profile, Supervisor, current_profile, machine

REPO = Path(__file__).resolve().parents[2]
TOTALLED = ("lost", "duplicated", "stale_writes_rejected", "http_5xx", "busy_errors")


@pytest.fixture(scope="session")
def profile() -> Profile:
    return current_profile()


@pytest.fixture(scope="session")
def report(profile: Profile) -> Iterator[list[Figures]]:
    """Every scenario's figures; written as JSON at the end of the session when asked."""
    collected: list[Figures] = []
    started = time.monotonic()
    load_before = os.getloadavg()
    yield collected
    target = os.environ.get("RELIABILITY_SUMMARY")
    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        data = summary(profile, collected, started)
        data["load_average_1m"] = {"start": load_before[0], "end": os.getloadavg()[0]}
        Path(target).write_text(json.dumps(data, indent=2) + "\n")


def summary(profile: Profile, collected: list[Figures], started: float) -> dict[str, Any]:
    scenarios = [f.as_dict() for f in collected]
    real = [s for s in scenarios if "seeded_bug" not in s]  # twins fail on purpose
    totals: dict[str, Any] = {key: sum(int(s.get(key) or 0) for s in real) for key in TOTALLED}
    recoveries = [s["recovery_seconds"] for s in real if s.get("recovery_seconds") is not None]
    totals["max_recovery_seconds"] = max(recoveries, default=None)
    twins = [s for s in scenarios if "seeded_bug" in s]
    totals["twins_caught"] = f"{sum(s.get('outcome') == 'passed' for s in twins)}/{len(twins)}"
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    return {
        "profile": profile.name,
        "settings": profile.settings(),
        "date": datetime.now(UTC).date().isoformat(),
        "machine": machine(),
        "commit": commit,
        "wall_seconds": round(time.monotonic() - started, 1),
        "totals": totals,
        "scenarios": scenarios,
    }


@pytest.fixture
def figures(request: pytest.FixtureRequest, report: list[Figures]) -> Iterator[Figures]:
    """This scenario's figures for the summary (its duration is added at the end)."""
    callspec = getattr(request.node, "callspec", None)
    engine = callspec.params.get("engine_name", "-") if callspec else "-"
    fig = Figures(request.node.originalname.removeprefix("test_"), str(engine))
    yield fig
    fig["seconds"] = round(time.monotonic() - fig.started, 1)
    fig["outcome"] = getattr(request.node, "reliability_outcome", "error")
    report.append(fig)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    if call.when == "call":
        rep = outcome.get_result()
        xfailed = hasattr(rep, "wasxfail") and rep.skipped
        item.reliability_outcome = "xfailed" if xfailed else rep.outcome  # type: ignore[attr-defined]


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    return Ledger(tmp_path / "ledger.jsonl")


Supervise = Callable[..., Supervisor]


@pytest.fixture
def supervise(database_url: str, tmp_path: Path, ledger: Ledger) -> Iterator[Supervise]:
    """Start supervised daemons on the test database (writing the test's ledger); every one
    is killed at teardown."""
    started: list[Supervisor] = []

    def start(name: str = "daemon", *, url: str | None = None, **kw: Any) -> Supervisor:
        kw["extra_env"] = {**ledger.env, **kw.get("extra_env", {})}
        sup = Supervisor(url or database_url, tmp_path, f"{name}{len(started)}", **kw)
        started.append(sup)
        return sup.start()

    yield start
    for sup in started:
        sup.close()
