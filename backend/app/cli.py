"""The ``async-processor`` command. Exit codes: 0 success, 1 error, 2 usage or bad input."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import os
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from pydantic import TypeAdapter, ValidationError
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from rich.text import Text
from sqlalchemy.exc import SQLAlchemyError

from app import schema
from app.config import (
    MAX_SECONDS,
    QueueSpec,
    Settings,
    SettingsError,
    load_settings,
    parse_queues,
    unknown_settings,
)
from app.db import Database, login_refused
from app.models import PendingAnalysis, TaskStatus
from app.services import queue
from app.services.handlers import REGISTRY, HandlerImportError, import_handler_modules
from app.services.schedules import RESERVED_KEY_RULE, is_tick_key
from app.text import NUMBER, error_line, shown

R = TypeVar("R")
EXIT_ERROR = 1
EXIT_USAGE = 2
#: seconds the API's running requests get after SIGTERM before they are cancelled
API_SHUTDOWN_SECONDS = 10

cli = typer.Typer(
    name="async-processor",
    help="A background job processor that needs no broker.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
tasks_cli = typer.Typer(help="Inspect and repair tasks.", no_args_is_help=True)
cli.add_typer(tasks_cli, name="tasks")
queues_cli = typer.Typer(help="Pause and resume queues for every daemon.", no_args_is_help=True)
cli.add_typer(queues_cli, name="queues")
token_cli = typer.Typer(help="API tokens (stored as hashes only).", no_args_is_help=True)
cli.add_typer(token_cli, name="token")
# No console markup nor emoji codes: what is printed holds names, ids and payloads that
# users chose (a queue named "[/q]" was read as markup, and every command that showed it
# failed; "a:smile:" printed as an emoji); styles are given as Text styles instead.
# And no terminal control from what users chose either: a chapter_id or a handler's error
# holding ESC sequences cleared the operator's screen, set the window title or wrote the
# clipboard (OSC 52) through `tasks show`; every string printed is shown() first.


class _Console(Console):
    def render_str(self, text: str, **kwargs: Any) -> Text:
        return super().render_str(shown(text), **kwargs)


# Piped (| grep, | less, into a file), Rich would wrap and cut tables at 80 columns.
_PIPED_WIDTH = None if sys.stdout.isatty() or "COLUMNS" in os.environ else 10_000
out = _Console(markup=False, emoji=False, width=_PIPED_WIDTH)
err = _Console(stderr=True, soft_wrap=True, markup=False, emoji=False)


def _labelled(label: str, style: str, text: str) -> Text:
    return Text.assemble((label, style), " ", shown(text))


#: Ids are 64-bit: a larger number is bad input (exit 2), never a driver's overflow.
MAX_ID = 2**63 - 1
TASK_ID = typer.Argument(min=1, max=MAX_ID, help="Task id.")
#: api_tokens.id is a 32-bit INTEGER.
MAX_TOKEN_ID = 2**31 - 1


def _json_value(value: object) -> object:
    """``--json`` output's form of what JSON has no type for: times in ISO 8601 (with a
    "T", as ``tasks show --json`` writes them; ``str`` wrote a space), the rest as text."""
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    """Print ``message`` to stderr and exit with ``code``."""
    err.print(_labelled("error:", "bold red", message), highlight=False)
    raise typer.Exit(code)


def settings() -> Settings:
    """The settings, or exit 2 naming the bad variable. A variable with the settings'
    prefix that names none is reported (once), not fatal."""
    try:
        conf = load_settings()
    except SettingsError as exc:
        fail(str(exc), EXIT_USAGE)
    _warn_unknown_settings()
    return conf


@functools.cache
def _warn_unknown_settings() -> None:
    for message in unknown_settings():
        err.print(_labelled("warning:", "bold yellow", message), highlight=False)


def with_db(work: Callable[[Database], Awaitable[R]], *, check_schema: bool = True) -> R:
    """Run ``work`` against the configured database; database errors exit 1 with a message."""

    async def main() -> R:
        conf = settings()
        db = Database.from_url(conf.database_url, sqlite_synchronous=conf.sqlite_synchronous)
        try:
            if check_schema:
                await schema.check_migrated(db.engine)
            return await work(db)
        finally:
            await db.dispose()

    try:
        return asyncio.run(main())
    except schema.BadDatabaseURL as exc:
        fail(f"ASYNC_PROCESSOR_DATABASE_URL: {exc}", EXIT_USAGE)
    except schema.SchemaError as exc:
        if exc.__cause__ is not None and login_refused(exc.__cause__):
            fail(f"the database refused the login ({error_line(exc.__cause__)})", EXIT_USAGE)
        fail(str(exc))
    except SQLAlchemyError as exc:
        fail(f"database error: {exc.__class__.__name__}: {str(exc).splitlines()[0]}")
    except OSError as exc:
        fail(f"cannot reach the database: {exc}")


def load_handlers(conf: Settings) -> None:
    """Import HANDLER_MODULES so every registered kind is known."""
    try:
        import_handler_modules(conf.handler_modules)
    except HandlerImportError as exc:
        fail(str(exc), EXIT_USAGE if exc.bad_setting else EXIT_ERROR)


def parse_queue_option(spec: str | None) -> QueueSpec | None:
    """``--queues Q1,Q2=4`` → the parsed spec; exit 2 with the reason when malformed."""
    if spec is None:
        return None
    try:
        parsed = parse_queues(spec)
    except ValueError as exc:
        fail(f"--queues: {exc}", EXIT_USAGE)
    if not parsed:  # "" or ",": not a way to say "every queue" (leave the flag out)
        fail(
            f"--queues: {spec!r} names no queue; leave --queues out to serve every queue",
            EXIT_USAGE,
        )
    return parsed


@cli.command()
def migrate() -> None:
    """Create the database or upgrade it to the newest schema."""
    from alembic.util import CommandError

    url = settings().database_url
    try:
        schema.upgrade(url)
    except (SQLAlchemyError, OSError) as exc:
        fail(f"migration failed: {error_line(exc)}")
    except CommandError as exc:  # e.g. the database is at a revision this code lacks
        newer = "Can't locate revision" in str(exc)
        fail(f"migration failed: {exc}" + (f"; {schema.NEWER_HINT}" if newer else ""))
    except schema.URL_ERRORS as exc:
        fail(
            f"ASYNC_PROCESSOR_DATABASE_URL: the database URL cannot be used "
            f"({exc.__class__.__name__}: {exc})",
            EXIT_USAGE,
        )
    out.print(f"database at revision {schema.head_revision()}: {_safe_url(url)}")


@cli.command()
def processor(
    concurrency: Annotated[
        int | None, typer.Option(min=1, max=10_000, help="Jobs run at once.")
    ] = None,
    poll_interval: Annotated[
        float | None,
        typer.Option(min=0.001, max=MAX_SECONDS, help="Seconds between fallback polls."),
    ] = None,
    queues: Annotated[str | None, typer.Option(help="Q1,Q2=4: queues to serve.")] = None,
) -> None:
    """Run the daemon (same as python -m app.background_processor)."""
    from app import background_processor

    spec = parse_queue_option(queues)
    raise typer.Exit(
        background_processor.run(concurrency=concurrency, poll_interval=poll_interval, queues=spec)
    )


BULK_CHUNK = 1_000
SPEC_FIELDS = frozenset(f.name for f in dataclasses.fields(queue.TaskSpec) if f.init)


def build_spec(conf: Settings, item: dict[str, Any], where: str) -> queue.TaskSpec:
    """A validated TaskSpec from a dict (a --bulk line or the flags); exit 2 when bad."""
    unknown = set(item) - SPEC_FIELDS
    if unknown:
        fail(f"{where}: unknown field(s) {', '.join(sorted(unknown))}", EXIT_USAGE)
    kind = item.get("kind")
    if not isinstance(kind, str) or kind not in REGISTRY:
        known = ", ".join(REGISTRY.kinds()) or "none"
        fail(f"{where}: unknown kind {kind!r}; registered kinds: {known}", EXIT_USAGE)
    values = {
        "max_retries": conf.max_retries,
        "timeout_seconds": conf.processing_timeout,
        **{k: v for k, v in item.items() if v is not None},
    }
    for name, most in (
        ("max_retries", queue.USER_MAX_RETRIES),
        ("timeout_seconds", queue.USER_MAX_TIMEOUT_SECONDS),
    ):
        value = item.get(name)  # as given (the settings' defaults are the operator's)
        if type(value) is int and value > most:  # as the API; other types are TaskSpec's
            fail(f"{where}: {name} must be at most {most}, got {value}", EXIT_USAGE)
    key = item.get("idempotency_key")
    if isinstance(key, str) and is_tick_key(key):
        fail(f"{where}: {RESERVED_KEY_RULE}", EXIT_USAGE)
    if isinstance(values.get("scheduled_at"), str):
        values["scheduled_at"] = _iso_time(values["scheduled_at"], f"{where}: scheduled_at")
    try:
        spec = queue.TaskSpec(**values)
    except (queue.InvalidTaskError, TypeError, ValueError) as exc:
        fail(f"{where}: {exc}", EXIT_USAGE)
    size = queue.payload_size(spec.payload)
    if size > conf.max_payload_bytes:  # the API's 413
        fail(f"{where}: payload is {size} bytes; the limit is {conf.max_payload_bytes}", EXIT_USAGE)
    return spec


_TIME = TypeAdapter(datetime)


def _iso_time(text: str, what: str) -> datetime:
    """An ISO 8601 date-time read as the API reads it (pydantic), so the CLI and the API
    accept the same times; exit 2 with an example otherwise. (``datetime.fromisoformat``
    took week dates and basic forms the API refuses, and said why in Python's words.)"""
    try:
        if NUMBER.fullmatch(text.strip()):
            raise ValueError("a number")
        return _TIME.validate_python(text)
    except (ValueError, ValidationError):
        fail(
            f"{what} {text!r} is not an ISO 8601 date-time (for example"
            " 2030-01-01T09:00:00Z; without an offset it is read as UTC)",
            EXIT_USAGE,
        )


def read_payload(payload: str | None, payload_file: Path | None) -> dict[str, Any]:
    """--payload JSON (or - for stdin) or --payload-file PATH; exit 2 on bad JSON."""
    if payload is not None and payload_file is not None:
        fail("give --payload or --payload-file, not both", EXIT_USAGE)
    if payload_file is not None:
        try:
            text = payload_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            fail(f"--payload-file: {exc}", EXIT_USAGE)
    else:
        text = sys.stdin.read() if payload == "-" else (payload or "{}")
    try:
        data = json.loads(text)
    except ValueError as exc:  # JSONDecodeError, and an integer over Python's digit limit
        fail(f"the payload is not valid JSON: {exc}", EXIT_USAGE)
    except RecursionError:
        fail(f"the payload nests more than {queue.MAX_JSON_DEPTH} levels deep", EXIT_USAGE)
    if not isinstance(data, dict):
        fail("the payload must be a JSON object", EXIT_USAGE)
    return data


def read_bulk(conf: Settings, path: Path) -> list[queue.TaskSpec]:
    """Every line of a JSONL file as a TaskSpec; the first bad line stops everything."""
    try:
        lines = (sys.stdin if str(path) == "-" else path.open(encoding="utf-8")).read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"--bulk: {exc}", EXIT_USAGE)
    specs = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as exc:  # JSONDecodeError, and an integer over Python's digit limit
            fail(f"line {number}: not valid JSON: {exc}", EXIT_USAGE)
        except RecursionError:
            fail(f"line {number}: nests more than {queue.MAX_JSON_DEPTH} levels", EXIT_USAGE)
        if not isinstance(item, dict):
            fail(f"line {number}: must be a JSON object", EXIT_USAGE)
        specs.append(build_spec(conf, item, f"line {number}"))
    if not specs:
        fail("--bulk: the file holds no tasks", EXIT_USAGE)
    return specs


