"""`make run`'s dev server: one command brings up API and daemon; Ctrl-C stops both."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.e2e]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_dev_server_runs_a_task_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASYNC_PROCESSOR_")}
    script = Path(sys.executable).with_name("async-processor")
    log = (tmp_path / "dev.log").open("wb")
    proc = subprocess.Popen(
        [str(script), "dev", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            text = (tmp_path / "dev.log").read_text(errors="replace")
            if "admin token:" in text:
                try:
                    if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
            assert proc.poll() is None, text
            assert time.monotonic() < deadline, text
            time.sleep(0.2)
        token = text.split("admin token:")[1].split()[0]
        headers = {"Authorization": f"Bearer {token}"}
        created = httpx.post(
            f"{base}/api/async-analysis/tasks",
            headers=headers,
            json={"kind": "chapter_analysis", "payload": {"text": "One. Two."}},
        )
        assert created.status_code == 202
        url = f"{base}/api/async-analysis/tasks/{created.json()['id']}"
        while httpx.get(url, headers=headers).json()["status"] != "completed":
            assert time.monotonic() < deadline + 30
            time.sleep(0.1)
        assert (tmp_path / "data" / "async_processor.db").is_file()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        children = subprocess.run(
            ["pgrep", "-f", "--", f"--port {port}"], capture_output=True, text=True, check=False
        )
        assert children.stdout.strip() == ""
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
