"""app.background_processor's process set-up."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

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


def test_a_stray_sys_exit_never_decides_the_exit_status() -> None:
    """asyncio lets a task's SystemExit out of the loop. Tasks a handler left running called
    sys.exit(2) while the daemon ran, when cancelled at exit, while ignoring that cancel,
    and in an async generator's cleanup: each had ended the process with its status (2:
    systemd's RestartPreventExitStatus kept it down). The daemon's own status wins."""

    async def exits_when_cancelled() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            sys.exit(2)

    async def ignores_the_cancel_then_exits() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            await asyncio.sleep(0.1)
            sys.exit(2)

    async def generator() -> Any:
        try:
            yield 1
            await asyncio.sleep(60)
        finally:
            sys.exit(2)

    left: list[Any] = []

    async def main() -> int:
        loop = asyncio.get_running_loop()

        async def exits_now() -> None:
            sys.exit(2)

        left.append(loop.create_task(exits_now()))
        await asyncio.sleep(0.05)  # it has raised and been ignored meanwhile
        left.append(loop.create_task(exits_when_cancelled()))
        left.append(loop.create_task(ignores_the_cancel_then_exits()))
        gen = generator()
        left.append(gen)
        assert await gen.__anext__() == 1  # suspended: closed by shutdown_asyncgens
        left.append(loop.create_task(exits_now()))  # raises as main returns
        return 0

    assert background_processor.run_loop(main(), 2) == 0
    assert len(left) == 5

    async def the_daemons_own() -> int:
        sys.exit(3)

    try:
        background_processor.run_loop(the_daemons_own(), 2)
    except SystemExit as exc:
        assert exc.code == 3
    else:
        raise AssertionError("the daemon's own SystemExit was swallowed")
