"""Logging: human-readable lines by default, JSON lines with LOG_FORMAT=json."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import weakref
from datetime import UTC, datetime
from typing import Any

CONTEXT_FIELDS = ("action", "task_id", "kind", "attempt", "final", "processor_id")
#: Fields every JSON line of this process carries (the daemon sets processor_id).
PROCESS_CONTEXT: dict[str, str] = {}


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the job context fields when present."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(PROCESS_CONTEXT)
        entry.update({k: getattr(record, k) for k in CONTEXT_FIELDS if hasattr(record, k)})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """The text format: ``<local time>,<ms> <LEVEL> <logger>: <message>``.

    ``logging.Formatter`` formats each record's time with ``time.localtime`` and
    ``time.strftime``; the daemon logs two lines a job, thousands of lines a second, and
    that was ~4 % of its Python time in a SQLite drain. Here the seconds' part is formatted
    once per second and reused (the same text, byte for byte).
    """

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        self._second: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        cached, text = self._second  # one tuple: a reader never sees a torn pair
        if second != cached:
            text = time.strftime(self.default_time_format, self.converter(record.created))
            self._second = (second, text)
        return f"{text},{int(record.msecs):03d}"  # logging.Formatter.default_msec_format


#: syslog priorities of the levels (sd-daemon(3)'s "<N>" line prefixes).
SYSLOG_PRIORITY = {"CRITICAL": 2, "ERROR": 3, "WARNING": 4, "INFO": 6, "DEBUG": 7}


class JournalFormatter(logging.Formatter):
    """The text format for journald: ``<N><LEVEL> <logger>: <message>``, each line of a
    record (a traceback's too) prefixed with its syslog priority, which journald reads
    (SyslogLevelPrefix=, on by default), so ``journalctl -p warning`` finds the failures;
    no time, which the journal records itself."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{SYSLOG_PRIORITY.get(record.levelname, 6)}>"
        text = super().format(record)
        if "\n" not in text:
            return prefix + text
        return "\n".join(prefix + line for line in text.splitlines())


def under_journald(stream: Any = None) -> bool:
    """True when ``stream`` (stderr) is the journal's stream: systemd sets JOURNAL_STREAM to
    its ``device:inode`` (systemd.exec(5))."""
    found = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = found.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        info = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (info.st_dev, info.st_ino) == (int(device), int(inode))


#: How long an INFO line may wait to be written with the lines after it.
FLUSH_AFTER_SECONDS = 0.01


class BatchedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler that writes lines in batches, from a thread of its own.

    The daemon logs two INFO lines a job; one write(2) each was ~30 % of a SQLite drain at
    thousands of jobs a second (more than all of its SQL on the event loop's thread). Here
    a line below WARNING waits at most FLUSH_AFTER_SECONDS: the first one wakes a writer
    thread, which sleeps that long and then writes every line waiting in one write: order
    kept, nothing dropped, whatever the logging thread does meanwhile (a blocked event
    loop, a loop that closed). A WARNING or worse is written at once, after the lines
    before it; so is everything on ``flush()`` (logging.shutdown at exit). A SIGKILL loses
    at most the last FLUSH_AFTER_SECONDS of INFO lines.
    """

    def __init__(self, stream: Any = None, delay: float = FLUSH_AFTER_SECONDS) -> None:
        super().__init__(stream)
        self._delay = delay
        self._pending: list[str] = []
        self._wanted = threading.Event()
        self._writer: threading.Thread | None = None
        _HANDLERS.add(self)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._pending.append(line)  # Handler.handle holds self.lock around emit
        if record.levelno >= logging.WARNING:
            self._write_pending()
        elif len(self._pending) == 1:
            if self._writer is None:
                self._writer = threading.Thread(target=self._run, name="log-writer", daemon=True)
                self._writer.start()
            self._wanted.set()

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            time.sleep(self._delay)
            with self.lock:  # type: ignore[union-attr]
                self._wanted.clear()
                self._write_pending()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write_pending()
            super().flush()

    def _write_pending(self) -> None:
        lines, self._pending = self._pending, []
        if not lines:
            return
        try:
            self.stream.write(self.terminator.join(lines) + self.terminator)
            self.stream.flush()
        except Exception:
            self.handleError(_lost(len(lines)))

    def _after_fork(self) -> None:
        # The parent writes what it had; the child starts empty, with no writer thread.
        self._pending = []
        self._wanted = threading.Event()
        self._writer = None


def _lost(count: int) -> logging.LogRecord:
    return logging.makeLogRecord(
        {"msg": f"{count} log line(s) could not be written", "levelname": "ERROR"}
    )


_HANDLERS: weakref.WeakSet[BatchedStreamHandler] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for handler in list(_HANDLERS):
        handler._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Configure the root logger once for a process."""
    handler = BatchedStreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    elif under_journald():
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(TextFormatter())
    # Neither format shows the caller's file and line, thread or process: skip collecting
    # them for every record (the logging HOWTO's "Optimization" list). The daemon logs two
    # lines per job; at thousands of jobs per second this is a few percent of a core.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("sqlalchemy").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
