"""`make run`: migrate, start the API and the daemon side by side, stop both on Ctrl-C."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from app import schema
from app.config import SettingsError, load_settings, redact_url

STOP_TIMEOUT_SECONDS = 45.0


def _command() -> list[str]:
    script = Path(sys.executable).with_name("async-processor")
    return (
        [str(script)]
        if script.exists()
        else [sys.executable, "-c", "from app.cli import main; main()"]
    )


def _admin_token() -> str | None:
    # --replace: the last start's token is revoked, not piled up with every restart
    create = ["token", "create", "--user", "admin", "--admin", "--name", "make-run", "--replace"]
    result = subprocess.run(  # noqa: S603 - our own command
        [*_command(), *create],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = result.stdout.strip().splitlines()
    return lines[-1] if result.returncode == 0 and lines else None


def _stop(procs: list[subprocess.Popen[bytes]]) -> int:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
    return max((p.returncode or 0) for p in procs)


def run(*, host: str, port: int) -> int:
    """Run until Ctrl-C or until one of the two processes exits; returns the exit code."""
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    schema.upgrade(settings.database_url)
    token = _admin_token()
    # Own sessions: Ctrl-C reaches only this process, which then stops each child once
    # (a second signal would make the daemon release its jobs at once).
    procs = [
        subprocess.Popen([*_command(), "processor"], start_new_session=True),  # noqa: S603
        subprocess.Popen(  # noqa: S603
            [*_command(), "api", "--host", host, "--port", str(port)], start_new_session=True
        ),
    ]
    base = f"http://{host}:{port}"
    print(f"\nasync-processor is running on {redact_url(settings.database_url)}")
    print(f"  API docs:   {base}/docs")
    print(f"  dashboard:  {base}/dashboard")
    if token:
        print(f"  admin token: {token}")
    print("Press Ctrl-C to stop both.\n", flush=True)
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    with contextlib.suppress(KeyboardInterrupt):
        while not stopping and all(p.poll() is None for p in procs):
            time.sleep(0.2)
    code = _stop(procs)
    print("stopped.", flush=True)
    return 0 if stopping else (code or 1)
