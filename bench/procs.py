"""Real processes: the daemon, the API, floor workers; and what /proc says about them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import httpx

REPO = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 60.0


class ProcessError(RuntimeError):
    """A process the benchmark started misbehaved; the message carries its log's tail."""


def python_path() -> str:
    """PYTHONPATH for children: this checkout's backend (so a worktree benchmarks its own
    code) and the checkout itself (for ``bench``)."""
    parts = [str(REPO / "backend"), str(REPO), os.environ.get("PYTHONPATH", "")]
    return os.pathsep.join(p for p in parts if p)


def child_env(database_url: str, **settings: str) -> dict[str, str]:
    """The environment of a daemon or API: this one without ASYNC_PROCESSOR_* (so a
    developer's settings cannot leak in), plus the database, the bench handlers, and
    ``settings`` (``max_concurrent="10"`` → ASYNC_PROCESSOR_MAX_CONCURRENT=10)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASYNC_PROCESSOR_")}
    env.pop("NOTIFY_SOCKET", None)
    env.pop("WATCHDOG_USEC", None)
    env["PYTHONPATH"] = python_path()
    env["ASYNC_PROCESSOR_DATABASE_URL"] = database_url
    env["ASYNC_PROCESSOR_HANDLER_MODULES"] = "bench.handlers"
    env.update({f"ASYNC_PROCESSOR_{k.upper()}": v for k, v in settings.items()})
    return env


def compile_bytecode() -> None:
    """Byte-compile backend/ and bench/ (files whose bytecode is missing or stale), as
    ``pip install`` does for a deployment: a daemon started from this checkout then loads
    its modules as a deployed one does, not compiled from source at every start (which
    costs ~4.5 MB of RSS and ~0.1 s, and happens here when PYTHONDONTWRITEBYTECODE is set)."""
    import compileall
    import io
    from contextlib import redirect_stdout

    for folder in (REPO / "backend", REPO / "bench"):
        out = io.StringIO()
        with redirect_stdout(out):
            ok = compileall.compile_dir(folder, quiet=1)
        if not ok:
            raise ProcessError(f"compileall {folder} failed:\n{out.getvalue()[-2000:]}")


def tail(path: Path, lines: int = 40) -> str:
    """The last lines of a log file."""
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS (resident now) and VmHWM (peak resident) of ``pid``, in kB."""
    found = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0])
    return found


#: W6's breakdown: what importing each layer of the daemon's stack adds to a fresh
#: process's RSS, in the order the daemon comes to need them.
IMPORT_STEPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("python", ()),
    ("asyncio (with ssl)", ("asyncio", "ssl")),
    ("sqlalchemy (Core)", ("sqlalchemy",)),
    ("sqlalchemy.ext.asyncio (with the ORM)", ("sqlalchemy.ext.asyncio",)),
    ("pydantic-settings (with pydantic)", ("pydantic_settings",)),
)

_IMPORT_RSS = """\
import importlib, json, sys
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
out = []
for label, modules in json.loads(sys.argv[1]):
    for name in modules:
        importlib.import_module(name)
    out.append([label, rss()])
print(json.dumps(out))
"""


