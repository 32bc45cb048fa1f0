"""A throwaway PostgreSQL cluster a test may stop and start (never the shared server)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_postgres(*args: str) -> list[str]:
    return list(args) if os.geteuid() != 0 else ["runuser", "-u", "postgres", "--", *args]


class Cluster:
    """initdb + pg_ctl on a free port, trust auth, in a temporary folder."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="ap-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")

    @staticmethod
    def available() -> bool:
        """True when the PostgreSQL 15 server binaries are installed."""
        return (PG_BIN / "initdb").exists()

    def init(self) -> Cluster:
        subprocess.run(
            _as_postgres(
                str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres"
            ),
            check=True,
            capture_output=True,
        )
        return self

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(
            _as_postgres(
                str(PG_BIN / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.root / "log"),
                "-o",
                options,
                "-w",
                "start",
            ),
            check=True,
            capture_output=True,
        )

    def stop(self) -> None:
        subprocess.run(
            _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"),
            check=False,
            capture_output=True,
        )

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
