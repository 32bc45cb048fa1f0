"""Run one handler under its timeout and turn whatever happens into an Outcome."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from app.services import faults
from app.services.handlers import (
    HandlerRegistry,
    JobContext,
    PermanentError,
    ProgressSink,
    Snooze,
)
from app.services.queue import (
    MAX_JSON_DEPTH,
    ClaimedTask,
    encode_payload,
    has_nul,
    is_unicode,
    nests_deeper_than,
)
from app.text import storable

logger = logging.getLogger("app.processor")
MAX_TRACEBACK_CHARS = 8_000
MAX_MESSAGE_CHARS = 8_000


class OutcomeKind(StrEnum):
    """How a run ended."""

    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"  # a user asked
    RELEASED = "released"  # shutdown: back to pending, not charged
    SNOOZED = "snoozed"  # the handler asked to run later, not charged
    LOST = "lost"  # the lease is gone: write nothing, the rescuer owns it now


class StopReason(StrEnum):
    """Why the engine cancelled a running job."""

    CANCEL_REQUESTED = "cancel_requested"
    SHUTDOWN = "shutdown"
    LEASE_LOST = "lease_lost"


REASON_TO_OUTCOME = {
    StopReason.CANCEL_REQUESTED: OutcomeKind.CANCELLED,
    StopReason.SHUTDOWN: OutcomeKind.RELEASED,
    StopReason.LEASE_LOST: OutcomeKind.LOST,
}


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of one run, for the completer to write."""

    task: ClaimedTask
    kind: OutcomeKind
    duration: float
    result: Any = None
    error: str | None = None
    permanent: bool = False
    token_usage: int = 0
    snooze_seconds: float = 0.0
    #: FAILED: the seconds before its retry, drawn once when the completer takes it (the
    #: write and the daemon's wake-up timer use the same figure)
    retry_delay: float | None = None
    #: False: its handler never ran (claimed, then handed back or cancelled before it
    #: started): the ``started`` notification its claim wrote is taken back with the write
    ran: bool = True


