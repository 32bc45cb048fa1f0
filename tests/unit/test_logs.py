"""The daemon's log handler: lines of one moment written together, none lost or reordered."""

from __future__ import annotations

import asyncio
import logging

from app.logs import FLUSH_AFTER_SECONDS, BatchedStreamHandler


class Stream:
    """Records each write(2)-sized call the handler makes."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> None:
        self.writes.append(text)

    def flush(self) -> None:
        pass


def _logger(stream: Stream) -> logging.Logger:
    handler = BatchedStreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger(f"test-logs-{id(stream)}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


def test_outside_an_event_loop_each_line_is_written_at_once() -> None:
    stream = Stream()
    log = _logger(stream)
    log.info("one")
    log.info("two")
    assert stream.writes == ["INFO one\n", "INFO two\n"]


async def test_lines_logged_together_on_a_loop_go_out_in_one_write() -> None:
    stream = Stream()
    log = _logger(stream)
    for n in range(5):
        log.info("job %d", n)
    assert stream.writes == []  # waiting for the flush, at most FLUSH_AFTER_SECONDS
    await asyncio.sleep(FLUSH_AFTER_SECONDS * 3)
    assert stream.writes == ["".join(f"INFO job {n}\n" for n in range(5))]
    log.info("later")
    await asyncio.sleep(FLUSH_AFTER_SECONDS * 3)
    assert stream.writes[1:] == ["INFO later\n"]


async def test_a_warning_is_written_at_once_after_the_lines_before_it() -> None:
    stream = Stream()
    log = _logger(stream)
    log.info("started")
    log.warning("trouble")
    assert stream.writes == ["INFO started\nWARNING trouble\n"]
    await asyncio.sleep(FLUSH_AFTER_SECONDS * 3)  # the scheduled flush finds nothing left
    assert stream.writes == ["INFO started\nWARNING trouble\n"]


async def test_flush_writes_what_waits() -> None:
    """logging.shutdown() at exit flushes every handler: no line waits past the process."""
    stream = Stream()
    log = _logger(stream)
    log.info("last words")
    for handler in log.handlers:
        handler.flush()
    assert stream.writes == ["INFO last words\n"]


async def test_lines_from_another_thread_with_its_own_loop_are_written_too() -> None:
    """The daemon's SQLite write thread runs an event loop of its own."""
    stream = Stream()
    log = _logger(stream)

    def other_thread() -> None:
        async def log_there() -> None:
            log.info("from the write thread")
            await asyncio.sleep(FLUSH_AFTER_SECONDS * 3)

        asyncio.run(log_there())

    log.info("from the main loop")
    await asyncio.to_thread(other_thread)
    await asyncio.sleep(FLUSH_AFTER_SECONDS * 3)
    assert "".join(stream.writes) == "INFO from the main loop\nINFO from the write thread\n"
