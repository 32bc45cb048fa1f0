"""R3: graceful SIGTERM — drain, grace exceeded (async and a sync handler that ignores
cancellation), a second signal — and the unit file that delivers it."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from app.config import ENV_PREFIX
from app.db import Database
from tests.helpers import all_in, enqueue_payloads, eventually, statuses, task_row
from tests.reliability.harness import Figures, Ledger, Profile, Supervisor
from tests.reliability.invariants import describe
from tests.reliability.ledger import ASYNC_KIND, SYNC_KIND
from tests.reliability.scenarios import Supervise, finish
from tests.unit.test_deployment import DEPLOYMENT, unit

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
HANG = 600.0  # seconds: longer than any test; "once" makes the re-run quick


async def _signal_and_wait(sup: Supervisor, *signals: signal.Signals, between: str = "") -> float:
    """Send the signals (waiting for ``between`` in the log after the first); seconds from
    the last signal to the exit, which must be 0."""
    run = sup.halt()
    sent = 0.0
    for i, sig in enumerate(signals):
        if i and between:
            await eventually(lambda: _logged(sup, between), within=20)
        sent = time.monotonic()
        sup.signal(sig)
    code = await asyncio.to_thread(sup.wait_for_exit, run, 120)
    assert code == 0, sup.log()[-3000:]
    assert run.ended is not None
    return run.ended - sent


async def _logged(sup: Supervisor, text: str) -> bool:
    return text in sup.log()


async def _started(ledger: Ledger, pid: int, n: int) -> bool:
    return len(ledger.open_runs(pid)) == n


async def _complete_the_rest(
    db: Database, supervise: Supervise, ledger: Ledger, profile: Profile, *stopped: Supervisor
) -> None:
    """A fresh daemon finishes what the stopped one left; then every invariant holds."""
    finisher = supervise("finisher", **profile.settings())
    n = sum((await statuses(db)).values())
    await eventually(lambda: all_in(db, "completed", n), within=60)
    violations = await finish(db, ledger, profile, *stopped, finisher)
    assert not violations, describe(violations)


async def test_sigterm_drains_running_jobs_and_claims_nothing_after(
    db: Database, supervise: Supervise, ledger: Ledger, profile: Profile, figures: Figures
) -> None:
    grace = max(profile.grace, 10.0)
    ids = await enqueue_payloads(db, ASYNC_KIND, [{"sleep": 1.5}] * 8)
    sup = supervise("drain", max_concurrent="8", **profile.settings(shutdown_grace=grace))
    await eventually(lambda: all_in(db, "processing", 8), within=30)
    later = await enqueue_payloads(db, ASYNC_KIND, [{}] * 4)  # no free slot until a job ends
    seconds = await _signal_and_wait(sup, signal.SIGTERM)
    figures["exit_seconds"] = round(seconds, 2)
    assert seconds < 1.5 + 5
    for task_id in ids:
        row = await task_row(db, task_id)
        assert (row.status, row.attempts, row.result["pid"]) == ("completed", 1, sup.pid)
    for task_id in later:
        row = await task_row(db, task_id)
        assert (row.status, row.attempts, row.locked_by) == ("pending", 0, None)
    assert not set(later) & set(ledger.starts())  # nothing claimed after the signal
    await _complete_the_rest(db, supervise, ledger, profile, sup)


async def test_sigterm_past_the_grace_releases_jobs_uncharged(
    db: Database, supervise: Supervise, ledger: Ledger, profile: Profile, figures: Figures
) -> None:
    slow = await enqueue_payloads(db, ASYNC_KIND, [{"sleep": HANG, "once": True}] * 2)
    # A plain def handler cannot be cancelled: its thread is abandoned, the job released.
    stubborn = await enqueue_payloads(db, SYNC_KIND, [{"hang": HANG, "once": True}])
    sup = supervise("grace", max_concurrent="3", **profile.settings())
    await eventually(lambda: _started(ledger, sup.pid, 3), within=30)
    seconds = await _signal_and_wait(sup, signal.SIGTERM)
    figures["exit_seconds"] = round(seconds, 2)
    assert profile.grace <= seconds < profile.grace + 5
    for task_id in slow + stubborn:
        row = await task_row(db, task_id)
        assert (row.status, row.attempts, row.retry_count, row.locked_by) == ("pending", 0, 0, None)
    assert "sync handler thread abandoned" in sup.log()
    figures["released"] = len(slow + stubborn)
    await _complete_the_rest(db, supervise, ledger, profile, sup)


async def test_a_second_signal_releases_at_once(
    db: Database, supervise: Supervise, ledger: Ledger, profile: Profile, figures: Figures
) -> None:
    ids = await enqueue_payloads(db, ASYNC_KIND, [{"sleep": HANG, "once": True}] * 2)
    sup = supervise("twice", **profile.settings(shutdown_grace=HANG))
    await eventually(lambda: _started(ledger, sup.pid, 2), within=30)
    seconds = await _signal_and_wait(
        sup, signal.SIGTERM, signal.SIGINT, between="shutdown: claiming stopped"
    )
    figures["exit_seconds_after_second_signal"] = round(seconds, 2)
    assert seconds < 3
    for task_id in ids:
        row = await task_row(db, task_id)
        assert (row.status, row.attempts, row.retry_count) == ("pending", 0, 0)
    await _complete_the_rest(db, supervise, ledger, profile, sup)


def test_unit_file_sends_sigterm_waits_past_the_grace_and_restarts() -> None:
    service = unit("async-processor.service")
    env = _env_file(DEPLOYMENT / "async-processor.env.example")
    grace = float(env[f"{ENV_PREFIX}SHUTDOWN_GRACE"])
    assert service.get("KillSignal", "SIGTERM") == "SIGTERM"
    # systemd SIGKILLs after TimeoutStopSec: the grace, then releasing and writing, must fit.
    assert float(service["TimeoutStopSec"]) >= grace + 15
    assert service["KillMode"] in ("mixed", "control-group")
    assert service["Restart"] == "always"
    assert float(service.get("RestartSec", "0.1")) <= 5


def _env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {k.strip(): v.strip() for k, v in pairs if not k.lstrip().startswith("#")}
