"""A handler module that configures logging as it is imported (disabling every logger that
exists, the daemon's among them) and then fails to import: the daemon's report of the
failure went to a disabled logger, and it exited 1 with nothing in its log."""

from __future__ import annotations

import logging.config

logging.config.dictConfig({"version": 1, "root": {"level": "INFO"}})

import no_such_dependency_of_the_logging_handlers  # noqa: E402, F401
