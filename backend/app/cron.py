"""Cron expressions for periodic jobs, always evaluated in UTC (cronsim underneath).

Five fields (``minute hour day-of-month month day-of-week``, Debian cron's rules), or six
with a leading seconds field (``*/10 * * * * *``: every ten seconds), or one of the aliases
``@yearly @annually @monthly @weekly @daily @midnight @hourly``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from cronsim import CronSim, CronSimError

ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_SECOND = timedelta(seconds=1)
SYNTAX_HINT = (
    "use 5 fields (minute hour day-of-month month day-of-week), 6 with a leading seconds "
    "field, or one of " + ", ".join(ALIASES)
)


class CronError(ValueError):
    """Not a cron expression this library evaluates, or one that never fires."""


def _utc(moment: datetime) -> datetime:
    """Aware UTC (a naive datetime is taken as UTC)."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class Cron:
    """A parsed, validated cron expression. ``Cron.parse("*/5 * * * *")``."""

    expression: str  # as written (stripped)
    fields: str = field(repr=False)  # aliases resolved

    @classmethod
    def parse(cls, text: str) -> Cron:
        """Validate ``text``; CronError says what is wrong and what is accepted."""
        expression = " ".join(str(text).split())
        fields = ALIASES.get(expression.lower(), expression)
        if not expression:
            raise CronError(f"empty cron expression; {SYNTAX_HINT}")
        try:
            it = CronSim(fields, _EPOCH)
        except CronSimError as exc:
            raise CronError(
                f"{expression!r} is not a valid cron expression ({exc}); {SYNTAX_HINT}"
            ) from None
        try:
            next(it)
        except StopIteration:
            raise CronError(f"{expression!r} never fires") from None
        return cls(expression, fields)

    @property
    def has_seconds(self) -> bool:
        """True for six-field expressions (a seconds field first)."""
        return len(self.fields.split()) == 6

    def describe(self) -> str:
        """Plain English, e.g. "Every fifth minute"."""
        try:
            return CronSim(self.fields, _EPOCH).explain()
        except Exception:  # explain() is best effort (some forms are not described)
            return self.expression

    def next_after(self, moment: datetime) -> datetime | None:
        """The first tick strictly after ``moment`` (UTC), or None if there is none."""
        try:
            return next(CronSim(self.fields, _utc(moment)))
        except StopIteration:
            return None

    def latest_at_or_before(self, moment: datetime) -> datetime | None:
        """The last tick at or before ``moment`` (UTC), or None if there is none."""
        ticks = self.ticks_between(None, moment, limit=1)
        return ticks[0] if ticks else None

    def ticks_between(
        self, after: datetime | None, upto: datetime, *, limit: int
    ) -> list[datetime]:
        """Ticks in (``after``, ``upto``], newest first, at most ``limit`` of them. Walks
        back from ``upto``, so a long gap costs ``limit`` steps, not one per missed tick."""
        if limit <= 0:
            return []
        # Reverse iteration yields ticks strictly before its start; start one second past
        # ``upto`` (whole seconds) so a tick at ``upto`` itself counts.
        start = _utc(upto).replace(microsecond=0) + _SECOND
        floor = None if after is None else _utc(after)
        it = CronSim(self.fields, start, reverse=True)
        ticks: list[datetime] = []
        while len(ticks) < limit:
            try:
                tick = next(it)
            except StopIteration:
                break
            if floor is not None and tick <= floor:
                break
            ticks.append(tick)
        return ticks
