"""SQLite's stand-in for LISTEN/NOTIFY: a doorbell of Unix datagram sockets.

Each daemon on a SQLite database binds a datagram socket in the directory
``<database file>.wake/`` beside the database. A process that commits new work (an enqueue,
a manual retry) sends one empty datagram to every socket there, after its commit; the
daemon's event loop wakes on it at once instead of at its next ``PRAGMA data_version``
read. A commit that asks for a running job to be cancelled sends ``CANCEL`` instead: the
daemon then also checks its jobs' cancel flags at once, not at its next heartbeat.

Best effort by design: a full socket buffer, a daemon that died and left its socket behind,
or a directory that cannot be created only lose the shortcut, never a job or a cancel; the
data_version poll, the poll interval and the heartbeat still find them.

Socket paths are limited to about 100 bytes; a longer one is reached through
``/proc/self/fd/<directory fd>/<name>`` (Linux), and where neither works there is no bell.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import socket
import time
import uuid
from pathlib import Path

logger = logging.getLogger("app.processor")

SUFFIX = ".wake"
SOCKET_SUFFIX = ".sock"
MAX_SOCKET_PATH = 100  # sun_path is 108 bytes on Linux, less elsewhere
#: The datagram of a ring that asks the daemons to look at their jobs' cancel flags now
#: (any other datagram, the empty one, says there is new work).
CANCEL = b"cancel"


def bell_dir(database: Path) -> Path:
    """The doorbell directory of a SQLite database file."""
    return database.with_name(database.name + SUFFIX)


class _Dir:
    """A directory addressed by a short path: itself, or /proc/self/fd/N when too long."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def address(self, name: str) -> str | None:
        full = str(self.path / name)
        if len(full) <= MAX_SOCKET_PATH:
            return full
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                return None
        short = f"/proc/self/fd/{self._fd}/{name}"
        return short if len(short) <= MAX_SOCKET_PATH and Path("/proc/self/fd").is_dir() else None

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


_SENDER: socket.socket | None = None  # one unbound datagram socket rings every bell


def _sender() -> socket.socket:
    global _SENDER
    if _SENDER is None:
        _SENDER = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        _SENDER.setblocking(False)
        atexit.register(_SENDER.close)
    return _SENDER


#: A directory listing is reused only once the directory's last change is this far in the
#: past: a filesystem stamps changes with a coarse clock, so an entry added in the same
#: tick as the listing could leave the modification time unchanged ("racy git").
TRUST_AFTER_NS = 1_000_000_000


class Bell:
    """Rings every daemon's doorbell of one database (the enqueuing side).

    Every enqueue rings, so the directory is listed only when it changed: one stat instead
    of a scandir and an address per socket (~25 → ~10 µs a ring). A daemon that starts or
    stops changes the directory, and the next ring lists it again.
    """

    def __init__(self, database: Path) -> None:
        self._dir = _Dir(bell_dir(database))
        # ((st_ino, st_mtime_ns) of the listing when it can be trusted, else None; addresses)
        self._listing: tuple[tuple[int, int] | None, list[str]] = (None, [])

    def _addresses(self) -> list[str]:
        stat = os.stat(self._dir.path)  # OSError: no daemon has made the directory
        seen = (stat.st_ino, stat.st_mtime_ns)
        trusted, addresses = self._listing
        if trusted == seen:
            return addresses
        names = [e.name for e in os.scandir(self._dir.path) if e.name.endswith(SOCKET_SUFFIX)]
        addresses = [a for a in map(self._dir.address, names) if a is not None]
        settled = time.time_ns() - stat.st_mtime_ns > TRUST_AFTER_NS
        self._listing = (seen if settled else None, addresses)
        return addresses

    def ring(self, message: bytes = b"") -> int:
        """Send one datagram (``message``: empty for new work, or ``CANCEL``) to each
        doorbell; how many were delivered."""
        try:
            addresses = self._addresses()
        except OSError:
            return 0  # no daemon has made the directory: nobody to wake
        if not addresses:
            return 0
        sender = _sender()
        delivered = 0
        for address in addresses:
            try:
                sender.sendto(message, address)
                delivered += 1
            except OSError:
                # ECONNREFUSED: a dead daemon's socket; EAGAIN: the bell is already ringing.
                pass
        return delivered

    def close(self) -> None:
        self._dir.close()


class Doorbell:
    """One daemon's doorbell (the waiting side): a bound datagram socket to wait on."""

    def __init__(self, database: Path) -> None:
        self._dir = _Dir(bell_dir(database))
        self._name = f"{os.getpid()}-{uuid.uuid4().hex[:8]}{SOCKET_SUFFIX}"
        self.sock: socket.socket | None = None
        #: whether the last ``drain`` read a ``CANCEL``
        self.cancel_rung = False

    def open(self) -> bool:
        """Create the directory and bind; False (and no bell) when that is not possible."""
        try:
            self._dir.path.mkdir(mode=0o700, exist_ok=True)
            self._reap()
            address = self._dir.address(self._name)
            if address is None:
                return False
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(address)
        except OSError as exc:
            logger.info(
                "no enqueue doorbell at %s (%s); data_version polling only", self._dir.path, exc
            )
            return False
        sock.setblocking(False)
        self.sock = sock
        return True

    def _reap(self) -> None:
        """Remove doorbells whose process is gone (left behind by a SIGKILL)."""
        for entry in os.scandir(self._dir.path):
            pid, _, _ = entry.name.partition("-")
            if not (entry.name.endswith(SOCKET_SUFFIX) and pid.isdigit()):
                continue
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
            except OSError:
                pass  # alive, another user's

    def drain(self) -> int:
        """Read every pending datagram; how many (``cancel_rung`` says whether one was a
        ``CANCEL``)."""
        n = 0
        self.cancel_rung = False
        if self.sock is None:
            return n
        while True:
            try:
                message = self.sock.recv(16)
            except OSError:
                return n
            n += 1
            if message == CANCEL:
                self.cancel_rung = True

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            with contextlib.suppress(OSError):
                os.unlink(self._dir.path / self._name)
        self._dir.close()
