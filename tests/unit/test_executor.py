"""The executor without a database: every way a handler can end."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import sys
import threading
import time
from datetime import UTC, datetime
from typing import Any

import pytest

from app.services.handlers import (
    TOKEN_USAGE_MAX,
    HandlerRegistry,
    JobContext,
    JobStopped,
    PermanentError,
    Snooze,
)
from app.services.processor.executor import Executor, OutcomeKind, StopReason
from app.services.queue import MAX_JSON_DEPTH, ClaimedTask

release = threading.Event()
SPIN_ENDS: list[str] = []


def make_task(kind: str, timeout: int = 5) -> ClaimedTask:
    now = datetime.now(UTC)
    return ClaimedTask(1, kind, "default", {"x": 1}, 5, 1, 0, 3, timeout, "u", None, None, now)


@pytest.fixture
def registry() -> HandlerRegistry:
    reg = HandlerRegistry()

    async def ok(ctx: JobContext) -> dict[str, Any]:
        ctx.add_token_usage(7)
        await ctx.progress(1, 1)
        return {"payload": ctx.payload}

    def sync_ok(ctx: JobContext) -> str:
        ctx.progress_threadsafe(1, 2, "half")
        return threading.current_thread().name

    async def hang(ctx: JobContext) -> None:
        await asyncio.sleep(3600)

    def sync_hang(ctx: JobContext) -> None:
        release.wait(10)

    def sync_spin(ctx: JobContext) -> None:
        n = 0
        try:
            while True:  # long work that reports as it goes
                n += 1
                if n % 1000 == 0:
                    time.sleep(0.001)
                    ctx.progress_threadsafe(n)
        except JobStopped:
            SPIN_ENDS.append("JobStopped")
            raise

    def sync_checks(ctx: JobContext) -> None:
        while not ctx.stopped:
            time.sleep(0.001)
        SPIN_ENDS.append("stopped")

    async def perm(ctx: JobContext) -> None:
        raise PermanentError("no text")

    async def boom(ctx: JobContext) -> None:
        raise ValueError("bad")

    async def snooze(ctx: JobContext) -> None:
        raise Snooze(30)

    async def not_json(ctx: JobContext) -> object:
        return {1, 2}

    async def lone_surrogate(ctx: JobContext) -> object:
        return {"text": "a \ud800 b"}

    async def emoji(ctx: JobContext) -> object:
        return {"text": "\U0001f600 \u00e9", "escaped": "\\ud800"}

    async def cancelled_elsewhere(ctx: JobContext) -> None:
        # what an HTTP client does when its own request future is cancelled under it
        future = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.01, future.cancel)
        await future

    async def exits(ctx: JobContext) -> None:
        sys.exit("usage: tool [options]")

    def sync_exits(ctx: JobContext) -> None:
        raise SystemExit(3)

    def sync_interrupted(ctx: JobContext) -> None:
        raise KeyboardInterrupt

    async def own_base(ctx: JobContext) -> None:
        raise OwnBase("mine")

    def sync_own_base(ctx: JobContext) -> None:
        raise OwnBase("mine too")

    async def bad_str(ctx: JobContext) -> None:
        raise BadStr

    async def str_not_text(ctx: JobContext) -> None:
        raise StrNotText

    async def str_interrupts(ctx: JobContext) -> None:
        raise StrInterrupts

    async def unstorable_text(ctx: JobContext) -> None:
        raise RuntimeError("connection reset \ud800 at \x00 here")

    async def huge_message(ctx: JobContext) -> None:
        raise RuntimeError("x" * 100_000)

    def sync_late_progress(ctx: JobContext) -> None:
        time.sleep(1.5)  # past its 1 s timeout: the thread is abandoned, and goes on
        ctx.progress_threadsafe(9, 9, "from the abandoned thread")

    async def huge_tokens(ctx: JobContext) -> None:
        ctx.add_token_usage(10**30)
        ctx.add_token_usage(5)

    async def too_deep(ctx: JobContext) -> object:
        return nested(MAX_JSON_DEPTH + 1)

    async def deep_enough(ctx: JobContext) -> object:
        return nested(MAX_JSON_DEPTH)

    async def huge_int(ctx: JobContext) -> object:
        return 10**400

    async def huge_int_inside(ctx: JobContext) -> object:
        return {"n": 10**400}

    for name, func in list(locals().items()):
        if callable(func) and name != "reg":
            reg.register(name, func)
    return reg


class OwnBase(BaseException):
    """A library's exception that derives from BaseException, not Exception."""


