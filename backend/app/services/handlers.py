"""The handler registry, the context a handler runs with, and the errors it may raise.

```python
from app.services.handlers import handler, JobContext, PermanentError

@handler("chapter_analysis")
async def chapter_analysis(ctx: JobContext) -> dict:
    await ctx.progress(1, 3, "tokenizing")
    ctx.add_token_usage(120)
    return {"summary": "..."}
```
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import logging
import math
import os
import sys
import traceback
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from app.config import MAX_SECONDS
from app.cron import Cron, CronError
from app.text import is_showable, storable

ProgressSink = Callable[[int, int | None, str | None], Awaitable[None]]
HandlerFunc = Callable[["JobContext"], Any]


#: The largest token usage a task stores (its column is a 32-bit integer); totals saturate.
TOKEN_USAGE_MAX = 2**31 - 1


class PermanentError(Exception):
    """Raise from a handler to fail the job at once, without retries."""


#: Progress numbers are stored in 32-bit integer columns.
MAX_PROGRESS = 2**31 - 1
#: A longer progress message is cut (it is shown to the user in a notification).
MAX_PROGRESS_MESSAGE = 1_000


class Snooze(Exception):
    """Raise from a handler to run the job again after ``seconds``, without charging a retry."""

    def __init__(self, seconds: float) -> None:
        # At most 366 days (config.MAX_SECONDS): a date much further out overflowed the
        # database's timestamps, and the job failed for good instead of snoozing.
        if not (
            isinstance(seconds, int | float)
            and not isinstance(seconds, bool)
            and math.isfinite(seconds)
            and 0 <= seconds <= MAX_SECONDS
        ):
            raise ValueError(
                f"snooze seconds must be a finite number from 0 to {MAX_SECONDS:,} (366 days),"
                f" got {seconds!r}"
            )
        super().__init__(f"snoozed for {seconds} s")
        self.seconds = seconds


class JobStopped(BaseException):
    """Raised by ``ctx.progress_threadsafe`` in a plain ``def`` handler's thread once its
    job's run has ended without it (timed out, cancelled, the daemon shutting down, its
    lease lost). A thread cannot be killed, so a long handler should report progress or
    check ``ctx.stopped`` as it goes, and stop when told. It derives from BaseException,
    as KeyboardInterrupt does, so ``except Exception`` lets it pass: let it; clean up in
    ``finally``."""


class HandlerImportError(RuntimeError):
    """A module named in HANDLER_MODULES could not be imported. ``bad_setting``: the
    module itself does not exist (the setting is wrong, exit 2), as opposed to a module
    that exists and failed while importing (its code or what it imports: exit 1)."""

    def __init__(self, message: str, *, bad_setting: bool = False) -> None:
        super().__init__(message)
        self.bad_setting = bad_setting


class ScheduleError(ValueError):
    """A periodic schedule that cannot run: a bad cron expression, catch_up or kind."""


async def _discard_progress(current: int, total: int | None, message: str | None) -> None:
    return None


class JobContext:
    """What a handler knows about its job, and how it reports back.

    Attributes:
        task_id, kind, payload, attempt, queue, user_id, project_id, chapter_id: the job.
    """

    def __init__(
        self,
        *,
        task_id: int,
        kind: str,
        payload: dict[str, Any],
        attempt: int = 1,
        queue: str = "default",
        user_id: str | None = None,
        project_id: str | None = None,
        chapter_id: str | None = None,
        progress_sink: ProgressSink = _discard_progress,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.task_id = task_id
        self.kind = kind
        self.payload = payload
        self.attempt = attempt
        self.queue = queue
        self.user_id = user_id
        self.project_id = project_id
        self.chapter_id = chapter_id
        self._sink = progress_sink
        self._loop = loop
        self._token_usage = 0
        self._stopped = False

    @property
    def stopped(self) -> bool:
        """True once this run has ended without the handler (timed out, cancelled, shutdown,
        lease lost). A plain ``def`` handler looping over work can check it and return; its
        result would be discarded anyway."""
        return self._stopped

    def _stop(self) -> None:
        """The run has ended: the handler's further reports are refused."""
        self._stopped = True

    @property
    def token_usage(self) -> int:
        """Tokens recorded so far by ``add_token_usage``."""
        return self._token_usage

    def add_token_usage(self, tokens: int) -> None:
        """Add ``tokens`` to the job's token usage (stored when the job ends). The column is
        a 32-bit integer: a total beyond TOKEN_USAGE_MAX is stored as TOKEN_USAGE_MAX."""
        if type(tokens) is not int or tokens < 0:
            raise ValueError(f"tokens must be an integer >= 0, got {tokens!r}")
        self._token_usage = min(self._token_usage + tokens, TOKEN_USAGE_MAX)

    async def progress(
        self, current: int, total: int | None = None, message: str | None = None
    ) -> None:
        """Record progress on the job row (a notification goes out, throttled).

        Args:
            current: steps done.
            total: steps in all, when known.
            message: what is happening now, shown to the user.
        """
        for value in (current, total):
            if value is not None and (type(value) is not int or not 0 <= value <= MAX_PROGRESS):
                raise ValueError(
                    f"progress must be whole numbers from 0 to {MAX_PROGRESS:,},"
                    f" got {current!r}/{total!r}"
                )
        if message is not None:
            if not isinstance(message, str):
                raise ValueError(f"a progress message must be text, got {message!r}")
            if len(message) > MAX_PROGRESS_MESSAGE:
                message = message[:MAX_PROGRESS_MESSAGE] + "…"
            message = storable(message)  # PostgreSQL dropped one with a NUL, silently
        await self._sink(current, total, message)

    def progress_threadsafe(
        self, current: int, total: int | None = None, message: str | None = None
    ) -> None:
        """``progress`` for plain ``def`` handlers, which run in a thread; waits for it.
        Raises ``JobStopped`` once the run has ended (the thread should stop)."""
        if self._stopped:
            raise JobStopped(f"task {self.task_id}: its run has ended")
        if self._loop is None:
            raise RuntimeError("this context has no event loop to report progress to")
        if _loop_of_this_thread() is self._loop:  # waiting here would hold the loop for good
            raise RuntimeError(
                "progress_threadsafe() is for plain def handlers, which run in a thread; "
                "an async def handler awaits ctx.progress() instead"
            )
        future = asyncio.run_coroutine_threadsafe(
            self.progress(current, total, message), self._loop
        )
        future.result()