def write_bulk(specs: list[queue.TaskSpec]) -> tuple[int, int]:
    """Enqueue in chunks (one transaction each) with a progress bar; (created, existing)."""

    async def work(db: Database) -> tuple[int, int]:
        created = existing = 0
        with Progress(console=err, transient=True) as progress:
            bar = progress.add_task("enqueueing", total=len(specs))
            for start in range(0, len(specs), BULK_CHUNK):
                chunk = specs[start : start + BULK_CHUNK]
                async with db.write_transaction() as session:
                    results = await queue.enqueue_tasks(session, chunk)
                    others = await queue.held_by_others(session, chunk, results)
                    if others:
                        await session.rollback()
                        _key_conflict(chunk[others[0]], start + others[0], start)
                created += sum(r.created for r in results)
                existing += sum(not r.created for r in results)
                progress.advance(bar, len(chunk))
        return created, existing

    return with_db(work)


def _key_conflict(spec: queue.TaskSpec, index: int | None = None, kept: int = 0) -> NoReturn:
    """An idempotency key held by another user's task: bad input (the API's 409); the
    transaction that met it is rolled back (``kept``: tasks of earlier ones)."""
    where = "" if index is None else f"task {index + 1}: "
    done = "nothing was enqueued" if not kept else f"the first {kept} tasks were enqueued"
    fail(
        f"{where}idempotency key {spec.idempotency_key!r} is already used by another "
        f"user's task; {done}",
        EXIT_USAGE,
    )