class BadStr(Exception):
    def __str__(self) -> str:
        raise AttributeError("'NoneType' object has no attribute 'status'")


class StrInterrupts(Exception):
    def __str__(self) -> str:
        raise KeyboardInterrupt


class StrNotText(PermanentError):
    def __str__(self) -> Any:
        return None


def nested(levels: int) -> object:
    """``levels`` objects and arrays, one inside the other."""
    value: object = 1
    for i in range(levels):
        value = {"a": value} if i % 2 else [value]
    return value


async def run(
    registry: HandlerRegistry, task: ClaimedTask, reason: StopReason | None = None
) -> Any:
    calls: list[tuple[int, int | None, str | None]] = []

    async def sink(current: int, total: int | None, message: str | None) -> None:
        calls.append((current, total, message))

    outcome = await Executor(registry).run(task, progress_sink=sink, stop_reason=lambda: reason)
    return outcome, calls


async def test_async_handler_completes(registry: HandlerRegistry) -> None:
    outcome, calls = await run(registry, make_task("ok"))
    assert (outcome.kind, outcome.result, outcome.token_usage) == (
        OutcomeKind.COMPLETED,
        {"payload": {"x": 1}},
        7,
    )
    assert calls == [(1, 1, None)]


async def test_sync_handler_runs_in_its_own_thread(registry: HandlerRegistry) -> None:
    outcome, calls = await run(registry, make_task("sync_ok"))
    assert outcome.kind is OutcomeKind.COMPLETED and outcome.result == "task-1"
    assert calls == [(1, 2, "half")]


async def test_timeouts_of_async_and_sync_handlers(registry: HandlerRegistry) -> None:
    executor = Executor(registry)
    for kind in ("hang", "sync_hang"):
        started = time.monotonic()
        outcome = await executor.run(
            make_task(kind, timeout=1), progress_sink=_noop, stop_reason=lambda: None
        )
        assert (outcome.kind, outcome.error, outcome.permanent) == (
            OutcomeKind.FAILED,
            "timed out after 1 s",
            False,
        )
        assert time.monotonic() - started < 3
    assert executor.abandoned_threads == 1
    release.set()
    for _ in range(100):
        if executor.abandoned_threads == 0:
            break
        await asyncio.sleep(0.01)
    assert executor.abandoned_threads == 0


async def _noop(current: int, total: int | None, message: str | None) -> None:
    return None


