"""Command line, engines in turn, JSON and markdown out."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app.services.notifications import FEED_LOCK_KEY
from bench import floors, report
from bench.procs import REPO, compile_bytecode
from bench.profiles import PROFILES
from bench.targets import DEFAULT_PG_URL, PostgresTarget, SQLiteTarget, Target
from bench.workloads import EngineBench

BENCH = REPO / "bench"
OUTPUTS = {
    "full": (BENCH / "results" / "latest.json", BENCH / "RESULTS.md"),
    "quick": (BENCH / "out" / "quick.json", BENCH / "out" / "RESULTS-quick.md"),
    "smoke": (BENCH / "out" / "smoke.json", BENCH / "out" / "RESULTS-smoke.md"),
}


def say(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument(
        "--engines", default="sqlite,postgres", help="comma-separated: sqlite, postgres"
    )
    parser.add_argument(
        "--pg-url",
        default=os.environ.get("BENCH_PG_URL", DEFAULT_PG_URL),
        help="a PostgreSQL server the run may create (and drop) databases on",
    )
    parser.add_argument("--json", type=Path, help="where the JSON goes (default per profile)")
    parser.add_argument("--markdown", type=Path, help="where the table goes (default per profile)")
    parser.add_argument("--label", help='a name for this run, e.g. "before" or "after: batching"')
    parser.add_argument("--baseline", type=Path, help="an earlier JSON: adds a Baseline column")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args(argv)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(args.engines) - set(report.ENGINES)
    if unknown or not args.engines:
        parser.error(f"unknown engines {sorted(unknown)}; use {', '.join(report.ENGINES)}")
    default_json, default_md = OUTPUTS[args.profile]
    args.json = args.json or default_json
    args.markdown = args.markdown or default_md
    return args


async def run(args: argparse.Namespace) -> int:
    if floors.FEED_LOCK_KEY != FEED_LOCK_KEY:
        raise SystemExit("bench/floors.py FEED_LOCK_KEY differs from the application's")
    profile = PROFILES[args.profile]
    if "postgres" in args.engines and not await PostgresTarget.reachable(args.pg_url):
        say(f"PostgreSQL at {args.pg_url} is not reachable (use --engines sqlite to skip it)")
        return 2
    started = time.monotonic()
    compile_bytecode()  # the daemons load bytecode, as a deployed (pip-installed) one does
    workdir = BENCH / "out" / f"run-{datetime.now(UTC):%Y%m%d-%H%M%S}-{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "label": args.label,
        "profile": profile.name,
        "date": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "code": report.code(),
        "machine": report.machine(),
        "versions": report.versions(),
        "sizes": dataclasses.asdict(profile),
        "engines": {},
    }
    say(f"bench: profile {profile.name}, engines {', '.join(args.engines)}; logs in {workdir}")
    for name in args.engines:
        target: Target = SQLiteTarget(workdir) if name == "sqlite" else PostgresTarget(args.pg_url)
        result["engines"][name] = await EngineBench(target, profile, workdir, say).run()
    result["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    result["duration_minutes"] = (time.monotonic() - started) / 60
    result["goals"] = report.evaluate(result)
    baseline = json.loads(args.baseline.read_text()) if args.baseline else None

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if args.label and profile.name == "full":
        slug = "-".join("".join(c if c.isalnum() else " " for c in args.label.lower()).split())
        labelled = args.json.with_name(f"{slug}.json")
        labelled.write_text(args.json.read_text())
        say(f"JSON also saved as {labelled}")
    report.write_markdown(args.markdown, report.markdown(result, baseline))
    failed = {n: e["errors"] for n, e in result["engines"].items() if "errors" in e}
    if not args.keep and not failed:
        shutil.rmtree(workdir, ignore_errors=True)
    for line in report.goals_table(result, baseline):
        say(line)
    say(f"JSON: {args.json}")
    say(f"markdown: {args.markdown}")
    say(f"done in {result['duration_minutes']:.1f} min")
    if failed:
        say(f"FAILED workloads: {failed} (logs kept in {workdir})")
        return 1
    return 0


async def run_until_signalled(args: argparse.Namespace) -> int:
    """``run``, cancelled by SIGINT or SIGTERM so that daemons are stopped and databases
    dropped on the way out (a background shell job ignores SIGINT: TERM works too)."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await run(args)
    except asyncio.CancelledError:
        say("interrupted: daemons stopped, databases dropped")
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    return asyncio.run(run_until_signalled(args))