@cli.command()
def enqueue(
    kind: Annotated[str | None, typer.Argument(help="The handler kind.")] = None,
    payload: Annotated[
        str | None, typer.Option(help="The payload, a JSON object; - reads it from stdin.")
    ] = None,
    payload_file: Annotated[Path | None, typer.Option(help="Read the payload from a file.")] = None,
    bulk: Annotated[
        Path | None, typer.Option(help="A JSONL file (- for stdin): one task object a line.")
    ] = None,
    priority: Annotated[int, typer.Option(min=1, max=10)] = queue.DEFAULT_PRIORITY,
    user: Annotated[str | None, typer.Option(help="user_id")] = None,
    project: Annotated[str | None, typer.Option(help="project_id")] = None,
    chapter: Annotated[str | None, typer.Option(help="chapter_id")] = None,
    queue_name: Annotated[str, typer.Option("--queue")] = queue.DEFAULT_QUEUE,
    max_retries: Annotated[int | None, typer.Option(min=0, max=queue.USER_MAX_RETRIES)] = None,
    timeout: Annotated[
        int | None, typer.Option(min=1, max=queue.USER_MAX_TIMEOUT_SECONDS, help="Seconds.")
    ] = None,
    idempotency_key: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Enqueue one task and print its id, or many with --bulk."""
    conf = settings()
    load_handlers(conf)
    if (kind is None) == (bulk is None):
        fail("give a KIND, or --bulk FILE.jsonl (not both)", EXIT_USAGE)
    if bulk is not None:
        created, existing = write_bulk(read_bulk(conf, bulk))
        print(f"enqueued {created} tasks ({existing} already existed by idempotency key)")
        return
    item = {
        "kind": kind,
        "payload": read_payload(payload, payload_file),
        "priority": priority,
        "queue": queue_name,
        "max_retries": max_retries,
        "timeout_seconds": timeout,
        "user_id": user,
        "project_id": project,
        "chapter_id": chapter,
        "idempotency_key": idempotency_key,
    }
    spec = build_spec(conf, item, "enqueue")

    async def work(db: Database) -> queue.EnqueuedTask:
        async with db.write_transaction() as session:
            results = await queue.enqueue_tasks(session, [spec])
            if await queue.held_by_others(session, [spec], results):
                await session.rollback()
                _key_conflict(spec)
        return results[0]

    result = with_db(work)
    if not result.created:  # stdout stays the id alone, for scripts
        print(
            f"task {result.id} already holds idempotency key {spec.idempotency_key!r}:"
            " nothing enqueued",
            file=sys.stderr,
        )
    print(result.id)


def _task_dict(task: Any) -> dict[str, Any]:
    """Every column of a task row; ``unreadable`` names the columns whose stored value could
    not be read (edited by hand; shown as null), when there are any."""
    values = {column.key: getattr(task, column.key) for column in PendingAnalysis.__table__.columns}
    shown = {k: v.isoformat() if hasattr(v, "isoformat") else v for k, v in values.items()}
    if getattr(task, "unreadable", None):
        shown["unreadable"] = list(task.unreadable)
    return shown


@tasks_cli.command("show")
def tasks_show(
    task_id: Annotated[int, TASK_ID], as_json: Annotated[bool, typer.Option("--json")] = False
) -> None:
    """Everything about one task."""

    async def work(db: Database) -> Any:
        async with db.read_transaction() as session:
            return (await queue.task_rows(session, [task_id]))[0]

    task = with_db(work)
    if task is None:
        fail(f"task {task_id} not found")
    data = _task_dict(task)
    if as_json:
        print(json.dumps(data, default=_json_value))
        return
    table = Table(show_header=False)
    for key, value in data.items():
        table.add_row(
            key,
            ""
            if value is None
            else json.dumps(value, default=_json_value)
            if isinstance(value, dict | list)
            else str(value),
        )
    out.print(table)


@tasks_cli.command("list")
def tasks_list(
    status: Annotated[TaskStatus | None, typer.Option()] = None,
    kind: Annotated[str | None, typer.Option()] = None,
    user: Annotated[str | None, typer.Option()] = None,
    chapter: Annotated[str | None, typer.Option()] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 50,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Newest tasks first."""

    async def work(db: Database) -> list[Any]:
        async with db.read_transaction() as session:
            return await queue.list_tasks(  # one more: whether there are more to say
                session, status=status, kind=kind, user_id=user, chapter_id=chapter, limit=limit + 1
            )

    rows = with_db(work)
    more = len(rows) > limit
    rows = rows[:limit]
    if as_json:
        print(json.dumps([_task_dict(t) for t in rows], default=_json_value))
        return
    if more:
        print(f"the newest {limit} shown; --limit N for more", file=sys.stderr)
    table = Table("id", "kind", "queue", "status", "pri", "attempts", "user", "created")
    for t in rows:
        created = t.created_at.isoformat(timespec="seconds") if t.created_at else "?"
        table.add_row(
            str(t.id),
            *(_shown(v) for v in (t.kind, t.queue, t.status, t.priority, t.attempts)),
            t.user_id or "",
            created,
        )
    out.print(table)


def _shown(value: Any) -> str:
    """A value for a table cell: "?" for one that could not be read (None here)."""
    return "?" if value is None else str(value)


@tasks_cli.command("retry")
def tasks_retry(
    task_ids: Annotated[
        list[int] | None, typer.Argument(min=1, max=MAX_ID, help="Task ids.")
    ] = None,
    status: Annotated[
        str | None, typer.Option(help="Retry every task in this status (failed or cancelled).")
    ] = None,
    kind: Annotated[str | None, typer.Option(help="With --status: only this kind.")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Put failed or cancelled tasks back to pending: by id, or all of a status (and kind)."""
    if bool(task_ids) == (status is not None):
        fail("give task ids, or --status failed|cancelled [--kind K]", EXIT_USAGE)
    if kind is not None and (status is None or not kind.strip()):
        # --kind "$KIND" with KIND unset retried every failed task of every kind
        fail("--kind needs --status and a kind's name (leave it out for every kind)", EXIT_USAGE)
    if status is not None:
        _retry_matching(status, kind, yes)
        return

    async def work(db: Database) -> list[queue.RetryOutcome]:
        async with db.write_transaction() as session:
            return [await queue.retry_task(session, i) for i in task_ids or []]

    _report(task_ids or [], with_db(work), ok=queue.RetryOutcome.RETRIED)


def _retry_matching(status: str, kind: str | None, yes: bool) -> None:
    async def count(db: Database) -> int:
        async with db.read_transaction() as session:
            return await queue.count_retryable(session, status=status, kind=kind)

    try:
        n = with_db(count)
    except queue.InvalidTaskError as exc:
        fail(str(exc), EXIT_USAGE)
    what = f"{n} {status} task(s)" + (f" of kind {kind!r}" if kind else "")
    if n == 0:
        print(f"no {status} tasks" + (f" of kind {kind!r}" if kind else ""))
        return
    if not yes:
        if not sys.stdin.isatty():
            fail(f"this would retry {what}; add --yes to confirm", EXIT_USAGE)
        typer.confirm(f"Retry {what}?", abort=True)

    async def work(db: Database) -> int:
        async with db.write_transaction() as session:
            return await queue.retry_tasks(session, status=status, kind=kind)

    print(f"retried {with_db(work)} task(s)")


@tasks_cli.command("cancel")
def tasks_cancel(task_ids: Annotated[list[int], TASK_ID]) -> None:
    """Cancel pending tasks at once; ask daemons to cancel running ones."""

    async def work(db: Database) -> list[queue.CancelOutcome]:
        async with db.write_transaction() as session:
            return [await queue.request_cancel(session, i) for i in task_ids]

    ok = (queue.CancelOutcome.CANCELLED, queue.CancelOutcome.REQUESTED)
    _report(task_ids, with_db(work), ok=ok)


def _report(ids: list[int], outcomes: list[Any], *, ok: object) -> None:
    accepted = ok if isinstance(ok, tuple) else (ok,)
    bad = 0
    for task_id, outcome in zip(ids, outcomes, strict=True):
        print(f"{task_id}: {outcome.value}")
        bad += outcome not in accepted
    if bad:
        raise typer.Exit(EXIT_ERROR)


def _short_time(iso: str | None) -> str:
    """An ISO time as ``2026-01-01 12:00:05`` (UTC), or ``-``."""
    return "-" if iso is None else datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M:%S")


@cli.command()
def status(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Counts per status and queue, the daemons, the periodic schedules, flow limits."""
    from app.services import stats
    from app.services.schedules import shown_schedules

    conf = settings()
    try:
        import_handler_modules(conf.handler_modules)
    except HandlerImportError as exc:
        err.print(_labelled("warning:", "yellow", f"schedules declared in code not shown: {exc}"))
    periodic = shown_schedules(REGISTRY, conf)

    async def work(db: Database) -> dict[str, Any]:
        summary = await stats.summary(db, lease_seconds=conf.lease_seconds)
        summary["schedules"] = await stats.schedule_overview(db, periodic)
        async with db.read_transaction() as session:
            summary["limits"] = await queue.flow_limits(session, conf.rate_limits, conf.key_limits)
        return summary

    summary = with_db(work)
    if as_json:
        print(json.dumps(summary, default=_json_value))
        return
    table = Table("queue", *stats.STATUS_ORDER, title="tasks")
    for name, counts in summary["queues"].items():
        table.add_row(name, *(str(counts.get(s, 0)) for s in stats.STATUS_ORDER))
    out.print(table)
    age = summary["oldest_pending_age_seconds"]
    paused_note = " (paused queues not counted)" if summary["paused_queues"] else ""
    out.print(f"oldest pending: {'-' if age is None else f'{age:.1f} s'}{paused_note}")
    if summary["paused_queues"]:
        out.print(_labelled("paused queues:", "bold yellow", ", ".join(summary["paused_queues"])))
    procs = Table(
        "processor",
        "state",
        "in flight",
        "concurrency",
        "queues",
        "processed",
        "failed",
        "last seen",
        title="processors",
    )
    for p in summary["processors"] + summary["silent_processors"]:
        silent = p in summary["silent_processors"]
        procs.add_row(
            p["id"],
            Text(f"silent {p['silent_seconds']:.0f} s", style="bold red") if silent else p["state"],
            str(p["in_flight"]),
            str(p["concurrency"]),
            shown(p["queues"]),
            str(p["processed"]),
            str(p["failed"]),
            str(p["last_seen_at"]),
        )
    out.print(procs)
    if summary["schedules"]:
        table = Table(
            "kind",
            "cron",
            "next tick",
            "last tick",
            "last task",
            "status",
            "enqueued",
            title="schedules",
        )
        for sch in summary["schedules"]:
            table.add_row(
                sch["kind"],
                sch["cron"],
                _short_time(sch["next_tick"]),
                _short_time(sch["last_tick"]),
                str(sch["last_task_id"] or "-"),
                sch["last_status"] or "-",
                str(sch["enqueued_total"]),
            )
        out.print(table)
    limits = summary["limits"]
    for rate in limits["rate_limits"]:
        out.print(
            f"rate limit {rate['kind']}: {rate['used']} of {rate['count']} starts "
            f"in the last {rate['per_seconds']:g} s"
        )
    for key in limits["key_limits"]:
        out.print(f"key limit {key['kind']}: at most {key['limit']} running per {key['column']}")


@queues_cli.command("list")
def queues_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Queues with live tasks or a pause switch: paused or not, pending and processing."""

    async def work(db: Database) -> list[dict[str, Any]]:
        async with db.read_transaction() as session:
            return await queue.queue_overview(session)

    rows = with_db(work)
    if as_json:
        print(json.dumps(rows, default=_json_value))
        return
    table = Table("queue", "state", "pending", "processing", "changed", "by", title="queues")
    for r in rows:
        state = Text("paused", style="bold yellow") if r["paused"] else Text("running")
        table.add_row(
            r["queue"],
            state,
            str(r["pending"]),
            str(r["processing"]),
            "" if r["changed_at"] is None else str(r["changed_at"]),
            r["changed_by"] or "",
        )
    out.print(table)


def _switch_queue(name: str, *, paused: bool) -> None:
    try:
        queue.check_queue_name(name)
    except queue.InvalidTaskError as exc:
        fail(str(exc), EXIT_USAGE)

    async def work(db: Database) -> None:
        async with db.write_transaction() as session:
            await queue.set_queue_paused(session, name, paused=paused, by="cli")

    with_db(work)
    if paused:
        out.print(f"queue {name} paused: no daemon claims from it; running jobs finish")
    else:
        out.print(f"queue {name} resumed")


@queues_cli.command("pause")
def queues_pause(name: str) -> None:
    """Pause a queue for every daemon at once (running jobs finish)."""
    _switch_queue(name, paused=True)


@queues_cli.command("resume")
def queues_resume(name: str) -> None:
    """Resume a paused queue; daemons are woken at once."""
    _switch_queue(name, paused=False)


@cli.command()
def prune(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only count what would go.")] = False,
) -> None:
    """Delete finished tasks, read notifications and stopped processors' rows past their
    retention."""
    from app.services import notifications
    from app.services.processor.pruner import Pruner

    conf = settings()
    if not dry_run:

        async def work(db: Database) -> Any:
            return await Pruner(
                db,
                retention_days=conf.retention_days,
                failed_retention_days=conf.failed_retention_days,
            ).run_once()

        result = with_db(work)
        print(
            f"pruned {result.tasks} tasks (with their notifications), "
            f"{result.notifications} other read notifications "
            f"and {result.processors} stopped processors"
        )
        return
    now = datetime.now(UTC)
    completed_before = now - timedelta(days=conf.retention_days)
    failed_before = now - timedelta(days=conf.failed_retention_days)

    async def count(db: Database) -> tuple[int, int, int]:
        async with db.read_transaction() as session:
            tasks = await queue.count_prunable(
                session, completed_before=completed_before, failed_before=failed_before
            )
            notes = await notifications.count_read_before(
                session,
                read_before=now - timedelta(days=conf.retention_days),
                sparing=queue.prunable(completed_before, failed_before),
            )
            daemons = await queue.count_prunable_processors(
                session, stopped_before=now - timedelta(days=conf.retention_days)
            )
        return tasks, notes, daemons

    tasks, notes, daemons = with_db(count)
    print(
        f"would prune {tasks} tasks (with their notifications), {notes} other read"
        f" notifications and {daemons} stopped processors"
    )


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def main() -> None:
    """Console-script entry point."""
    for arg in sys.argv[1:]:
        # The shell can pass any bytes; Python keeps the undecodable ones as surrogates,
        # which no database (nor the output) can take further down.
        if not arg.isascii() and not queue.is_unicode(arg):
            shown = repr(os.fsencode(arg))
            err.print(_labelled("error:", "bold red", f"argument {shown} is not valid UTF-8 text"))
            sys.exit(EXIT_USAGE)
    try:
        cli(standalone_mode=True)
    except KeyboardInterrupt:
        sys.exit(130)


@cli.command()
def api(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            max=64,
            help="API processes sharing the port (uvicorn's workers); one is bound by one core.",
        ),
    ] = 1,
) -> None:
    """Run the HTTP API (uvicorn)."""
    import uvicorn

    from app.api.main import create_app
    from app.api.server import GracefulServer
    from app.logs import setup_logging

    conf = settings()
    load_handlers(conf)

    async def check() -> None:
        db = Database.from_url(
            conf.database_url, pool_size=1, sqlite_synchronous=conf.sqlite_synchronous
        )
        try:
            await schema.check_migrated(db.engine)
        finally:
            await db.dispose()

    try:
        asyncio.run(check())
    except schema.BadDatabaseURL as exc:
        fail(f"cannot start: ASYNC_PROCESSOR_DATABASE_URL: {exc}", EXIT_USAGE)
    except schema.SchemaError as exc:
        if exc.__cause__ is None:
            fail(f"cannot start: {exc}")
        if login_refused(exc.__cause__):  # a setting to fix, as for the daemon: exit 2
            fail(
                f"cannot start: the database refused the login ({error_line(exc.__cause__)})",
                EXIT_USAGE,
            )
        err.print(f"warning: {exc}; starting anyway (/readyz answers 503 until it is reachable)")
    setup_logging(conf.log_level, conf.log_format)
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "log_config": None,
        "access_log": False,
        # No websocket routes: uvicorn's "auto" looked the websockets and wsproto packages
        # up at start (not installed here), a search that reaches the working directory.
        "ws": "none",
        # After SIGTERM, requests still running get this long, then are cancelled (the
        # unit's TimeoutStopSec is 30 s); notification streams end at once (main's
        # _tell_on_stop).
        "timeout_graceful_shutdown": API_SHUTDOWN_SECONDS,
    }
    try:
        if workers == 1:
            server = GracefulServer(uvicorn.Config(create_app(conf), **options))
            server.run()
            if not server.started:
                raise SystemExit(3)  # as uvicorn.run: it could not start
            return
        # Each worker is a new interpreter (spawned): it builds its own app from the
        # environment.
        uvicorn.run("app.api.main:worker_app", factory=True, workers=workers, **options)
    except SystemExit as exc:
        if exc.code in (0, None):
            raise
        # uvicorn exits 3 when it cannot start (address in use, a host that does not
        # resolve): its message is in the log above; the contract's code is 1.
        fail(f"the API could not start on {host}:{port} (see the message above)")


@token_cli.command("create")
def token_create(
    user: Annotated[str, typer.Option(help="The user the token acts as.")],
    admin: Annotated[
        bool, typer.Option("--admin", help="Sees and acts on every user's tasks.")
    ] = False,
    name: Annotated[str | None, typer.Option(help="A label, e.g. the client's name.")] = None,
    replace: Annotated[
        bool,
        typer.Option(
            "--replace",
            help="Revoke the user's other active tokens with this --name, in the same"
            " transaction (a rotation).",
        ),
    ] = False,
) -> None:
    """Create a token; the token is printed alone on the last line (shown only once)."""
    from app.services import auth

    if replace and not name:
        fail("--replace needs --name: it revokes the user's tokens with that name", EXIT_USAGE)

    async def work(db: Database) -> tuple[int, str, int]:
        async with db.write_transaction() as session:
            revoked = 0
            if replace and name:
                revoked = await auth.revoke_named(session, user_id=user, name=name)
            row, plain = await auth.create_token(session, user_id=user, is_admin=admin, name=name)
            return row.id, plain, revoked

    try:
        token_id, plain, revoked = with_db(work)
    except ValueError as exc:
        fail(str(exc), EXIT_USAGE)
    role = " (admin)" if admin else ""
    if revoked:
        print(f"revoked {revoked} earlier token(s) named {shown(name or '')}")
    print(f"token {token_id} for user {shown(user)}{role}; store it now, it is not shown again:")
    print(plain)


@token_cli.command("list")
def token_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Every token (never the token itself)."""
    from app.services import auth

    async def work(db: Database) -> list[dict[str, Any]]:
        async with db.read_transaction() as session:
            rows = await auth.list_tokens(session)
        return [
            {
                "id": r.id,
                "user_id": r.user_id,
                "is_admin": r.is_admin,
                "name": r.name,
                "created_at": r.created_at,
                "last_used_at": r.last_used_at,
                "revoked_at": r.revoked_at,
            }
            for r in rows
        ]

    rows = with_db(work)
    if as_json:
        print(json.dumps(rows, default=_json_value))
        return
    table = Table("id", "user", "admin", "name", "created", "last used", "revoked")
    for r in rows:
        table.add_row(*("" if v is None else str(v) for v in r.values()))
    out.print(table)


@token_cli.command("revoke")
def token_revoke(
    token_id: Annotated[int, typer.Argument(min=1, max=MAX_TOKEN_ID, help="Token id.")],
) -> None:
    """Revoke a token by id (see `token list`)."""
    from app.services import auth

    async def work(db: Database) -> bool:
        async with db.write_transaction() as session:
            return await auth.revoke_token(session, token_id)

    if not with_db(work):
        fail(f"token {token_id} not found or already revoked")
    print(f"token {token_id} revoked")


@cli.command()
def dev(
    host: Annotated[str, typer.Option(help="API host.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="API port.")] = 8000,
) -> None:
    """Migrate, then run the API and the daemon together until Ctrl-C (`make run`)."""
    from app import devserver

    raise typer.Exit(devserver.run(host=host, port=port))