@pytest.mark.parametrize("kind", ["sync_spin", "sync_checks"])
@pytest.mark.parametrize("reason", [None, StopReason.CANCEL_REQUESTED])
async def test_a_stopped_sync_handler_is_told_in_its_thread(
    registry: HandlerRegistry,
    reason: StopReason | None,
    kind: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A thread cannot be killed (an exception forced into it can land inside a lock's
    acquire and leave the lock held: the daemon froze on the logging lock). It is told:
    its next progress report raises JobStopped, and ctx.stopped turns true, so a handler
    that reports or checks as it goes ends rather than running on beside the job's next
    run. Its JobStopped is nobody's to read and is not logged as an unretrieved error."""
    SPIN_ENDS.clear()
    executor = Executor(registry)
    run = asyncio.ensure_future(
        executor.run(
            make_task(kind, timeout=1 if reason is None else 30),
            progress_sink=_noop,
            stop_reason=lambda: reason,
        )
    )
    if reason is not None:
        await asyncio.sleep(0.2)
        run.cancel()  # what the engine does on a cancel request
    outcome = await run
    expected = OutcomeKind.FAILED if reason is None else OutcomeKind.CANCELLED
    assert outcome.kind is expected
    for _ in range(200):
        if executor.abandoned_threads == 0:
            break
        await asyncio.sleep(0.01)
    assert executor.abandoned_threads == 0
    assert SPIN_ENDS == (["JobStopped"] if kind == "sync_spin" else ["stopped"])
    gc.collect()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


def test_a_stopped_context_refuses_progress_from_a_thread() -> None:
    ctx = JobContext(task_id=7, kind="k", payload={})
    assert not ctx.stopped
    ctx._stop()
    assert ctx.stopped
    with pytest.raises(JobStopped, match="task 7: its run has ended"):
        ctx.progress_threadsafe(1, 2)


@pytest.mark.parametrize(
    ("kind", "expected", "error", "permanent"),
    [
        ("perm", OutcomeKind.FAILED, "PermanentError: no text", True),
        ("not_json", OutcomeKind.FAILED, "handler returned a value that is not JSON", True),
        ("lone_surrogate", OutcomeKind.FAILED, "handler returned a string that is not", True),
        ("missing", OutcomeKind.FAILED, "no handler registered for kind 'missing'", True),
        ("too_deep", OutcomeKind.FAILED, "handler returned a value that nests objects", True),
        ("huge_int", OutcomeKind.FAILED, "handler returned an integer outside the 64-bit", True),
        ("snooze", OutcomeKind.SNOOZED, None, False),
    ],
)
async def test_failures_and_snooze(
    registry: HandlerRegistry, kind: str, expected: OutcomeKind, error: str | None, permanent: bool
) -> None:
    outcome, _ = await run(registry, make_task(kind))
    assert outcome.kind is expected and outcome.permanent is permanent
    if error is None:
        assert outcome.snooze_seconds == 30
    else:
        assert outcome.error is not None and outcome.error.startswith(error)


async def test_exception_keeps_type_message_and_traceback(registry: HandlerRegistry) -> None:
    outcome, _ = await run(registry, make_task("boom"))
    assert outcome.kind is OutcomeKind.FAILED and not outcome.permanent
    assert outcome.error.startswith("ValueError: bad") and "Traceback" in outcome.error


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        (StopReason.CANCEL_REQUESTED, OutcomeKind.CANCELLED),
        (StopReason.SHUTDOWN, OutcomeKind.RELEASED),
        (StopReason.LEASE_LOST, OutcomeKind.LOST),
    ],
)
async def test_engine_stops_map_to_outcomes(
    registry: HandlerRegistry, reason: StopReason, expected: OutcomeKind
) -> None:
    executor = Executor(registry)
    job = asyncio.create_task(
        executor.run(make_task("hang"), progress_sink=_noop, stop_reason=lambda: reason)
    )
    await asyncio.sleep(0.05)
    job.cancel()
    outcome = await job
    assert outcome.kind is expected


async def test_a_result_with_text_outside_ascii_is_kept(registry: HandlerRegistry) -> None:
    outcome, _ = await run(registry, make_task("emoji"))
    assert outcome.kind is OutcomeKind.COMPLETED
    assert outcome.result == {"text": "\U0001f600 \u00e9", "escaped": "\\ud800"}


@pytest.mark.parametrize(
    ("kind", "error"),
    [
        ("cancelled_elsewhere", "CancelledError"),
        ("exits", "SystemExit: usage: tool [options]"),
        ("sync_exits", "SystemExit: 3"),
        ("sync_interrupted", "KeyboardInterrupt"),
    ],
)
async def test_base_exceptions_from_a_handler_are_its_failure(
    registry: HandlerRegistry, kind: str, error: str
) -> None:
    """A CancelledError nobody asked for (the job is not being stopped), sys.exit() or a
    KeyboardInterrupt from a handler end its job as a retryable failure: they neither leave
    the job without an outcome nor escape into the event loop (which would stop the
    daemon and run all of its jobs again)."""
    outcome, _ = await run(registry, make_task(kind))
    assert (outcome.kind, outcome.permanent) == (OutcomeKind.FAILED, False)
    assert outcome.error is not None and outcome.error.startswith(error)
    assert asyncio.current_task() is not None  # the caller's task goes on


async def test_a_cancelled_job_task_still_raises_when_nobody_stopped_it(
    registry: HandlerRegistry,
) -> None:
    """The engine tearing down cancels job tasks with no stop reason: that cancellation is
    not swallowed as a failure."""
    job = asyncio.create_task(run(registry, make_task("hang")))
    await asyncio.sleep(0.05)
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job