class Executor:
    """Runs handlers: async ones on the loop, plain ``def`` ones in their own thread."""

    def __init__(self, registry: HandlerRegistry) -> None:
        self._registry = registry
        self._abandoned = 0
        self._lock = threading.Lock()

    @property
    def abandoned_threads(self) -> int:
        """Sync handler threads still running after their job timed out or was stopped."""
        return self._abandoned

    async def run(
        self,
        task: ClaimedTask,
        *,
        progress_sink: ProgressSink,
        stop_reason: Callable[[], StopReason | None],
    ) -> Outcome:
        """Run ``task``'s handler and return its Outcome; never raises (except when the
        engine itself is being torn down). Progress the handler reports after its run ended
        is dropped (``_ClosingSink``)."""
        sink = _ClosingSink(progress_sink)
        ctx = JobContext(
            task_id=task.id,
            kind=task.kind,
            payload=task.payload,
            attempt=task.attempt,
            queue=task.queue,
            user_id=task.user_id,
            project_id=task.project_id,
            chapter_id=task.chapter_id,
            progress_sink=sink,
            loop=asyncio.get_running_loop(),
        )
        try:
            return await self._run(task, ctx, stop_reason)
        finally:
            sink.closed = True
            ctx._stop()

    async def _run(
        self,
        task: ClaimedTask,
        ctx: JobContext,
        stop_reason: Callable[[], StopReason | None],
    ) -> Outcome:
        start = time.monotonic()

        def outcome(kind: OutcomeKind, **kw: Any) -> Outcome:
            return Outcome(task, kind, time.monotonic() - start, token_usage=ctx.token_usage, **kw)

        if task.unreadable is not None:  # a hand-edited row: nothing to run it with
            return outcome(OutcomeKind.FAILED, error=task.unreadable, permanent=True)
        if task.cancel_requested:  # flagged while pending (by hand): never started
            asked = StopReason.CANCEL_REQUESTED
            return outcome(REASON_TO_OUTCOME[asked], error=f"stopped: {asked.value}", ran=False)
        entry = self._registry.get(task.kind)
        if entry is None:
            known = ", ".join(self._registry.kinds()) or "none"
            error = f"no handler registered for kind {task.kind!r} (known kinds: {known})"
            return outcome(OutcomeKind.FAILED, error=error, permanent=True)
        faults.fault_point("before_handler")
        deadline = asyncio.timeout(task.timeout_seconds)
        try:
            async with deadline:
                if entry.is_async:
                    value = await entry.func(ctx)
                else:
                    value = await self._in_thread(entry.func, ctx)
            return outcome(OutcomeKind.COMPLETED, result=_jsonable(value))
        except TimeoutError as exc:
            if not deadline.expired():  # the handler's own (a wait_for of its own ran out)
                return outcome(OutcomeKind.FAILED, error=describe(exc, with_traceback=True))
            error = f"timed out after {task.timeout_seconds} s"
            return outcome(OutcomeKind.FAILED, error=error)
        except asyncio.CancelledError as exc:
            reason = stop_reason()
            current = asyncio.current_task()
            if reason is None:
                if current is not None and current.cancelling():
                    raise  # this job's task is being cancelled: the engine is torn down
                # The handler's own CancelledError (it awaited something that another
                # party cancelled): nobody stops this job, so it is the handler's failure.
                # Re-raised it would end the job with no outcome, held and renewed forever.
                return outcome(OutcomeKind.FAILED, error=describe(exc, with_traceback=True))
            if current is not None:
                current.uncancel()
            return outcome(REASON_TO_OUTCOME[reason], error=f"stopped: {reason.value}")
        except Snooze as snooze:
            return outcome(OutcomeKind.SNOOZED, snooze_seconds=snooze.seconds)
        except PermanentError as exc:
            return outcome(OutcomeKind.FAILED, error=describe(exc), permanent=True)
        except _NotJSONError as exc:
            return outcome(OutcomeKind.FAILED, error=str(exc), permanent=True)
        except BaseException as exc:
            # Whatever else a handler raises is its failure: SystemExit and
            # KeyboardInterrupt (a library's sys.exit(), a sync handler's thread), which
            # escaping the job's task would stop the event loop, and any other
            # BaseException subclass, which would end the job's task with no outcome: held
            # and renewed forever.
            return outcome(OutcomeKind.FAILED, error=describe(exc, with_traceback=True))

    async def _in_thread(self, func: Callable[[JobContext], Any], ctx: JobContext) -> Any:
        # A fresh daemon thread per job: a hung handler can never starve a shared pool,
        # and cannot keep the process alive at exit.
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        state = {"abandoned": False, "running": True, "counted": False}

        def deliver(setter: Callable[[Any], None], value: Any) -> None:
            # An abandoned run's future is awaited by no one: an exception set on it was
            # logged as "Future exception was never retrieved" when it was collected.
            if not future.done() and not state["abandoned"]:
                setter(value)

        def target() -> None:
            try:
                try:
                    value = func(ctx)
                finally:
                    with self._lock:
                        state["running"] = False
            except StopIteration as exc:
                # A future refuses StopIteration ("interacts badly with generators"): the
                # job waited for its timeout, its error lost. Delivered as what it is.
                error = RuntimeError(f"the handler raised StopIteration: {exc!r}")
                error.__cause__ = exc
                loop.call_soon_threadsafe(deliver, future.set_exception, error)
            except BaseException as exc:
                loop.call_soon_threadsafe(deliver, future.set_exception, exc)
            else:
                loop.call_soon_threadsafe(deliver, future.set_result, value)
            finally:
                with self._lock:
                    if state["counted"]:
                        self._abandoned -= 1

        threading.Thread(target=target, name=f"task-{ctx.task_id}", daemon=True).start()
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            # A thread cannot be killed. An exception raised into it from outside
            # (PyThreadState_SetAsyncExc) can land between a lock's acquire and its try,
            # and the lock stays held: a handler stopped while it logged froze the daemon's
            # event loop on the logging lock. It is told instead: ctx.stopped is true, and
            # progress_threadsafe raises JobStopped (JobContext._stop, in run()).
            with self._lock:
                running = state["running"]
                state["abandoned"] = True
                state["counted"] = running
                if running:
                    self._abandoned += 1
            if running:
                logger.warning(
                    "task %s: sync handler thread abandoned (still running: a thread cannot"
                    " be killed; ctx.stopped is true and progress_threadsafe raises"
                    " JobStopped); it can no longer write anything",
                    ctx.task_id,
                    extra={
                        "action": "thread_abandoned",
                        "task_id": ctx.task_id,
                        "kind": ctx.kind,
                    },
                )
            raise


