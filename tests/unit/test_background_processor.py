"""app.background_processor's process set-up."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from pathlib import Path

from app import background_processor

REPO = Path(__file__).resolve().parents[2]
PROBE = """
import sys
from app import background_processor
seen = []
def run(coro, pool_threads):
    coro.close()
    seen.append(sys.getswitchinterval())
    return 0
background_processor.run_loop = run
assert background_processor.run() == 0
print(seen[0])
"""


def test_the_daemon_shortens_the_gil_switch_interval(tmp_path: Path) -> None:
    """CPU-bound ``def`` handlers hold the GIL for whole switch intervals while the event
    loop waits: the daemon runs with 0.5 ms, not CPython's 5 ms (docs/reliability.md,
    finding 2)."""
    assert background_processor.SWITCH_INTERVAL_SECONDS == 0.0005
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO / "backend"),
        "ASYNC_PROCESSOR_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/never-opened.db",
    }
    probe = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert probe.returncode == 0, probe.stderr
    assert float(probe.stdout.strip()) == background_processor.SWITCH_INTERVAL_SECONDS
    assert sys.getswitchinterval() != background_processor.SWITCH_INTERVAL_SECONDS  # not here


def test_handlers_get_a_thread_pool_as_large_as_the_daemon_runs_jobs() -> None:
    """asyncio's default pool is min(32, CPUs + 4) threads (six on two cores): ten jobs each
    waiting on asyncio.to_thread work queued for them, and timed out waiting. The daemon's
    loop has a pool of the size it is given; twelve threads meet at a barrier here."""
    meeting = 12

    async def main() -> int:
        barrier = threading.Barrier(meeting, timeout=10)
        await asyncio.gather(*(asyncio.to_thread(barrier.wait) for _ in range(meeting)))
        return 7

    assert background_processor.run_loop(main(), meeting) == 7