async def test_token_usage_saturates_and_takes_integers_only(registry: HandlerRegistry) -> None:
    outcome, _ = await run(registry, make_task("huge_tokens"))
    assert (outcome.kind, outcome.token_usage) == (OutcomeKind.COMPLETED, TOKEN_USAGE_MAX)
    ctx = JobContext(
        task_id=1,
        kind="k",
        payload={},
        attempt=1,
        queue="default",
        user_id=None,
        project_id=None,
        chapter_id=None,
        progress_sink=_noop,
        loop=asyncio.get_running_loop(),
    )
    for bad in (-1, True, 2.5, "3"):
        with pytest.raises(ValueError, match="tokens must be an integer >= 0"):
            ctx.add_token_usage(bad)  # type: ignore[arg-type]
    assert ctx.token_usage == 0


@pytest.mark.parametrize("kind", ["deep_enough", "huge_int_inside"])
async def test_results_at_the_limits_complete(registry: HandlerRegistry, kind: str) -> None:
    outcome, _ = await run(registry, make_task(kind))
    assert outcome.kind is OutcomeKind.COMPLETED


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (float("nan"), "Out of range float values are not JSON compliant"),
        ({1, 2}, "Object of type set is not JSON serializable"),
        ("cycle", "Circular reference detected"),
        ("deep", "it nests too deeply to encode"),
        ({"s": "a\x00b"}, "a NUL character"),
        ({"k\x00": 1}, "a NUL character"),
    ],
)
def test_a_result_that_is_not_json_says_why(value: object, error: str) -> None:
    """The result's encoder is built once (no cycle markers): a cycle still says so."""
    from app.services.processor.executor import _jsonable, _NotJSONError

    if value == "cycle":
        loop: list[object] = []
        loop.append(loop)
        value = loop
    elif value == "deep":
        deep: list[object] = []
        for _ in range(100_000):
            deep = [deep]
        value = deep
    with pytest.raises(_NotJSONError, match=error):
        _jsonable(value)
    assert _jsonable({"ok": [1, "é", None]}) == {"ok": [1, "é", None]}


@pytest.mark.parametrize(
    ("kind", "error", "permanent"),
    [
        ("own_base", "OwnBase: mine", False),
        ("sync_own_base", "OwnBase: mine too", False),
        ("bad_str", "BadStr: <str() of the exception failed: AttributeError>", False),
        ("str_not_text", "StrNotText: <str() of the exception failed: TypeError>", True),
        ("str_interrupts", "StrInterrupts: <str() of the exception failed: Keyboard", False),
    ],
)
async def test_whatever_a_handler_raises_ends_its_job(
    registry: HandlerRegistry, kind: str, error: str, permanent: bool
) -> None:
    """A BaseException subclass of a library's, or an exception whose str() fails, is the
    job's failure: before, the job's task ended with no outcome, and the job stayed
    processing, its lease renewed, for as long as the daemon lived."""
    outcome, _ = await run(registry, make_task(kind))
    assert (outcome.kind, outcome.permanent) == (OutcomeKind.FAILED, permanent)
    assert outcome.error is not None and outcome.error.startswith(error)
    assert "Traceback" in outcome.error or permanent


async def test_error_text_is_always_storable_and_bounded(registry: HandlerRegistry) -> None:
    """NUL and lone surrogates (which PostgreSQL, or UTF-8, cannot hold) become escapes; a
    huge message is cut (the traceback, too, keeps its last 8,000 characters)."""
    outcome, _ = await run(registry, make_task("unstorable_text"))
    assert outcome.error.startswith("RuntimeError: connection reset \\ud800 at \\x00 here")
    outcome.error.encode("utf-8")
    assert "\x00" not in outcome.error
    outcome, _ = await run(registry, make_task("huge_message"))
    assert outcome.error.startswith("RuntimeError: " + "x" * 8_000 + "… [92,000 more characters]")
    assert len(outcome.error) < 20_000


