"""The API's uvicorn server: a graceful stop on SIGTERM or SIGINT exits 0."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import uvicorn


class GracefulServer(uvicorn.Server):
    """uvicorn's server, except for its last step after a graceful stop. uvicorn raises the
    signal that stopped it again, for the handler that was there before it took over; with
    Python's default one the process then dies of the signal (exit 143 for SIGTERM), before
    the log's last lines ("Application shutdown complete") are written out. Here the stop
    ends as a return: the command exits 0 with its log flushed, as the daemon does. A
    signal before the server took over (while it starts) still acts as it always does."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            try:
                yield
            finally:
                captured = getattr(self, "_captured_signals", None)  # uvicorn >= 0.29
                if isinstance(captured, list):
                    captured.clear()
