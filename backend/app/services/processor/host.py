"""Which daemons share this machine's process table, and whether one of them is gone.

A daemon killed outright (SIGKILL, the OOM killer, a crash) leaves its jobs in
``processing`` until their leases expire. When a daemon that can see that daemon's
process — same kernel boot, same PID namespace — finds no process with its pid, the jobs
can go back at once instead (app.services.processor.rescuer). The hostname alone is not
enough: containers and cloned machines share hostnames, and a process in another PID
namespace is invisible here although it runs. A restarted container has a new PID
namespace, so a new key: its predecessor's jobs wait for their leases.
"""

from __future__ import annotations

import os
from pathlib import Path

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
PID_NAMESPACE = Path("/proc/self/ns/pid")


def host_key() -> str | None:
    """``<boot id>/<PID namespace>`` of this process: two processes with the same key run on
    one kernel, in this boot, and see each other's pids. None where the system does not
    say (not Linux, /proc not mounted): the fast rescue is then off. Machines cloned from
    one memory snapshot share a boot id, so the rescuer also requires the same hostname."""
    try:
        boot = BOOT_ID.read_text().strip()
        namespace = os.stat(PID_NAMESPACE)
    except OSError:
        return None
    if not boot:
        return None
    return f"{boot}/{namespace.st_dev}:{namespace.st_ino}"


def pid_gone(pid: int) -> bool:
    """Whether no process has ``pid`` in this PID namespace. Any doubt is "not gone": a
    process of another user (EPERM), a zombie, a pid a new process took since, this very
    process (which may run several engines, each with its own processors row), a pid
    that is no pid at all. Those jobs then wait for their leases, as without this check."""
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError, ValueError):
        return False
    return False