def _loop_of_this_thread() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


#: characters the settings that name kinds use as separators
_NOT_IN_KINDS = (",", "=", ";")


@dataclass(frozen=True, slots=True)
class Handler:
    """A registered handler: its kind, its function, and whether it is a coroutine."""

    kind: str
    func: HandlerFunc
    is_async: bool


@dataclass(frozen=True, slots=True)
class Schedule:
    """A periodic job: one task of ``kind`` per tick of ``cron`` (UTC), enqueued by the
    daemons' scheduler with ``payload``, ``priority`` and ``queue`` (defaults when None),
    ``max_retries`` and ``timeout_seconds`` (None: the MAX_RETRIES and PROCESSING_TIMEOUT
    settings, as for any task). ``catch_up``: how many missed ticks a daemon that was down
    enqueues, the latest ones (None: the ASYNC_PROCESSOR_SCHEDULE_CATCH_UP setting)."""

    kind: str
    cron: Cron
    payload: dict[str, Any] = field(default_factory=dict)
    priority: int | None = None
    queue: str | None = None
    catch_up: int | None = None
    max_retries: int | None = None
    timeout_seconds: int | None = None

    def __post_init__(self) -> None:
        if self.catch_up is not None and not (
            type(self.catch_up) is int and self.catch_up >= 1  # not 2.5, True or "3"
        ):
            raise ScheduleError(
                f"schedule of {self.kind!r}: catch_up must be a whole number >= 1,"
                f" got {self.catch_up!r}"
            )
        if not isinstance(self.payload, dict):
            raise ScheduleError(f"schedule of {self.kind!r}: payload must be a dict")


def _is_coroutine_function(func: object) -> bool:
    """An ``async def`` function, or a callable object whose ``__call__`` is one (taken for
    a plain function, it ran in a thread and returned an un-awaited coroutine)."""
    return inspect.iscoroutinefunction(func) or (
        not inspect.isfunction(func)
        and inspect.iscoroutinefunction(getattr(func, "__call__", None))  # noqa: B004
    )


