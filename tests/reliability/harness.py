"""The reliability harness: profiles, the ledger reader, a supervisor that restarts the
daemon like systemd's Restart=always, and small probes of processes and logs."""

from __future__ import annotations

import json
import os
import platform
import re
import signal
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select

from app.db import Database
from app.models import PendingAnalysis, TaskStatus
from app.services.faults import FAULT_POINT_ENV
from tests.e2e.daemon import Daemon
from tests.reliability.ledger import LEDGER_ENV

HANDLER_MODULES = "app.services.analysis,tests.reliability.ledger"
FAULT_ENV = FAULT_POINT_ENV
RESTART_WITHIN_SECONDS = 0.5
BUSY_MARKERS = ("database is locked", "sqlite_busy", "database table is locked")


@dataclass(frozen=True)
class Profile:
    """Timings and sizes of one run of the suite. ``fast`` runs in `make test`; ``full``
    (`make reliability`) uses the shipped defaults and larger counts."""

    name: str
    lease: float
    grace: float
    poll: float
    backoff_base: float
    backoff_max: float
    chaos_jobs: int
    chaos_kills: int
    chaos_sleep: tuple[float, float]
    kill_gap: tuple[float, float]
    pg_outages: tuple[float, ...]
    sqlite_lock: float
    fleet_jobs: int
    api_clients: int
    api_enqueues: int
    api_pollers: int
    api_poll_every: float

    def settings(self, **overrides: object) -> dict[str, str]:
        """Daemon settings (ASYNC_PROCESSOR_* without the prefix) of this profile."""
        base: dict[str, object] = {
            "lease_seconds": self.lease,
            "shutdown_grace": self.grace,
            "poll_interval": self.poll,
            "retry_backoff_base": self.backoff_base,
            "retry_backoff_max": self.backoff_max,
            "handler_modules": HANDLER_MODULES,
        }
        base.update(overrides)
        return {k: str(v) for k, v in base.items()}

    @property
    def rescue_within(self) -> float:
        """How long after a death its jobs may take to be claimed again: a lease, a rescue
        interval, and a margin for a loaded machine (the restarted daemon's start: on a
        slow 2-core VM under the rest of the suite, ~1-2 s of imports and set-up)."""
        return self.lease + max(0.5, self.lease / 2) + 4.0


FAST = Profile(
    name="fast",
    lease=2.0,
    grace=2.0,
    poll=1.0,
    backoff_base=0.05,
    backoff_max=0.2,
    chaos_jobs=500,
    chaos_kills=5,
    chaos_sleep=(0.05, 0.5),
    kill_gap=(1.0, 2.0),
    pg_outages=(5.0,),
    sqlite_lock=8.0,
    fleet_jobs=3_000,
    api_clients=200,
    api_enqueues=3,
    api_pollers=50,
    api_poll_every=4.0,
)
FULL = Profile(
    name="full",
    lease=30.0,
    grace=30.0,
    poll=5.0,
    backoff_base=10.0,
    backoff_max=3600.0,
    chaos_jobs=2_000,
    chaos_kills=20,
    chaos_sleep=(0.05, 1.0),
    kill_gap=(2.0, 4.0),
    pg_outages=(5.0, 30.0),
    sqlite_lock=30.0,
    fleet_jobs=10_000,
    api_clients=200,
    api_enqueues=20,
    api_pollers=50,
    api_poll_every=0.2,
)


def current_profile() -> Profile:
    """RELIABILITY_PROFILE=full selects the full profile; anything else is fast."""
    return FULL if os.environ.get("RELIABILITY_PROFILE", "fast") == "full" else FAST


def machine() -> str:
    """CPU model, cores and memory of this host, for the published figures."""
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        kib = int(f.readline().split()[1])
    return f"{model or platform.processor()}, {os.cpu_count()} cores, {kib // 1024**2 + 1} GiB"


# --- the ledger --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    task_id: int
    attempt: int
    pid: int
    event: str
    t: float


class Ledger:
    """The JSONL file the ledger handlers append to (see tests/reliability/ledger.py)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def env(self) -> dict[str, str]:
        """What a daemon needs to write this ledger."""
        return {LEDGER_ENV: str(self.path)}

    def events(self) -> list[Event]:
        """Every event, in the order written."""
        if not self.path.exists():
            return []
        return [Event(**json.loads(line)) for line in self.path.read_text().splitlines()]

    def starts(self) -> Counter[int]:
        """How many times each task's handler started."""
        return Counter(e.task_id for e in self.events() if e.event == "start")

    def open_runs(self, pid: int) -> set[int]:
        """Tasks whose handler started in ``pid`` and did not end there."""
        open_: set[int] = set()
        for e in self.events():
            if e.pid != pid:
                continue
            if e.event == "start":
                open_.add(e.task_id)
            else:
                open_.discard(e.task_id)
        return open_

    def runs(self) -> dict[int, list[Event]]:
        """Each task's events, in order."""
        by_task: dict[int, list[Event]] = defaultdict(list)
        for e in self.events():
            by_task[e.task_id].append(e)
        return by_task


# --- the supervisor ----------------------------------------------------------------------------


@dataclass
class Run:
    """One life of a supervised daemon."""

    pid: int
    started: float
    ended: float | None = None
    code: int | None = None


