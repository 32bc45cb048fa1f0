"""Test-only fault injection for the reliability suite (tests/reliability, docs/reliability.md).

Two environment variables, read once at import. They are not settings: nothing documents
them to users, ``Settings`` ignores them, and production never sets them.

``ASYNC_PROCESSOR_FAULT_POINT=name[:n]``
    SIGKILL this process the n-th time (default: the first) the daemon reaches the named
    point, to prove that a death at that exact step loses and corrupts nothing. Points:
    after_claim_commit, before_handler, after_handler_before_complete, inside_complete_txn,
    after_complete_commit, inside_heartbeat_txn.

``ASYNC_PROCESSOR_SEEDED_BUG=bug[,bug]``
    Switch a safety mechanism off, so that a test can prove its scenario catches the bug:
    fence (writes about a job no longer check the lock holder and attempt),
    begin_immediate (SQLite write transactions start deferred), lease_renewal (the
    heartbeat pretends to renew leases), rescue (expired leases are never rescued).

When neither is set, ``fault_point`` is one comparison with None and ``seeded`` one lookup
in an empty set.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

FAULT_POINT_ENV = "ASYNC_PROCESSOR_FAULT_POINT"
SEEDED_BUG_ENV = "ASYNC_PROCESSOR_SEEDED_BUG"
POINTS = frozenset(
    {
        "after_claim_commit",
        "before_handler",
        "after_handler_before_complete",
        "inside_complete_txn",
        "after_complete_commit",
        "inside_heartbeat_txn",
    }
)
BUGS = frozenset({"fence", "begin_immediate", "lease_renewal", "rescue"})


def parse_point(value: str | None) -> tuple[str, int] | None:
    """``name[:n]`` → (name, n); None when unset. ValueError for an unknown point."""
    if not value:
        return None
    name, _, count = value.partition(":")
    if name not in POINTS:
        raise ValueError(f"{FAULT_POINT_ENV}: unknown point {name!r}; known: {sorted(POINTS)}")
    n = int(count) if count else 1
    if n < 1:
        raise ValueError(f"{FAULT_POINT_ENV}: the count must be >= 1, got {n}")
    return name, n


def parse_bugs(value: str | None) -> frozenset[str]:
    """``a,b`` → {a, b}. ValueError for an unknown bug."""
    bugs = frozenset(part.strip() for part in (value or "").split(",") if part.strip())
    if bugs - BUGS:
        raise ValueError(f"{SEEDED_BUG_ENV}: unknown {sorted(bugs - BUGS)}; known: {sorted(BUGS)}")
    return bugs


_POINT = parse_point(os.environ.get(FAULT_POINT_ENV))
_SEEDED = parse_bugs(os.environ.get(SEEDED_BUG_ENV))
_passes = 0


def fault_point(name: str) -> None:
    """Die here (SIGKILL, no clean-up of any kind) when the test asked for this point."""
    if _POINT is None:
        return
    _reached(name, *_POINT)


def _reached(name: str, armed: str, at_pass: int) -> None:
    global _passes
    if name != armed:
        return
    _passes += 1
    if _passes == at_pass:
        for handler in logging.getLogger().handlers:  # the lines logged before it, first
            handler.flush()
        sys.stderr.write(f"fault point {name} reached (pass {_passes}): SIGKILL\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def seeded(bug: str) -> bool:
    """True when the test switched ``bug``'s safety mechanism off."""
    return bug in _SEEDED


def warn_if_armed(log: logging.Logger) -> None:
    """Log, at start, that a test hook is set: in a deployment it would kill the process at
    a step or switch a safety mechanism (fencing, leases, rescue) off without a word."""
    if _POINT is not None:
        log.error(
            "TEST HOOK ARMED: %s=%s:%d (this process will SIGKILL itself there)",
            FAULT_POINT_ENV,
            *_POINT,
        )
    if _SEEDED:
        log.error(
            "TEST HOOK ARMED: %s=%s (safety mechanisms switched off; never in production)",
            SEEDED_BUG_ENV,
            ",".join(sorted(_SEEDED)),
        )
