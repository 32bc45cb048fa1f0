"""Start and stop real daemon and API processes for tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.e2e.test_make_run import free_port

REPO = Path(__file__).resolve().parents[2]
FAST_ENV = {
    "ASYNC_PROCESSOR_LEASE_SECONDS": "2",
    "ASYNC_PROCESSOR_SHUTDOWN_GRACE": "3",
    "ASYNC_PROCESSOR_POLL_INTERVAL": "1",
    "ASYNC_PROCESSOR_RETRY_BACKOFF_BASE": "0.05",
    "ASYNC_PROCESSOR_RETRY_BACKOFF_MAX": "0.2",
    "ASYNC_PROCESSOR_HANDLER_MODULES": "app.services.analysis,tests.e2e.job_handlers",
    "ASYNC_PROCESSOR_LOG_LEVEL": "INFO",
}


def cli(database_url: str, *args: str, **env: str) -> str:
    """Run ``async-processor ARGS`` on the database; its stdout (raises when it fails)."""
    script = Path(sys.executable).with_name("async-processor")
    done = subprocess.run(
        [str(script), *args],
        env={**os.environ, "ASYNC_PROCESSOR_DATABASE_URL": database_url, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout


def create_token(database_url: str, user: str, *, admin: bool = False) -> str:
    """A new API token from `async-processor token create` (the last line of its stdout)."""
    args = ["token", "create", "--user", user, *(["--admin"] if admin else [])]
    return cli(database_url, *args).strip().splitlines()[-1]


class Api:
    """One `async-processor api` process on a free port, logging to a file."""

    def __init__(
        self,
        database_url: str,
        log_dir: Path,
        name: str = "api",
        *,
        args: tuple[str, ...] = (),
        extra_env: dict[str, str] | None = None,
        **env: str,
    ) -> None:
        self.log_path = log_dir / f"{name}.log"
        self.args = args
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self._env = {
            **os.environ,
            "ASYNC_PROCESSOR_DATABASE_URL": database_url,
            "PYTHONPATH": str(REPO),
            **{f"ASYNC_PROCESSOR_{k.upper()}": str(v) for k, v in env.items()},
            **(extra_env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> Api:
        """Start it and wait until /healthz answers."""
        script = Path(sys.executable).with_name("async-processor")
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(script), "api", "--port", str(self.port), *self.args],
                cwd=REPO,
                env=self._env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.base}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log()
            time.sleep(0.1)

    def stop(self, timeout: float = 20) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Daemon:
    """One `python -m app.background_processor` process, logging to a file."""

    def __init__(
        self,
        database_url: str,
        log_dir: Path,
        name: str = "daemon",
        *,
        extra_env: dict[str, str] | None = None,
        **env: str,
    ) -> None:
        self.log_path = log_dir / f"{name}.log"
        self._env = {
            **os.environ,
            **FAST_ENV,
            "ASYNC_PROCESSOR_DATABASE_URL": database_url,
            "PYTHONPATH": str(REPO),
            **{f"ASYNC_PROCESSOR_{k.upper()}": str(v) for k, v in env.items()},
            **(extra_env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.background_processor"],
            cwd=REPO,
            env=self._env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, text: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"daemon exited ({self.proc.returncode}):\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not logged within {timeout} s:\n{self.log()}")
            time.sleep(0.05)