class Supervisor:
    """Keeps a daemon running: starts it again within 0.5 s of any exit (what systemd's
    Restart=always does). ``env_for_run(i)`` gives extra environment for the i-th start."""

    def __init__(
        self,
        database_url: str,
        log_dir: Path,
        name: str = "daemon",
        *,
        env_for_run: Callable[[int], dict[str, str]] | None = None,
        extra_env: dict[str, str] | None = None,
        **settings: str,
    ) -> None:
        self._url = database_url
        self._dir = log_dir
        self.name = name
        self._env_for_run = env_for_run or (lambda _: {})
        self._extra_env = extra_env or {}
        self._settings = settings
        self.runs: list[Run] = []
        self.daemon: Daemon | None = None
        self._stopping = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._watch, name=f"supervisor-{name}", daemon=True)

    @property
    def log_path(self) -> Path:
        return self._dir / f"{self.name}.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> Supervisor:
        self._thread.start()
        with self._cond:
            self._cond.wait_for(lambda: bool(self.runs), timeout=10)
        return self

    def _watch(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    return
                env = {**self._extra_env, **self._env_for_run(len(self.runs))}
                daemon = Daemon(self._url, self._dir, self.name, extra_env=env, **self._settings)
                daemon.start()
                run = Run(daemon.pid, time.monotonic())
                self.daemon = daemon
                self.runs.append(run)
                self._cond.notify_all()
            assert daemon.proc is not None
            code = daemon.proc.wait()
            with self._cond:
                run.ended, run.code = time.monotonic(), code
                self._cond.notify_all()

    @property
    def pid(self) -> int:
        return self.runs[-1].pid

    @property
    def restarts(self) -> int:
        return len(self.runs) - 1

    def restart_gaps(self) -> list[float]:
        """Seconds between each exit and the next start."""
        return [
            b.started - a.ended
            for a, b in zip(self.runs, self.runs[1:], strict=False)
            if a.ended is not None
        ]

    def wait_for_run(self, index: int, timeout: float = 30) -> Run:
        """The ``index``-th run (0-based), once started."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.runs) > index, timeout=timeout):
                raise AssertionError(f"{self.name}: run {index} not started within {timeout} s")
            return self.runs[index]

    def wait_for_exit(self, run: Run, timeout: float = 30) -> int:
        with self._cond:
            if not self._cond.wait_for(lambda: run.code is not None, timeout=timeout):
                raise AssertionError(f"{self.name}: pid {run.pid} still alive after {timeout} s")
            assert run.code is not None
            return run.code

    def kill(self) -> Run:
        """SIGKILL the running daemon and wait until it is gone (the watcher restarts it)."""
        run = self.runs[-1]
        os.kill(run.pid, signal.SIGKILL)
        self.wait_for_exit(run, 10)
        return run

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def halt(self) -> Run:
        """No more restarts; the current run, left running (signal it yourself)."""
        with self._cond:
            self._stopping = True
            return self.runs[-1]

    def ready(self, run: Run) -> bool:
        """The run's daemon said it started (it handles signals from then on)."""
        return any(
            f":{run.pid}:" in line and "started: concurrency" in line
            for line in self.log().splitlines()
        )

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM without restart (once the daemon is up: before that, SIGTERM's default
        action would kill it); the exit code."""
        run = self.halt()
        deadline = time.monotonic() + 30
        while run.code is None and not self.ready(run) and time.monotonic() < deadline:
            time.sleep(0.05)
        if run.code is None:
            os.kill(run.pid, signal.SIGTERM)
        code = self.wait_for_exit(run, timeout)
        self._thread.join(5)
        return code

    def close(self) -> None:
        """Teardown: no more restarts; SIGKILL whatever still runs."""
        with self._cond:
            self._stopping = True
        for run in self.runs:
            if run.code is None:
                try:
                    os.kill(run.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self._thread.is_alive():
            self._thread.join(10)


# --- probes -------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time used by a live process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def busy_errors(*logs: str) -> int:
    """Lines that report SQLite's busy error, in every log given."""
    return sum(
        1
        for log in logs
        for line in log.lower().splitlines()
        if any(m in line for m in BUSY_MARKERS)
    )


def count_lines(log: str, pattern: str) -> int:
    return sum(1 for line in log.splitlines() if re.search(pattern, line))


async def held_by(db: Database, pid: int) -> set[int]:
    """Tasks in processing whose lock belongs to the daemon of ``pid`` (host:pid:random)."""
    async with db.read_transaction() as s:
        rows = await s.execute(
            select(PendingAnalysis.id).where(
                PendingAnalysis.status == TaskStatus.PROCESSING,
                PendingAnalysis.locked_by.like(f"%:{pid}:%"),
            )
        )
        return {r.id for r in rows}


async def count_terminal(db: Database, ids: Iterable[int] | None = None) -> int:
    async with db.read_transaction() as s:
        stmt = select(PendingAnalysis.id).where(
            PendingAnalysis.status.in_(
                [TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED]
            )
        )
        if ids is not None:
            stmt = stmt.where(PendingAnalysis.id.in_(list(ids)))
        return len((await s.execute(stmt)).all())


@dataclass
class Figures:
    """What one scenario reports into the JSON summary."""

    scenario: str
    engine: str
    values: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def __setitem__(self, key: str, value: Any) -> None:
        self.values[key] = value

    def as_dict(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "engine": self.engine, **self.values}
