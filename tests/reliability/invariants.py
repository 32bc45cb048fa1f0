"""The invariant checker, run after every scenario. It returns violations instead of
asserting, so that a seeded-bug twin can assert that the right one is reported.

  terminal         every enqueued task ended (completed, failed or cancelled)
  unlocked         an ended task holds no lock or lease; completed ⇒ result set
  one_terminal     exactly one terminal notification per task, of the task's status
  attempts         attempts ≤ max_retries + 1
  final_run        a ledger task's stored result came from its final run: the result's
                   (attempt, pid) is the last start in the ledger, which also ended, and
                   the attempt is the row's
  integrity        SQLite: PRAGMA integrity_check = ok, no foreign key violations
  processors       daemons stopped cleanly are marked stopped; no processor row claims
                   to be running with a heartbeat older than the reaper allows
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import func, select

from app.db import Database, sqlite_path
from app.models import AnalysisNotification, PendingAnalysis, Processor
from app.models.types import utcnow
from tests.reliability.harness import Ledger
from tests.reliability.ledger import ASYNC_KIND, SYNC_KIND

TERMINAL = ("completed", "failed", "cancelled")
LEDGER_KINDS = (ASYNC_KIND, SYNC_KIND)


@dataclass(frozen=True)
class Violation:
    rule: str
    task_id: int | None
    detail: str

    def __str__(self) -> str:
        where = f"task {self.task_id}" if self.task_id is not None else "database"
        return f"[{self.rule}] {where}: {self.detail}"


def rules(violations: Collection[Violation]) -> Counter[str]:
    """How many violations of each rule."""
    return Counter(v.rule for v in violations)


def describe(violations: Collection[Violation], most: int = 15) -> str:
    lines = [str(v) for v in list(violations)[:most]]
    if len(violations) > most:
        lines.append(f"... and {len(violations) - most} more ({dict(rules(violations))})")
    return "\n".join(lines)


async def check(
    db: Database,
    *,
    ledger: Ledger | None,
    lease_seconds: float,
    stopped_pids: Collection[int] = (),
) -> list[Violation]:
    """Every invariant over the whole database (and the ledger, when there is one).
    ``stopped_pids``: daemons that exited after a graceful stop."""
    T = PendingAnalysis
    N = AnalysisNotification
    async with db.read_transaction() as s:
        tasks = (
            await s.execute(
                select(
                    T.id,
                    T.kind,
                    T.status,
                    T.result,
                    T.locked_by,
                    T.lease_expires_at,
                    T.attempts,
                    T.max_retries,
                )
            )
        ).all()
        notes = (
            await s.execute(
                select(N.task_id, N.type, func.count())
                .where(N.type.in_(TERMINAL))
                .group_by(N.task_id, N.type)
            )
        ).all()
        processors = (await s.execute(select(Processor))).scalars().all()
    violations: list[Violation] = []
    terminal_notes: dict[int, Counter[str]] = {}
    for task_id, type_, n in notes:
        terminal_notes.setdefault(task_id, Counter())[type_] += n
    runs = ledger.runs() if ledger is not None else {}
    for t in tasks:
        v = _task_violations(t, terminal_notes.get(t.id, Counter()), runs.get(t.id, []), ledger)
        violations.extend(v)
    violations.extend(_integrity(db))
    violations.extend(_processor_violations(processors, lease_seconds, stopped_pids))
    return violations


def _task_violations(t, notes: Counter[str], runs, ledger: Ledger | None) -> list[Violation]:  # type: ignore[no-untyped-def]
    out: list[Violation] = []

    def bad(rule: str, detail: str) -> None:
        out.append(Violation(rule, t.id, detail))

    if t.status not in TERMINAL:
        bad("terminal", f"still {t.status} (attempts {t.attempts}, locked_by {t.locked_by})")
        return out
    if t.locked_by is not None or t.lease_expires_at is not None:
        bad("unlocked", f"{t.status} but locked_by={t.locked_by} lease={t.lease_expires_at}")
    if t.status == "completed" and t.result is None:
        bad("unlocked", "completed without a result")
    if notes != Counter({t.status: 1}):
        bad("one_terminal", f"{t.status} with terminal notifications {dict(notes)}")
    if t.attempts > t.max_retries + 1:
        bad("attempts", f"attempts {t.attempts} > max_retries {t.max_retries} + 1")
    if ledger is not None and t.kind in LEDGER_KINDS and t.status == "completed":
        starts = [e for e in runs if e.event == "start"]
        result = t.result if isinstance(t.result, dict) else {}
        got = (result.get("attempt"), result.get("pid"))
        last = (starts[-1].attempt, starts[-1].pid) if starts else None
        ended = any(e.event == "end" and (e.attempt, e.pid) == got for e in runs)
        if got != last or got[0] != t.attempts or not ended:
            bad(
                "final_run",
                f"result from (attempt, pid) {got}; final run {last}; row attempts "
                f"{t.attempts}; that run ended: {ended}",
            )
    return out


def _integrity(db: Database) -> list[Violation]:
    path = sqlite_path(db.engine.url)
    if path is None:
        return []
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as conn:
        integrity = [r[0] for r in conn.execute("PRAGMA integrity_check")]
        foreign = conn.execute("PRAGMA foreign_key_check").fetchall()
    out = []
    if integrity != ["ok"]:
        out.append(Violation("integrity", None, f"integrity_check: {integrity[:5]}"))
    if foreign:
        out.append(Violation("integrity", None, f"foreign_key_check: {foreign[:5]}"))
    return out


def _processor_violations(
    processors: Collection[Processor], lease_seconds: float, stopped_pids: Collection[int]
) -> list[Violation]:
    out = []
    # The reaper marks a daemon stopped once it missed 3 leases; it sweeps every half lease.
    oldest_allowed = utcnow() - timedelta(seconds=3.5 * lease_seconds + 2)
    for p in processors:
        if p.state == "stopped":
            continue
        if p.pid in stopped_pids:
            out.append(Violation("processors", None, f"{p.id} stopped cleanly but is {p.state}"))
        elif p.last_seen_at < oldest_allowed:
            out.append(
                Violation("processors", None, f"{p.id} {p.state}, last seen {p.last_seen_at}")
            )
    return out
