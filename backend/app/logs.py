"""Logging: human-readable lines by default, JSON lines with LOG_FORMAT=json."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

CONTEXT_FIELDS = ("action", "task_id", "kind", "processor_id")
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


#: How long a line logged on an event loop may wait to be written with the lines after it.
FLUSH_AFTER_SECONDS = 0.01


class BatchedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler that writes the lines of one event-loop iteration together.

    The daemon logs two INFO lines a job; one write(2) each was ~30 % of a SQLite drain at
    thousands of jobs a second (more than all of its SQL on the event loop's thread). Here
    a record logged while an event loop runs waits for that loop's next iteration (a
    ``call_soon``), and every line waiting then goes out in one write: order kept, nothing
    dropped, at most one iteration late. A WARNING or worse, and any record logged where no
    event loop runs, is written at once, after the lines before it. ``flush()`` (also at
    interpreter exit, logging.shutdown) writes whatever waits.
    """

    def __init__(self, stream: Any = None) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._scheduled: set[asyncio.AbstractEventLoop] = set()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._pending.append(line)  # Handler.handle holds self.lock around emit
        loop = None if record.levelno >= logging.WARNING else _running_loop()
        if loop is None:
            self._write(record)
        elif loop not in self._scheduled:
            self._scheduled.add(loop)
            loop.call_later(FLUSH_AFTER_SECONDS, self._flush_for, loop)

    def _flush_for(self, loop: asyncio.AbstractEventLoop) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._scheduled.discard(loop)
            self._write(None)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write(None)
            super().flush()

    def _write(self, record: logging.LogRecord | None) -> None:
        if not self._pending:
            return
        text = self.terminator.join(self._pending) + self.terminator
        self._pending.clear()
        try:
            self.stream.write(text)
            self.stream.flush()
        except Exception:
            if record is not None:
                self.handleError(record)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Configure the root logger once for a process."""
    handler = BatchedStreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
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