async def test_progress_after_the_run_ended_is_dropped(registry: HandlerRegistry) -> None:
    """A sync handler's thread abandoned at its timeout may still report progress: the run
    is over, so it is not written (after a manual retry, this daemon's next claim of the
    job has the same attempt number, and the fence alone would let it through)."""
    calls: list[tuple[int, int | None, str | None]] = []

    async def sink(current: int, total: int | None, message: str | None) -> None:
        calls.append((current, total, message))

    outcome = await Executor(registry).run(
        make_task("sync_late_progress", timeout=1), progress_sink=sink, stop_reason=lambda: None
    )
    assert outcome.kind is OutcomeKind.FAILED and outcome.error.startswith("timed out")
    await asyncio.sleep(1.0)  # the thread reports its progress meanwhile
    assert calls == []


@pytest.mark.parametrize("seconds", [-1, float("nan"), float("inf"), 1e12, 366 * 86400 + 1])
def test_a_snooze_needs_a_finite_delay(seconds: float) -> None:
    """Refused where it is raised: a NaN passed the old check (NaN < 0 is false), and a
    snooze of 1e12 s overflowed the timestamp; either way the job then failed for good, its
    retries unused, when the delay could not be written."""
    with pytest.raises(ValueError, match="finite number from 0 to 31,622,400"):
        Snooze(seconds)
    assert Snooze(366 * 86400).seconds == 366 * 86400


async def test_a_callable_object_with_an_async_call_is_an_async_handler() -> None:
    """Taken for a plain function, it ran in a thread and returned an un-awaited coroutine
    (the job failed with "not JSON: Object of type coroutine")."""

    class Handler:
        async def __call__(self, ctx: JobContext) -> dict[str, int]:
            await asyncio.sleep(0)
            return {"attempt": ctx.attempt}

    reg = HandlerRegistry()
    assert reg.register("obj", Handler()).is_async
    outcome = await Executor(reg).run(
        make_task("obj"), progress_sink=_noop, stop_reason=lambda: None
    )
    assert (outcome.kind, outcome.result) == (OutcomeKind.COMPLETED, {"attempt": 1})


