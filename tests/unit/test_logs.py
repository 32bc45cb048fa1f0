"""The daemon's log handler: lines of one moment written together, none lost or reordered."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from app.logs import FLUSH_AFTER_SECONDS, BatchedStreamHandler, TextFormatter


class Stream:
    """Records each write(2)-sized call the handler makes; ``fail`` makes writes raise."""

    def __init__(self) -> None:
        self.writes: list[str] = []
        self.fail = False
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        if self.fail:
            raise BlockingIOError("stderr is full")
        with self._lock:
            self.writes.append(text)

    def flush(self) -> None:
        pass

    def text(self) -> str:
        with self._lock:
            return "".join(self.writes)


def _logger(stream: Stream) -> logging.Logger:
    handler = BatchedStreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger(f"test-logs-{id(stream)}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


def _written(stream: Stream, expected: str, within: float = 2.0) -> bool:
    """Wait (blocking this thread, never yielding to an event loop) until ``expected``."""
    deadline = time.monotonic() + within
    while stream.text() != expected and time.monotonic() < deadline:
        time.sleep(0.001)
    return stream.text() == expected


def test_lines_logged_together_go_out_in_one_write_in_order() -> None:
    stream = Stream()
    log = _logger(stream)
    for n in range(5):
        log.info("job %d", n)
    assert _written(stream, "".join(f"INFO job {n}\n" for n in range(5)))
    assert len(stream.writes) == 1
    log.info("later")
    assert _written(stream, "".join(f"INFO job {n}\n" for n in range(5)) + "INFO later\n")
    assert len(stream.writes) == 2


def test_a_line_waits_at_most_about_the_flush_delay() -> None:
    stream = Stream()
    log = _logger(stream)
    started = time.monotonic()
    log.info("soon")
    assert _written(stream, "INFO soon\n")
    assert time.monotonic() - started >= FLUSH_AFTER_SECONDS * 0.9  # batched, not at once


def test_a_warning_is_written_at_once_after_the_lines_before_it() -> None:
    stream = Stream()
    log = _logger(stream)
    log.info("started")
    log.warning("trouble")
    assert stream.writes == ["INFO started\nWARNING trouble\n"]
    time.sleep(FLUSH_AFTER_SECONDS * 3)  # the writer wakes and finds nothing left
    assert stream.writes == ["INFO started\nWARNING trouble\n"]


def test_flush_writes_what_waits() -> None:
    """logging.shutdown() at exit flushes every handler: no line waits past the process."""
    stream = Stream()
    log = _logger(stream)
    log.info("last words")
    for handler in log.handlers:
        handler.flush()
    assert stream.writes == ["INFO last words\n"]


async def test_a_blocked_event_loop_does_not_hold_its_lines_back() -> None:
    """A handler that blocks the loop right after "started" was logged: the line is still
    written (a watchdog kill then loses nothing logged before)."""
    stream = Stream()
    log = _logger(stream)
    log.info("task 1: started")
    assert _written(stream, "INFO task 1: started\n")  # the loop never turned meanwhile


def test_lines_of_a_loop_that_closed_at_once_are_written() -> None:
    """Threads that run a short event loop of their own (asyncio.run in a sync handler)."""
    stream = Stream()
    log = _logger(stream)

    async def log_there(n: int) -> None:
        log.info("from loop %d", n)

    threads = [threading.Thread(target=asyncio.run, args=(log_there(n),)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    deadline = time.monotonic() + 2
    while stream.text().count("\n") < 20 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert sorted(stream.text().splitlines()) == sorted(f"INFO from loop {n}" for n in range(20))


def test_a_failed_write_is_reported_and_the_next_lines_still_go_out(
    capsys: pytest.CaptureFixture[str],
) -> None:
    stream = Stream()
    log = _logger(stream)
    stream.fail = True
    log.warning("lost")
    assert "1 log line(s) could not be written" in capsys.readouterr().err
    stream.fail = False
    log.info("after")
    assert _written(stream, "INFO after\n")


def test_a_failed_batch_says_how_many_lines_it_lost(capsys: pytest.CaptureFixture[str]) -> None:
    stream = Stream()
    log = _logger(stream)
    stream.fail = True
    log.info("one")
    log.warning("two")
    err = capsys.readouterr().err
    assert "--- Logging error ---" in err and "2 log line(s) could not be written" in err


def test_the_text_format_reuses_a_seconds_stamp_and_writes_what_logging_writes() -> None:
    plain = logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    cached = TextFormatter()
    base = 1_800_000_000.0  # within a second, across its end, the next, and back again
    for created in (base + 0.001, base + 0.5, base + 0.999, base + 1.0, base + 1.25, base + 0.75):
        record = logging.makeLogRecord({"name": "app.x", "levelname": "INFO", "msg": "m"})
        record.created, record.msecs = created, (created - int(created)) * 1000
        assert cached.format(record) == plain.format(record)
        assert cached.formatTime(record, "%H:%M") == plain.formatTime(record, "%H:%M")


def test_under_journald_each_line_carries_its_priority(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """systemd hands a unit's stderr to journald and says so in JOURNAL_STREAM
    (device:inode); lines then start with their syslog priority, which journald reads, so
    `journalctl -p warning` finds the failures (without it every line was "info")."""
    path = tmp_path / "stderr"
    code = (
        "import logging, sys\n"
        "from app.logs import setup_logging\n"
        "setup_logging('INFO', 'text')\n"
        "log = logging.getLogger('app.processor')\n"
        "log.info('task 1 (noop): started, attempt 1')\n"
        "log.warning('task 2 (fail): failed')\n"
        "try:\n"
        "    raise RuntimeError('boom')\n"
        "except RuntimeError:\n"
        "    log.exception('crashed')\n"
        "logging.shutdown()\n"
    )
    with path.open("wb") as err:
        info = os.fstat(err.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}
        subprocess.run([sys.executable, "-c", code], stderr=err, env=env, check=True)
    lines = path.read_text().splitlines()
    assert lines[:3] == [
        "<6>INFO app.processor: task 1 (noop): started, attempt 1",
        "<4>WARNING app.processor: task 2 (fail): failed",
        "<3>ERROR app.processor: crashed",
    ]
    assert lines[3] == "<3>Traceback (most recent call last):"
    assert all(line.startswith("<3>") for line in lines[3:])
    # another file than the journal's stream: the plain text format, with its time
    with path.open("wb") as err:
        env = {**os.environ, "JOURNAL_STREAM": "1:2"}
        subprocess.run([sys.executable, "-c", code], stderr=err, env=env, check=True)
    first = path.read_text().splitlines()[0]
    assert first.endswith(" INFO    app.processor: task 1 (noop): started, attempt 1")
    assert not first.startswith("<")
