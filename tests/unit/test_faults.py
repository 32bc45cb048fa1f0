"""The test-only fault switches: parsed strictly, and a fault point kills at its n-th pass."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from app.services import faults


def test_points_and_bugs_parse_strictly() -> None:
    assert faults.parse_point(None) is None and faults.parse_point("") is None
    assert faults.parse_point("before_handler") == ("before_handler", 1)
    assert faults.parse_point("inside_heartbeat_txn:3") == ("inside_heartbeat_txn", 3)
    for bad in ("no_such_point", "before_handler:0"):
        with pytest.raises(ValueError, match=faults.FAULT_POINT_ENV):
            faults.parse_point(bad)
    assert faults.parse_bugs("fence, rescue") == {"fence", "rescue"}
    assert faults.parse_bugs(None) == frozenset()
    with pytest.raises(ValueError, match="unknown"):
        faults.parse_bugs("fence,typo")


def test_unarmed_points_and_bugs_do_nothing() -> None:
    assert os.environ.get(faults.FAULT_POINT_ENV) is None
    faults.fault_point("after_claim_commit")
    assert not any(faults.seeded(bug) for bug in faults.BUGS)


def test_an_armed_point_kills_the_process_at_its_nth_pass() -> None:
    code = (
        "from app.services import faults\n"
        "for i in range(3):\n"
        "    faults.fault_point('after_complete_commit')\n"
        "    faults.fault_point('before_handler')\n"
        "    print(i, flush=True)\n"
    )
    env = {**os.environ, faults.FAULT_POINT_ENV: "before_handler:2"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == -signal.SIGKILL
    assert done.stdout == "0\n"
    assert "fault point before_handler reached (pass 2): SIGKILL" in done.stderr


def test_an_armed_hook_is_logged_at_start() -> None:
    """A deployment that inherited a test hook says so (fencing off, a kill armed)."""
    code = (
        "import logging\n"
        "logging.basicConfig(format='%(levelname)s %(message)s')\n"
        "from app.services import faults\n"
        "faults.warn_if_armed(logging.getLogger('t'))\n"
    )
    env = {**os.environ, faults.SEEDED_BUG_ENV: "fence", faults.FAULT_POINT_ENV: "before_handler"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "ERROR TEST HOOK ARMED: ASYNC_PROCESSOR_SEEDED_BUG=fence" in done.stderr
    assert "ERROR TEST HOOK ARMED: ASYNC_PROCESSOR_FAULT_POINT=before_handler:1" in done.stderr
    quiet = {
        k: v for k, v in env.items() if k not in (faults.SEEDED_BUG_ENV, faults.FAULT_POINT_ENV)
    }
    done = subprocess.run(
        [sys.executable, "-c", code], env=quiet, capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stderr) == (0, "")