class HandlerRegistry:
    """Kind → handler. One registry per process by default (``REGISTRY``)."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}
        self._schedules: dict[str, Schedule] = {}

    def register(self, kind: str, func: HandlerFunc) -> Handler:
        """Register ``func`` for ``kind``; registering a different function twice is an error."""
        if not isinstance(kind, str) or not 0 < len(kind) <= 100:
            raise ValueError(f"handler kind must be 1..100 characters, got {kind!r}")
        if not is_showable(kind):
            # A lone surrogate made every 422 naming the registered kinds, and the OpenAPI
            # document, a 500; a newline split the daemon's log lines.
            raise ValueError(
                f"handler kind must be printable text (no control, format or surrogate"
                f" characters), got {kind!r}"
            )
        if kind != kind.strip() or any(c in kind for c in _NOT_IN_KINDS):
            # The settings that name kinds (RATE_LIMITS, KEY_LIMITS, SCHEDULES, the
            # processor's kind filters) split on these and trim: such a kind ran but could
            # never be named there.
            raise ValueError(
                f"handler kind must not start or end with spaces nor hold any of"
                f" {' '.join(_NOT_IN_KINDS)}, got {kind!r}"
            )
        if not callable(func):
            raise TypeError(f"handler for kind {kind!r} must be callable, got {func!r}")
        existing = self._handlers.get(kind)
        if existing is not None and existing.func is not func:
            raise ValueError(f"a handler for kind {kind!r} is already registered ({existing.func})")
        entry = Handler(kind, func, _is_coroutine_function(func))
        self._handlers[kind] = entry
        return entry

    def get(self, kind: str) -> Handler | None:
        """The handler for ``kind``, or None."""
        return self._handlers.get(kind)

    def kinds(self) -> list[str]:
        """Every registered kind, sorted."""
        return sorted(self._handlers)

    def add_schedule(self, schedule: Schedule) -> None:
        """Declare ``schedule`` for its (registered) kind; one schedule per kind."""
        if schedule.kind not in self._handlers:
            raise ScheduleError(f"no handler is registered for kind {schedule.kind!r}")
        existing = self._schedules.get(schedule.kind)
        if existing is not None and existing != schedule:
            raise ScheduleError(f"kind {schedule.kind!r} already has a schedule ({existing})")
        self._schedules[schedule.kind] = schedule

    def schedules(self) -> list[Schedule]:
        """The schedules declared in code (``@handler(kind, cron=...)``), by kind."""
        return [self._schedules[kind] for kind in sorted(self._schedules)]

    def __contains__(self, kind: object) -> bool:
        return kind in self._handlers

    def __iter__(self) -> Iterator[Handler]:
        return iter(list(self._handlers.values()))


REGISTRY = HandlerRegistry()


def handler(
    kind: str,
    *,
    registry: HandlerRegistry | None = None,
    cron: str | None = None,
    payload: dict[str, Any] | None = None,
    priority: int | None = None,
    queue: str | None = None,
    catch_up: int | None = None,
    max_retries: int | None = None,
    timeout_seconds: int | None = None,
) -> Callable[[HandlerFunc], HandlerFunc]:
    """Decorator: register the function as the handler of ``kind``.

    Args:
        kind: the task kind this function handles.
        registry: where to register (the process-wide ``REGISTRY`` by default).
        cron: make it a periodic job: the daemons enqueue one task per tick of this cron
            expression, in UTC (``"*/5 * * * *"``; six fields for seconds; ``@daily``).
        payload, priority, queue, max_retries, timeout_seconds: of the scheduled tasks
            (with ``cron`` only; the last two default to the MAX_RETRIES and
            PROCESSING_TIMEOUT settings).
        catch_up: missed ticks enqueued after downtime, the latest ones (with ``cron``
            only; default the ASYNC_PROCESSOR_SCHEDULE_CATCH_UP setting, 1).

    Raises:
        ScheduleError: a bad cron expression or option, at import time.
    """
    schedule: Schedule | None = None
    if cron is not None:
        try:
            parsed = Cron.parse(cron)
        except CronError as exc:
            raise ScheduleError(f"schedule of handler {kind!r}: {exc}") from None
        schedule = Schedule(
            kind,
            parsed,
            dict(payload or {}),
            priority,
            queue,
            catch_up,
            max_retries,
            timeout_seconds,
        )
    elif (payload, priority, queue, catch_up, max_retries, timeout_seconds) != (None,) * 6:
        raise ScheduleError(
            f"handler {kind!r}: payload, priority, queue, catch_up, max_retries and"
            " timeout_seconds need cron="
        )

    def decorate(func: HandlerFunc) -> HandlerFunc:
        target = registry or REGISTRY
        target.register(kind, func)
        if schedule is not None:
            target.add_schedule(schedule)
        return func

    return decorate


def import_handler_modules(modules: Iterable[str]) -> None:
    """Import each module so its ``@handler`` decorators run; raise HandlerImportError naming
    the module and the cause when one fails. The loggers these processes report through
    (``app.*``, asyncio's, uvicorn's errors) are enabled again, with a warning, when
    importing a module disabled them (``logging.config.dictConfig``, whose
    ``disable_existing_loggers`` is true by default, disables every logger that exists and
    is not named), whether the import succeeded or not: the daemon's job lines, warnings
    and errors, and the report of the failed import itself, had vanished from its log.
    Other loggers a module disables (uvicorn's access log, say) stay as it left them."""
    modules = list(modules)
    _import_from_the_working_directory(modules)
    for name in modules:
        disabled = _disabled_loggers()
        try:
            importlib.import_module(name)
        except (Exception, SystemExit, KeyboardInterrupt) as exc:
            # SystemExit too: a module that calls sys.exit() as it is imported had ended
            # the daemon, the API and the CLI silently, with its code (0: "success").
            missing = getattr(exc, "name", None) if isinstance(exc, ModuleNotFoundError) else None
            frames = traceback.extract_tb(exc.__traceback__)
            where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
            raise HandlerImportError(
                f"cannot import handler module {name!r} (from HANDLER_MODULES): "
                f"{exc.__class__.__name__}: {exc}{where}",
                bad_setting=missing is not None and f"{name}.".startswith(f"{missing}."),
            ) from exc
        finally:
            _enable_loggers(name, _disabled_loggers() - disabled)


def _import_from_the_working_directory(modules: Iterable[str]) -> None:
    """Let handler modules be found in the folder the process started in, for every entry
    point alike: ``python -m app.background_processor`` puts it first on sys.path, the
    ``async-processor`` script (``processor``, ``api``, the CLI) did not, so the daemon's
    unit found a module there that the API's unit, or ``async-processor processor``
    ("the same as python -m …"), refused (from a newcomer's walk-through). Only when a
    module is not found otherwise (an installed one needs no such search, and a later
    import of a name installed nowhere must not run a file that happens to be there), and
    appended, so an installed package of the same name wins."""
    try:
        here = os.getcwd()
    except OSError:  # the folder was deleted under the process
        return
    if "" in sys.path or here in sys.path:
        return
    for name in modules:
        top = name.partition(".")[0]
        try:
            found = importlib.util.find_spec(top) is not None
        except (ImportError, ValueError):
            found = False
        there = os.path.isdir(os.path.join(here, top)) or os.path.isfile(
            os.path.join(here, f"{top}.py")
        )
        if not found and there:
            sys.path.append(here)
            return


#: The loggers the daemon, the API and the CLI report through: a handler module's logging
#: configuration may not silence them.
REPORTING_LOGGERS = ("asyncio", "uvicorn", "uvicorn.error")


def _reports(name: str) -> bool:
    return name == "app" or name.startswith("app.") or name in REPORTING_LOGGERS


def _disabled_loggers() -> set[str]:
    with logging._lock:  # type: ignore[attr-defined]  # a thread may be adding one
        items = list(logging.Logger.manager.loggerDict.items())
    return {
        name
        for name, item in items
        if isinstance(item, logging.Logger) and item.disabled and _reports(name)
    }


def _enable_loggers(module: str, names: set[str]) -> None:
    """Enable again the loggers that importing ``module`` disabled, and say so."""
    if not names:
        return
    for name in names:
        logging.getLogger(name).disabled = False
    shown = sorted(names)
    logging.getLogger(__name__).warning(
        "handler module %r disabled %d loggers as it was imported (%s%s; a"
        " logging.config.dictConfig disables every logger that exists and is not named in"
        " its config, unless given disable_existing_loggers=False): enabled again, else"
        " this program's own reports (job lines, warnings, errors) were lost",
        module,
        len(shown),
        ", ".join(shown[:8]),
        ", …" if len(shown) > 8 else "",
        extra={"action": "loggers_enabled"},
    )
