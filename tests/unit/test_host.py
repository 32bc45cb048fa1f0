"""app.services.processor.host: which daemons share this machine's process table, and
whether one of them is gone."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.services.processor import host
from tests.helpers import reaped_and_running_pids

REPO = Path(__file__).resolve().parents[2]


def test_host_key_is_the_boot_and_the_pid_namespace_and_a_child_shares_it() -> None:
    key = host.host_key()
    assert key is not None
    boot, namespace = key.split("/")
    assert boot == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    ns = os.stat("/proc/self/ns/pid")
    assert namespace == f"{ns.st_dev}:{ns.st_ino}"
    assert host.host_key() == key
    child = subprocess.run(
        [sys.executable, "-c", "from app.services.processor import host; print(host.host_key())"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "backend")},
    )
    assert child.stdout.strip() == key


def test_host_key_is_none_where_the_system_does_not_say(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(host, "BOOT_ID", tmp_path / "missing")
    assert host.host_key() is None
    (tmp_path / "empty").write_text("\n")
    monkeypatch.setattr(host, "BOOT_ID", tmp_path / "empty")
    assert host.host_key() is None
    monkeypatch.setattr(host, "BOOT_ID", Path("/proc/sys/kernel/random/boot_id"))
    monkeypatch.setattr(host, "PID_NAMESPACE", tmp_path / "no-namespace")
    assert host.host_key() is None


@pytest.fixture
def children() -> Iterator[tuple[int, int]]:
    """The pid of a child that ran and was reaped, and of one that runs."""
    with reaped_and_running_pids() as found:
        yield found


def test_pid_gone_only_when_no_process_has_it(children: tuple[int, int]) -> None:
    reaped, running = children
    assert host.pid_gone(reaped)
    assert not host.pid_gone(running)
    assert not host.pid_gone(os.getpid())  # another engine of this process may own the row
    assert not host.pid_gone(1)  # init, whoever runs the tests
    assert not host.pid_gone(0) and not host.pid_gone(-5) and not host.pid_gone(2**70)


def test_an_unreaped_child_is_not_gone() -> None:
    """A zombie still holds its pid (it may be a daemon a supervisor has yet to reap): the
    jobs wait for their leases, as without the check."""
    child = subprocess.Popen(["true"])
    try:
        stat = Path(f"/proc/{child.pid}/stat")
        deadline = time.monotonic() + 10
        while stat.read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the child never exited"
            time.sleep(0.01)
        assert not host.pid_gone(child.pid)
    finally:
        child.wait()
    assert host.pid_gone(child.pid)