class _ClosingSink:
    """A run's progress sink, closed when the run ends: a sync handler's thread abandoned
    at a timeout or a stop runs on and may still report progress. The fence (this daemon,
    this attempt) refused that while the job was anyone else's, but a manual retry starts
    the attempts again, and this daemon's next claim of the job had the same attempt
    number: the old thread's progress was written into the new run's row and feed."""

    def __init__(self, sink: ProgressSink) -> None:
        self._sink = sink
        self.closed = False

    async def __call__(self, current: int, total: int | None, message: str | None) -> None:
        if not self.closed:
            await self._sink(current, total, message)


MIN_INT64, MAX_INT64 = -(2**63), 2**63 - 1


class _NotJSONError(Exception):
    pass


def _jsonable(value: Any) -> Any:
    try:
        try:
            text = encode_payload(value)  # json.dumps(value, allow_nan=False), built once
        except RecursionError:  # the encoder built once keeps no cycle markers: ask json
            text = json.dumps(value, allow_nan=False)  # "Circular reference detected"
    except (TypeError, ValueError) as exc:
        raise _NotJSONError(f"handler returned a value that is not JSON: {exc}") from None
    except RecursionError:
        raise _NotJSONError(
            "handler returned a value that is not JSON: it nests too deeply to encode"
        ) from None
    if "\\ud" in text and not is_unicode(value):
        raise _NotJSONError(
            "handler returned a string that is not valid Unicode (a lone surrogate, "
            "\\ud800-\\udfff), which cannot be stored"
        )
    if nests_deeper_than(value, MAX_JSON_DEPTH, text):
        raise _NotJSONError(
            f"handler returned a value that nests objects and arrays more than "
            f"{MAX_JSON_DEPTH} levels deep"
        )
    if "u0000" in text and has_nul(value):
        # PostgreSQL's jsonb refuses it (the write failed with its SQL in the job's error);
        # refused on SQLite too, so a handler behaves the same on both.
        raise _NotJSONError(
            "handler returned a value with a NUL character (\\u0000) in a string or key,"
            " which cannot be stored"
        )
    if type(value) is int and not MIN_INT64 <= value <= MAX_INT64:
        # Alone (not inside an object or array), SQLite's column would keep it as a
        # floating-point number: not the value returned.
        raise _NotJSONError(
            "handler returned an integer outside the 64-bit range on its own; "
            "return it inside an object, or as a string"
        )
    return value


def describe(exc: BaseException, *, with_traceback: bool = False) -> str:
    """A failure's error text: the exception's class and message (at most
    MAX_MESSAGE_CHARS), then its traceback's last MAX_TRACEBACK_CHARS; text every engine
    can store whatever the exception holds (see ``storable``)."""
    try:
        message = str(exc)
    except BaseException as failed:  # a __str__ that raises, or returns no string
        message = f"<str() of the exception failed: {failed.__class__.__name__}>"
    whole = message
    if len(message) > MAX_MESSAGE_CHARS:
        cut = len(message) - MAX_MESSAGE_CHARS
        message = f"{message[:MAX_MESSAGE_CHARS]}… [{cut:,} more characters]"
    head = f"{exc.__class__.__name__}: {message}" if message else exc.__class__.__name__
    if with_traceback:
        tb = "".join(traceback.format_exception(exc))  # its own str() failure is caught
        if whole is not message:  # its tail was the long message alone, the frames lost
            tb = tb.replace(whole, f"{whole[:200]}… [the message above]")
        head = f"{head}\n\n{tb[-MAX_TRACEBACK_CHARS:]}"
    return storable(head)