async def import_rss(
    steps: Sequence[tuple[str, Sequence[str]]], env: dict[str, str]
) -> list[tuple[str, float]]:
    """RSS (MB) of a fresh ``python`` after each step's imports, cumulatively: what the
    daemon's RSS is made of before it does anything."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _IMPORT_RSS,
        json.dumps([[label, list(modules)] for label, modules in steps]),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise ProcessError(f"import_rss: {err.decode(errors='replace')[-2000:]}")
    return [(label, kb / 1024) for label, kb in json.loads(out)]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by ``pid`` (all its threads)."""
    with open(f"/proc/{pid}/stat") as stat:
        text = stat.read()
    fields = text[text.rindex(")") + 2 :].split()
    # after "pid (comm) ": state is field 3, utime field 14, stime field 15 (1-based)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Daemon:
    """``python -m app.background_processor`` with systemd's notify protocol: ``start()``
    returns once the daemon has sent READY=1 (schema checked, claiming)."""

    def __init__(self, database_url: str, log_path: Path, **settings: str) -> None:
        self.log_path = log_path
        self.env = child_env(database_url, **settings)
        self.proc: asyncio.subprocess.Process | None = None
        self._sockdir = Path(tempfile.mkdtemp(prefix="apb-"))
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(self._sockdir / "notify"))
        self._sock.setblocking(False)
        self.env["NOTIFY_SOCKET"] = str(self._sockdir / "notify")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self) -> Daemon:
        log = self.log_path.open("ab")
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "app.background_processor",
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
            )
        finally:
            log.close()
        await self._wait_for("READY=1")
        return self

    async def _wait_for(self, message: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                await self.kill()
                raise ProcessError(f"daemon sent no {message} in time:\n{tail(self.log_path)}")
            recv = asyncio.ensure_future(loop.sock_recv(self._sock, 4096))
            exited = asyncio.ensure_future(self._exited())
            done, _ = await asyncio.wait(
                {recv, exited}, timeout=left, return_when=asyncio.FIRST_COMPLETED
            )
            if recv in done:
                exited.cancel()
                if message in recv.result().decode(errors="replace").split("\n"):
                    return
                continue
            recv.cancel()
            if exited in done:
                raise ProcessError(
                    f"daemon exited with {exited.result()} before {message}:\n{tail(self.log_path)}"
                )
            exited.cancel()

    async def _exited(self) -> int:
        assert self.proc is not None
        return await self.proc.wait()

    def check_alive(self) -> None:
        """Raise if the daemon has exited."""
        if self.proc is not None and self.proc.returncode is not None:
            raise ProcessError(f"daemon exited with {self.proc.returncode}:\n{tail(self.log_path)}")

    async def stop(self) -> int:
        """SIGTERM, wait; raises unless it exits 0 (a graceful stop)."""
        try:
            if self.proc is None:
                return 0
            if self.proc.returncode is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    code = await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT_SECONDS)
                except TimeoutError:
                    await self.kill()
                    raise ProcessError(
                        f"daemon did not stop in time:\n{tail(self.log_path)}"
                    ) from None
            else:
                code = self.proc.returncode
            if code != 0:
                raise ProcessError(f"daemon exited with {code}:\n{tail(self.log_path)}")
            return code
        finally:
            self._close()

    async def kill(self) -> None:
        """SIGKILL (cleanup after a failure)."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 10)
        self._close()

    def _close(self) -> None:
        self._sock.close()
        with contextlib.suppress(OSError):
            (self._sockdir / "notify").unlink()
            self._sockdir.rmdir()


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli_path() -> str:
    """The ``async-processor`` script next to this interpreter."""
    return str(Path(sys.executable).with_name("async-processor"))


async def create_token(database_url: str) -> str:
    """``async-processor token create --user bench --admin``: the token (last stdout line)."""
    proc = await asyncio.create_subprocess_exec(
        cli_path(),
        "token",
        "create",
        "--user",
        "bench",
        "--admin",
        "--name",
        "bench",
        cwd=REPO,
        env=child_env(database_url),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), START_TIMEOUT_SECONDS)
    if proc.returncode != 0:
        raise ProcessError(f"token create exited with {proc.returncode}: {err.decode()}")
    return out.decode().strip().splitlines()[-1].strip()


class Api:
    """``async-processor api --port P`` (uvicorn); ``start()`` returns once /readyz is 200."""

    def __init__(self, database_url: str, log_path: Path) -> None:
        self.log_path = log_path
        self.env = child_env(database_url)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> Api:
        log = self.log_path.open("ab")
        try:
            self.proc = await asyncio.create_subprocess_exec(
                cli_path(),
                "api",
                "--port",
                str(self.port),
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
            )
        finally:
            log.close()
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        async with httpx.AsyncClient() as client:
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{self.base}/readyz", timeout=2)).status_code == 200:
                        return self
                if self.proc.returncode is not None or time.monotonic() > deadline:
                    await self.stop()
                    raise ProcessError(f"the API did not become ready:\n{tail(self.log_path)}")
                await asyncio.sleep(0.1)

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT_SECONDS)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


class FloorWorker:
    """``python -m bench.floors MODE …``: ``start()`` returns at its READY line;
    ``result()`` waits for its JSON line."""

    def __init__(
        self,
        mode: str,
        driver: str,
        target: str,
        batch: int,
        count: int = 0,
        synchronous: str = "NORMAL",
    ) -> None:
        self.args = [
            "-m",
            "bench.floors",
            mode,
            "--synchronous",
            synchronous,
            "--driver",
            driver,
            "--target",
            target,
            "--batch",
            str(batch),
            "--count",
            str(count),
        ]
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self) -> FloorWorker:
        env = {**os.environ, "PYTHONPATH": python_path()}
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *self.args,
            cwd=REPO,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), START_TIMEOUT_SECONDS)
        except BaseException:
            if self.proc.returncode is None:
                self.proc.kill()
            raise
        if line.strip() != b"READY":
            await self._fail(f"floor worker did not start: {line!r}")
        return self

    async def result(self, limit_seconds: float) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            out, err = await asyncio.wait_for(self.proc.communicate(), limit_seconds)
        except TimeoutError:
            await self._fail("floor worker timed out")
        except asyncio.CancelledError:
            if self.proc.returncode is None:
                self.proc.kill()
            raise
        if self.proc.returncode != 0:
            raise ProcessError(f"floor worker exited with {self.proc.returncode}: {err.decode()}")
        return out.decode().strip().splitlines()[-1]

    async def _fail(self, message: str) -> NoReturn:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.kill()
        _, err = await self.proc.communicate()
        raise ProcessError(f"{message}\n{err.decode(errors='replace')[-3000:]}")