async def test_progress_is_checked_and_made_storable_where_it_is_reported() -> None:
    """PostgreSQL refused a progress message with a NUL and the update was dropped (a
    warning in the daemon's log, a gap in the user's feed); numbers past the 32-bit
    columns, floats and bools failed the same way. The handler now hears of bad numbers
    at once, and any text is stored."""
    seen: list[tuple[int, int | None, str | None]] = []

    async def sink(current: int, total: int | None, message: str | None) -> None:
        seen.append((current, total, message))

    ctx = JobContext(task_id=1, kind="k", payload={}, progress_sink=sink)
    await ctx.progress(1, 2, "nul \x00 and \ud800 here")
    await ctx.progress(2, None, "x" * 5_000)
    await ctx.progress(2**31 - 1, 2**31 - 1)
    assert seen[0] == (1, 2, "nul \\x00 and \\ud800 here")
    assert seen[1][2] == "x" * 1_000 + "…"
    for bad in ((-1, 2), (1, -2), (2**31, None), (1, 2**31), (1.5, 2), (True, 2), (1, 2.0)):
        with pytest.raises(ValueError, match="whole numbers from 0 to 2,147,483,647"):
            await ctx.progress(*bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must be text"):
        await ctx.progress(1, 2, 42)  # type: ignore[arg-type]
    assert len(seen) == 3


@pytest.mark.parametrize(
    "kind", ["", "x" * 101, "a\nb", "tab\there", "nul\x00", "\ud800", "rtl\u202e", 7]
)
def test_a_kind_must_be_printable_text(kind: Any) -> None:
    """A kind with a lone surrogate made every 422 that names the registered kinds, and
    /openapi.json, a 500; a newline split the daemon's 'handlers:' log line."""
    registry = HandlerRegistry()
    with pytest.raises(ValueError, match="handler kind must be"):
        registry.register(kind, lambda ctx: None)
    registry.register("chapter analysis ü", lambda ctx: None)
    assert registry.kinds() == ["chapter analysis ü"]


async def test_a_row_that_could_not_be_read_fails_for_good_without_running(
    registry: HandlerRegistry,
) -> None:
    """A claimed row whose payload Python could not read (ClaimedTask.unreadable) fails at
    once, permanently, with the reason; its handler never runs."""
    task = dataclasses.replace(make_task("ok"), unreadable="the payload … is not readable JSON")
    outcome, calls = await run(registry, task)
    assert (outcome.kind, outcome.error, outcome.permanent) == (
        OutcomeKind.FAILED,
        "the payload … is not readable JSON",
        True,
    )
    assert calls == []


async def test_a_handlers_own_timeout_is_its_failure_not_the_jobs_timeout() -> None:
    """A TimeoutError of the handler's own (a wait_for of its own ran out) is a failure with
    its traceback, not reported as the job's timeout."""
    reg = HandlerRegistry()

    async def own_timeout(ctx: JobContext) -> None:
        await asyncio.wait_for(asyncio.sleep(10), 0.01)

    reg.register("own_timeout", own_timeout)
    outcome, _ = await run(reg, make_task("own_timeout", timeout=30))
    assert outcome.kind is OutcomeKind.FAILED and outcome.permanent is False
    assert outcome.error is not None and "timed out after" not in outcome.error
    assert outcome.error.startswith("TimeoutError") and "own_timeout" in outcome.error


async def test_progress_threadsafe_on_the_event_loop_says_to_await_progress() -> None:
    """Called from an async def handler it waited, on the loop's own thread, for the loop:
    the daemon froze for good (SIGTERM ignored). Now the job fails, saying what to call."""
    reg = HandlerRegistry()

    async def wrong_call(ctx: JobContext) -> None:
        ctx.progress_threadsafe(1, 2, "x")

    reg.register("wrong_call", wrong_call)
    outcome, calls = await asyncio.wait_for(run(reg, make_task("wrong_call")), 5)
    assert outcome.kind is OutcomeKind.FAILED and calls == []
    assert "an async def handler awaits ctx.progress() instead" in outcome.error


async def test_a_plain_def_handler_raising_stop_iteration_fails_at_once() -> None:
    """StopIteration (a next() on an empty iterator) out of a plain def handler: a future
    refuses it, and the job waited for its timeout, reported as a timeout."""
    reg = HandlerRegistry()

    def empty_next(ctx: JobContext) -> Any:
        return next(iter([]))

    reg.register("empty_next", empty_next)
    started = time.monotonic()
    outcome, _ = await run(reg, make_task("empty_next", timeout=30))
    assert time.monotonic() - started < 5
    assert outcome.kind is OutcomeKind.FAILED and outcome.error is not None
    assert outcome.error.startswith("RuntimeError: the handler raised StopIteration")


@pytest.mark.parametrize("kind", ["a,b", "a=b", "a;b", " lead", "trail "])
def test_a_kind_the_settings_cannot_name_is_refused(kind: str) -> None:
    """RATE_LIMITS, KEY_LIMITS, SCHEDULES and the kind filters split on these and trim."""
    with pytest.raises(ValueError, match="must not start or end with spaces"):
        HandlerRegistry().register(kind, lambda ctx: None)


def test_a_handler_must_be_callable() -> None:
    with pytest.raises(TypeError, match="must be callable"):
        HandlerRegistry().register("k", 42)  # type: ignore[arg-type]


def test_a_long_message_is_cut_in_the_traceback_too() -> None:
    """A 10 MB message filled the traceback's kept tail: the frames were lost."""
    from app.services.processor.executor import MAX_TRACEBACK_CHARS, describe

    def deep_helper() -> None:
        raise ValueError("E" * 10_000_000)

    try:
        deep_helper()
    except ValueError as exc:
        text = describe(exc, with_traceback=True)
    assert "deep_helper" in text and len(text) < 2 * MAX_TRACEBACK_CHARS + 1_000


async def test_a_job_claimed_with_a_cancel_request_is_cancelled_without_running(
    registry: HandlerRegistry,
) -> None:
    """A pending row flagged cancel_requested by hand is claimed like any other; its job ends
    cancelled at once and its handler never runs (it had run to the end first)."""
    task = dataclasses.replace(make_task("ok"), cancel_requested=True)
    outcome, calls = await run(registry, task)
    assert (outcome.kind, outcome.error) == (OutcomeKind.CANCELLED, "stopped: cancel_requested")
    assert calls == [] and outcome.ran is False  # its claim's `started` is taken back
