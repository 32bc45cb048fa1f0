"""The run's context (machine, versions, code), the goals of issue 7 with their floors, and
the markdown table."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.procs import REPO

ENGINES = ("sqlite", "postgres")
ENGINE_TITLES = {"sqlite": "SQLite", "postgres": "PostgreSQL"}
BEGIN = "<!-- bench:begin -->"
END = "<!-- bench:end -->"
LIBRARIES = (
    "async-processor",
    "sqlalchemy",
    "aiosqlite",
    "asyncpg",
    "fastapi",
    "uvicorn",
    "aiohttp",
    "pydantic",
)


# --- context -----------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """CPU model, cores, memory, kernel."""
    model = "unknown"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "ram_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }


def versions() -> dict[str, str]:
    """Python, SQLite and library versions (PostgreSQL's is in the engine settings)."""
    found = {"python": platform.python_version(), "sqlite": sqlite3.sqlite_version}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "-"
    return found


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def code() -> dict[str, Any]:
    """The commit benchmarked, and whether the daemon's code had uncommitted changes."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    changed = git("status", "--porcelain", "--", "backend", "migrations")
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "subject": _shorten(git("log", "-1", "--format=%s"), 70),
        "daemon_commit": git("log", "-1", "--format=%h", "--", "backend", "migrations"),
        "daemon_subject": _shorten(
            git("log", "-1", "--format=%s", "--", "backend", "migrations"), 70
        ),
        "uncommitted_changes": changed.splitlines(),
        "app_path": str(Path(sys.modules["app"].__file__ or "").parent),
    }


# --- goals -------------------------------------------------------------------------------------


def dig(data: Any, *path: str) -> Any:
    """data[p0][p1]… or None when any step is missing."""
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


Figure = Callable[[dict[str, Any]], float | None]
Floor = Callable[[dict[str, Any]], tuple[str, float | None]]


@dataclass(frozen=True, slots=True)
class Goal:
    """One line of the issue's goals: a figure, its floor, and the bar it must clear."""

    key: str
    workload: str
    title: str
    unit: str
    figure: Figure
    floor: Floor
    bar: dict[str, float]
    higher_is_better: bool
    on_ratio: bool = False  # the bar applies to figure/floor, not to the figure
    stretch: dict[str, float] | None = None


def _floor_driver(engine: dict[str, Any]) -> str:
    """The driver of the library's enqueue floors: the one its sessions use."""
    return "aiosqlite" if "aiosqlite" in (dig(engine, "floors", "drain") or {}) else "asyncpg"


def _daemon_driver(engine: dict[str, Any]) -> str:
    """The driver of the drain floors: the one the daemon writes through (on SQLite its
    write thread's ``sqlite3`` connection, not aiosqlite)."""
    return "sqlite3" if "sqlite3" in (dig(engine, "floors", "drain") or {}) else "asyncpg"


def _pickup_driver(engine: dict[str, Any]) -> str:
    return "sqlite3" if "sqlite3" in (dig(engine, "floors", "pickup") or {}) else "asyncpg"


def _alone_floor(engine: dict[str, Any], asyncpg_key: str) -> tuple[str, float | None]:
    """enqueue_task_alone's floor: PostgreSQL's bare autocommitted INSERT (as many writers);
    SQLite's bare sqlite3 BEGIN IMMEDIATE, INSERT, COMMIT on one connection (SQLite takes
    one writer at a time: more connections only wait for each other)."""
    if _floor_driver(engine) == "asyncpg":
        writers = dig(engine, "floors", "enqueue", "asyncpg", "writers")
        many = f", {writers} connections" if asyncpg_key.startswith("autocommit_w") else ""
        return (
            f"bare asyncpg autocommit insert{many}",
            dig(engine, "floors", "enqueue", "asyncpg", asyncpg_key),
        )
    return "bare sqlite3 insert", dig(engine, "floors", "enqueue", "sqlite3", "single_per_second")


def _claim(engine: dict[str, Any], where: str) -> float | None:
    measure = dig(engine, "W5", "claim_measure") or "statement"
    value = dig(engine, "W5", where, measure, "p50_ms")
    return float(value) if value is not None else None


GOALS = (
    Goal(
        "w2_drain",
        "W2",
        "drain {drain_jobs:,} pre-enqueued no-op jobs, concurrency {concurrency}",
        "jobs/s",
        lambda e: dig(e, "W2", "jobs_per_second"),
        lambda e: (
            f"bare {_daemon_driver(e)} loop",
            dig(e, "floors", "drain", _daemon_driver(e), "jobs_per_second"),
        ),
        {"sqlite": 5_000, "postgres": 6_000},
        True,
        stretch={"postgres": 12_000},
    ),
    Goal(
        "w3_p50",
        "W3",
        "pick-up latency p50 (enqueue COMMIT sent → handler start)",
        "ms",
        lambda e: dig(e, "W3", "p50_ms"),
        lambda e: (
            f"bare {_pickup_driver(e)} waker",
            dig(e, "floors", "pickup", _pickup_driver(e), "p50_ms"),
        ),
        {"sqlite": 2, "postgres": 2},
        False,
    ),
    Goal(
        "w3_p95",
        "W3",
        "pick-up latency p95",
        "ms",
        lambda e: dig(e, "W3", "p95_ms"),
        lambda e: (
            f"bare {_pickup_driver(e)} waker",
            dig(e, "floors", "pickup", _pickup_driver(e), "p95_ms"),
        ),
        {"sqlite": 5, "postgres": 5},
        False,
    ),
    Goal(
        "w1_alone",
        "W1",
        "single enqueue, library API, one transaction each: enqueue_task_alone, one writer",
        "jobs/s",
        lambda e: dig(e, "W1", "library_alone", "per_second"),
        lambda e: _alone_floor(e, "autocommit_per_second"),
        {"sqlite": 8_000, "postgres": 3_500},
        True,
    ),
    Goal(
        "w1_alone_writers",
        "W1",
        "single enqueue, library API, one transaction each: enqueue_task_alone,"
        " {enqueue_writers} writers at once",
        "jobs/s",
        lambda e: dig(e, "W1", "library_alone_writers", "per_second"),
        lambda e: _alone_floor(e, "autocommit_writers_per_second"),
        {"sqlite": 8_000, "postgres": 3_500},
        True,
    ),
    Goal(
        "w1_single",
        "W1",
        "single enqueue, library API, one transaction each: enqueue_task in a session, one writer",
        "jobs/s",
        lambda e: dig(e, "W1", "library_single", "per_second"),
        lambda e: (
            f"bare {_floor_driver(e)} insert",
            dig(e, "floors", "enqueue", _floor_driver(e), "single_per_second"),
        ),
        {"sqlite": 8_000, "postgres": 3_500},
        True,
    ),
    Goal(
        "w1_bulk",
        "W1",
        "bulk enqueue, library API, {bulk_size:,} per call",
        "jobs/s",
        lambda e: dig(e, "W1", "library_bulk", "per_second"),
        lambda e: (
            f"bare {_floor_driver(e)} executemany",
            dig(e, "floors", "enqueue", _floor_driver(e), "bulk_per_second"),
        ),
        {"sqlite": 100_000, "postgres": 70_000},
        True,
    ),
    Goal(
        "w4_sleep",
        "W4",
        "{sleep_jobs} jobs x {sleep_ms:.0f} ms sleep, concurrency {concurrency}"
        " (commit → last completion)",
        "s",
        lambda e: dig(e, "W4", "seconds"),
        lambda e: ("ideal: jobs x sleep / concurrency", dig(e, "W4", "ideal_seconds")),
        {"sqlite": 1.05, "postgres": 1.05},
        False,
    ),
    Goal(
        "w5_claim",
        "W5",
        "claim p50 with {finished_rows:,} finished rows vs 0",
        "ms",
        lambda e: _claim(e, "claim_history"),
        lambda e: ("same, 0 finished rows", _claim(e, "claim_empty")),
        {"sqlite": 1.10, "postgres": 1.10},
        False,
        on_ratio=True,
    ),
    Goal(
        "w5_drain",
        "W5",
        "W2 drain with {finished_rows:,} finished rows vs 0",
        "jobs/s",
        lambda e: dig(e, "W5", "drain_history_jobs_per_second"),
        lambda e: ("W2 median, 0 finished rows", dig(e, "W5", "drain_empty_jobs_per_second")),
        {"sqlite": 0.90, "postgres": 0.90},
        True,
        on_ratio=True,
    ),
    Goal(
        "w6_rss",
        "W6",
        "daemon RSS after W2",
        "MB",
        lambda e: dig(e, "W6", "rss_mb"),
        lambda e: (
            f"bare {_daemon_driver(e)} loop process",
            dig(e, "floors", "drain", _daemon_driver(e), "rss_mb"),
        ),
        {"sqlite": 45, "postgres": 45},
        False,
    ),
    Goal(
        "w6_idle_cpu",
        "W6",
        "idle daemon CPU",
        "% of a core",
        lambda e: dig(e, "W6", "idle_cpu_percent"),
        lambda e: ("-", None),
        {"sqlite": 1.0, "postgres": 1.0},
        False,
    ),
)


def evaluate(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every goal on every engine measured: figure, floor, ratio, met."""
    sizes = dict(report.get("sizes") or {})
    sizes["sleep_ms"] = 1000 * float(sizes.get("sleep_seconds", 0))
    rows = []
    for goal in GOALS:
        for engine_name, engine in report["engines"].items():
            figure = goal.figure(engine)
            floor_name, floor = goal.floor(engine)
            ratio = figure / floor if figure is not None and floor else None
            bar = goal.bar[engine_name]
            subject = ratio if goal.on_ratio else figure
            met: bool | None = None
            if subject is not None:
                met = subject >= bar if goal.higher_is_better else subject <= bar
            stretch = (goal.stretch or {}).get(engine_name)
            rows.append(
                {
                    "key": goal.key,
                    "workload": goal.workload,
                    "title": goal.title.format(**sizes) if sizes else goal.title,
                    "engine": engine_name,
                    "figure": figure,
                    "unit": goal.unit,
                    "floor": floor,
                    "floor_name": floor_name,
                    "ratio": ratio,
                    "bar": bar,
                    "bar_on": "ratio" if goal.on_ratio else "figure",
                    "direction": ">=" if goal.higher_is_better else "<=",
                    "stretch": stretch,
                    "stretch_met": (figure >= stretch) if stretch and figure else None,
                    "met": met,
                }
            )
    return rows


# --- markdown ------------------------------------------------------------------------------------


def fmt(value: Any, unit: str = "") -> str:
    """A number as a human reads it: thousands separators, sensible decimals."""
    if value is None:
        return "-"
    if not isinstance(value, int | float):
        return str(value)
    if abs(value) >= 1000:
        text = f"{value:,.0f}"
    elif abs(value) >= 100:
        text = f"{value:.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    elif abs(value) >= 1:
        text = f"{value:.2f}"
    else:
        text = f"{value:.3f}"
    return f"{text} {unit}".strip()


def fmt_beside(value: Any, bar: Any, unit: str = "") -> str:
    """``fmt(value)``, with more digits where it would read as the bar it misses or meets
    (1.0545 s beside a 1.05 s bar is "1.0545 s", not "1.05 s")."""
    text = fmt(value, unit)
    if (
        not isinstance(value, int | float)
        or not isinstance(bar, int | float)
        or value == bar
        or fmt(value) != fmt(bar)
    ):
        return text
    for digits in range(3, 12):
        if f"{value:.{digits}g}" != f"{bar:.{digits}g}":
            return f"{value:.{digits}g} {unit}".strip()
    return text


def _bar(row: dict[str, Any]) -> str:
    what = "ratio" if row["bar_on"] == "ratio" else row["unit"]
    text = f"{row['direction']} {fmt(row['bar'])} {what}".replace("  ", " ")
    if row["stretch"]:
        text += f" (stretch {fmt(row['stretch'])})"
    return text


def _met(row: dict[str, Any]) -> str:
    if row["met"] is None:
        return "not measured"
    text = "**met**" if row["met"] else "not met"
    if row["stretch_met"] is not None:
        text += ", stretch met" if row["stretch_met"] else ", stretch not met"
    return text


def goals_table(report: dict[str, Any], baseline: dict[str, Any] | None) -> list[str]:
    head = "| Workload | Goal | Engine | Figure | Floor | Ratio | Bar | Result |"
    sep = "|---|---|---|---:|---|---:|---|---|"
    if baseline is not None:
        head = head.replace("| Figure |", "| Baseline | Figure |")
        sep = sep.replace("|---:|---|---:|", "|---:|---:|---|---:|", 1)
    lines = [head, sep]
    before = {(r["key"], r["engine"]): r for r in (baseline or {}).get("goals", [])}
    for row in report["goals"]:
        floor = (
            f"{fmt(row['floor'], row['unit'])} ({row['floor_name']})"
            if row["floor"] is not None
            else "-"
        )
        ratio = "-"
        if row["ratio"] is not None:
            ratio = f"{row['ratio']:.2f}"
            if row["bar_on"] == "ratio" and ratio == f"{row['bar']:.2f}":
                ratio = fmt_beside(row["ratio"], row["bar"])
        cells = [
            row["workload"],
            row["title"],
            ENGINE_TITLES.get(row["engine"], row["engine"]),
        ]
        if baseline is not None:
            old = before.get((row["key"], row["engine"]))
            cells.append(fmt(old["figure"], row["unit"]) if old else "-")
        figure = row["figure"]
        if row["bar_on"] == "figure":
            shown = fmt_beside(figure, row["bar"], row["unit"])
        else:
            shown = fmt(figure, row["unit"])
        cells += [shown, floor, ratio, _bar(row), _met(row)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _runs(values: list[float] | None) -> str:
    return ", ".join(fmt(v) for v in values or [])


def _answers(codes: dict[str, int] | None) -> str:
    return ", ".join(f"{n} x {code}" for code, n in (codes or {}).items()) or "none"


def _latency_min(d: dict[str, Any] | None) -> str:
    if not d:
        return "-"
    return f"{_latency(d)}; {fmt(d['min_ms'], 'ms')}"


def _latency(d: dict[str, Any] | None) -> str:
    if not d:
        return "-"
    return f"{fmt(d['p50_ms'])} / {fmt(d['p95_ms'])} / {fmt(d['max_ms'])} ms"


def details_table(report: dict[str, Any]) -> list[str]:
    engines = list(report["engines"])
    lines = [
        "| Figure | " + " | ".join(ENGINE_TITLES.get(e, e) for e in engines) + " |",
        "|---|" + "---:|" * len(engines),
    ]

    def row(title: str, cell: Callable[[dict[str, Any]], str]) -> None:
        values = []
        for name in engines:
            try:
                values.append(cell(report["engines"][name]))
            except (KeyError, TypeError):
                values.append("-")
        lines.append(f"| {title} | " + " | ".join(values) + " |")

    row(
        "W1 single enqueue, library (p50 / p95 latency)",
        lambda e: (
            f"{fmt(e['W1']['library_single']['per_second'], '/s')} "
            f"({fmt(e['W1']['library_single']['p50_ms'])} / "
            f"{fmt(e['W1']['library_single']['p95_ms'])} ms)"
        ),
    )
    for key, title in (
        ("library_alone", "W1 single enqueue alone, one writer (p50 / p95 latency)"),
        ("library_alone_writers", "W1 single enqueue alone, writers at once (p50 / p95 latency)"),
    ):
        row(
            title,
            lambda e, key=key: (
                f"{fmt(e['W1'][key]['per_second'], '/s')} "
                f"({fmt(e['W1'][key]['p50_ms'])} / {fmt(e['W1'][key]['p95_ms'])} ms)"
            ),
        )
    row(
        "W1 bulk enqueue, library, 1,000 per call",
        lambda e: fmt(e["W1"]["library_bulk"]["per_second"], "/s"),
    )
    row(
        "W1 bulk: the engine's own ceiling (the same rows made by the database, 1,000 per "
        "transaction; no client)",
        lambda e: fmt(
            dig(e, "floors", "enqueue", _ceiling_driver(e), "rows_made_here_per_second"), "/s"
        ),
    )
    row(
        "W1 POST /tasks through uvicorn: 202s per second (clients; p50 / p95; other answers)",
        lambda e: (
            f"{fmt(e['W1']['http']['per_second'], 'req/s')} "
            f"({e['W1']['http']['clients']}; {fmt(e['W1']['http']['p50_ms'])} / "
            f"{fmt(e['W1']['http']['p95_ms'])} ms; "
            f"{_answers(e['W1']['http'].get('not_accepted'))})"
        ),
    )
    row(
        "W2 drain jobs/s, median (runs)",
        lambda e: f"{fmt(e['W2']['jobs_per_second'])} ({_runs(e['W2']['runs'])})",
    )
    row("W3 pick-up p50 / p95 / max, from the COMMIT sent", lambda e: _latency(e["W3"]))
    row(
        "W3 the same from the COMMIT's return (p50 / p95 / max; min)",
        lambda e: _latency_min(e["W3"].get("from_commit_returned")),
    )
    row(
        "W3 the enqueuer's COMMIT itself (p50 / p95 / max)",
        lambda e: _latency(e["W3"].get("commit")),
    )
    row(
        "W4 commit → last completion (first claim → last completion; ideal)",
        lambda e: (
            f"{fmt(e['W4']['seconds'], 's')} "
            f"({fmt(e['W4']['first_claim_to_last_completion'], 's')}; "
            f"{fmt(e['W4']['ideal_seconds'], 's')})"
        ),
    )
    row(
        "W5 claim statement p50 / p95 / max, empty",
        lambda e: _latency(e["W5"]["claim_empty"]["statement"]),
    )
    row(
        "W5 claim statement p50 / p95 / max, with history",
        lambda e: _latency(e["W5"]["claim_history"]["statement"]),
    )
    row(
        "W5 whole claim_tasks() call p50 / p95 / max, empty",
        lambda e: _latency(e["W5"]["claim_empty"]["claim_tasks_call"]),
    )
    row(
        "W5 whole claim_tasks() call p50 / p95 / max, with history",
        lambda e: _latency(e["W5"]["claim_history"]["claim_tasks_call"]),
    )
    row(
        "W5 floor claim statement p50 / p95 / max, empty → with history",
        lambda e: (
            f"{_latency(e['W5']['claim_empty']['floor_statement'])} → "
            f"{_latency(e['W5']['claim_history']['floor_statement'])}"
        ),
    )
    row(
        "W5 claim statement p50 / p95 / max with pending tasks due tomorrow at priority 10"
        " (how many; ratio to empty; the floor's)",
        lambda e: (
            f"{_latency(e['W5']['claim_later']['statement'])} "
            f"({fmt(e['W5']['later_rows'])}; {fmt(e['W5']['later_ratio'])}; "
            f"floor {_latency(e['W5']['claim_later']['floor_statement'])})"
        ),
    )
    row(
        "W5 finished rows (fill time)",
        lambda e: f"{fmt(e['W5']['finished_rows'])} ({fmt(e['W5']['fill_seconds'], 's')})",
    )
    row(
        "W5 drain with history, jobs/s, median (runs)",
        lambda e: (
            f"{fmt(e['W5']['drain_history_jobs_per_second'])} "
            f"({_runs(e['W5']['drain_history_runs'])})"
        ),
    )
    row(
        "W6 RSS after W2 (peak)",
        lambda e: f"{fmt(e['W6']['rss_mb'], 'MB')} ({fmt(e['W6']['peak_rss_mb'], 'MB')})",
    )
    row(
        "W6 RSS of a fresh process importing the daemon's stack, cumulative",
        lambda e: " → ".join(f"{label} {fmt(mb, 'MB')}" for label, mb in e["W6"]["import_rss_mb"]),
    )
    row(
        "W6 idle CPU over the idle window",
        lambda e: (
            f"{fmt(e['W6']['idle_cpu_percent'], '%')} over {fmt(e['W6']['idle_seconds'], 's')}"
        ),
    )
    for driver in ("sqlite3", "aiosqlite", "asyncpg"):
        enqueue_cell, drain_cell = _floor_cells(driver)
        row(f"floor {driver}: enqueue single / executemany", enqueue_cell)
        row(f"floor {driver}: drain jobs/s, median (runs; process RSS)", drain_cell)
    row(
        "floor asyncpg: autocommitted insert, one connection / writers at once",
        lambda e: (
            f"{fmt(e['floors']['enqueue']['asyncpg']['autocommit_per_second'], '/s')} / "
            f"{fmt(e['floors']['enqueue']['asyncpg']['autocommit_writers_per_second'], '/s')}"
        ),
    )
    row(
        "floor drain with larger batches (driver, batch): jobs/s",
        lambda e: (
            f"{fmt(e['floors']['drain_large_batch']['jobs_per_second'], '/s')} "
            f"({e['floors']['drain_large_batch']['driver']}, "
            f"{e['floors']['drain_large_batch']['batch']})"
        ),
    )
    for driver in ("sqlite3", "asyncpg"):
        row(f"floor {driver}: pick-up p50 / p95 / max", _pickup_cell(driver))
    return lines


Cell = Callable[[dict[str, Any]], str]


def _ceiling_driver(engine: dict[str, Any]) -> str:
    """The driver the engine-ceiling figure was measured with."""
    return "asyncpg" if _floor_driver(engine) == "asyncpg" else "sqlite3"


def _floor_cells(driver: str) -> tuple[Cell, Cell]:
    def enqueue(e: dict[str, Any]) -> str:
        f = e["floors"]["enqueue"][driver]
        return f"{fmt(f['single_per_second'], '/s')} / {fmt(f['bulk_per_second'], '/s')}"

    def drain(e: dict[str, Any]) -> str:
        f = e["floors"]["drain"][driver]
        return (
            f"{fmt(f['jobs_per_second'], '/s')} ({_runs(f.get('runs'))}; {fmt(f['rss_mb'], 'MB')})"
        )

    return enqueue, drain


def _pickup_cell(driver: str) -> Cell:
    def cell(e: dict[str, Any]) -> str:
        return _latency(e["floors"]["pickup"][driver])

    return cell


def relaxed_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    for name, engine in report["engines"].items():
        relaxed = engine.get("relaxed")
        if not relaxed:
            continue
        durable_w2 = dig(engine, "W2", "jobs_per_second")
        durable_w1 = dig(engine, "W1", "library_single", "per_second")
        drain_driver = relaxed.get("floor_drain_driver") or _daemon_driver(engine)
        single_driver = relaxed.get("floor_single_driver") or _floor_driver(engine)
        durable_floor = dig(engine, "floors", "drain", drain_driver, "jobs_per_second")
        durable_floor_single = dig(engine, "floors", "enqueue", single_driver, "single_per_second")
        kind = relaxed.get("kind", "relaxed")
        title = ENGINE_TITLES.get(name, name)
        lines += [
            f"{title}, {relaxed['setting']} — beside the default setting's figures:",
            "",
            f"| Figure | default | {kind} |",
            "|---|---:|---:|",
            f"| W1 single enqueue, library | {fmt(durable_w1, '/s')} | "
            f"{fmt(dig(relaxed, 'library_single', 'per_second'), '/s')} |",
            f"| floor single enqueue ({single_driver}) | {fmt(durable_floor_single, '/s')} | "
            f"{fmt(relaxed.get('floor_single_per_second'), '/s')} |",
            f"| W2 drain | {fmt(durable_w2, 'jobs/s')} | "
            f"{fmt(relaxed.get('W2_jobs_per_second'), 'jobs/s')} |",
            f"| floor drain ({drain_driver}) | {fmt(durable_floor, 'jobs/s')} | "
            f"{fmt(dig(relaxed, 'floor_drain', 'jobs_per_second'), 'jobs/s')} |",
            "",
        ]
    return lines


METHOD = """\
How each figure is measured (see `bench/workloads.py`):
- Every daemon figure comes from a separate `python -m app.background_processor` process
  (ready when it sends systemd's `READY=1`), default settings except
  `MAX_CONCURRENT=10` and `HANDLER_MODULES=bench.handlers`; it does the whole protocol:
  claim with lease, handler, result, notifications, heartbeat, fenced writes. `backend/`
  and `bench/` are byte-compiled before the run, as `pip install` does for a deployment.
- W1: enqueue through `app.services.queue.enqueue_task` / `enqueue_tasks` in a
  `app.db.Database` session, one transaction per call, no daemon running; and through
  `enqueue_task_alone` (a transaction of its own: PostgreSQL's one autocommitted statement,
  SQLite's bare connection), from one task and from several at once (a web application's
  concurrent requests; PostgreSQL commits their WAL flushes together); POST /tasks against
  `async-processor api` (uvicorn) with an aiohttp client pool on the same 2 cores (httpx's
  client cost more CPU a request than the API). The library figures and their bare-driver
  floors run in alternating rounds (three in the full profile), each on a fresh table; each
  figure is the median of its rounds (every round's figure is in the JSON).
- W2: jobs enqueued before the daemon starts; jobs/s = jobs ÷ (last `completed_at` - first
  `started_at`), read from the rows. Each round drains on an empty table, then with W5's
  finished history, then with each bare floor, back to back; figures are the rounds'
  medians. W6 is read from `/proc/<pid>` of the last round's W2 daemon: VmRSS right after
  the drain, utime+stime over the idle window. W3 follows on the same daemon (idle first,
  then one job per transaction `gap` apart; latency = the handler's `time.time()` - the
  enqueuer's `time.time()` just before its COMMIT was sent: an upper bound that includes
  the COMMIT, never flattering; the same from the COMMIT's return is kept in the JSON as
  `from_commit_returned`, with the COMMIT's own durations), then W4 (one bulk enqueue;
  COMMIT sent → last `completed_at`).
- W5: finished rows inserted in one `INSERT … SELECT` (completed an hour ago, inside
  retention); PostgreSQL gets `VACUUM ANALYZE` as autovacuum would; the claim is timed
  with the statements the daemon sends (PostgreSQL: the claim and its notifications in one
  statement, `queue._claim_alone_statement`; SQLite: `queue.claim_tasks`'s UPDATE and its
  notifications' INSERT), the statement at the driver (`hotpath.watch`) and the whole call,
  each in a transaction that is rolled back, in rounds alternating with the floor driver's
  claim; then that table is drained (above), vacuumed before each round on PostgreSQL.
  The same claim is timed on a third table: the drain's due jobs (priority 5) behind
  pending tasks of priority 10 scheduled a day ahead (`later_rows`), which a claim whose
  scan took the schedule as a filter, not a bound, read through every time.
- Floors (`bench/floors.py`): the daemon's SQL, sent as the daemon sends it, with bare
  drivers in a separate process — claim up to 10 in one `UPDATE … RETURNING` plus their
  `started` notifications, then one fenced `UPDATE … FROM` for the batch's results plus
  `completed` notifications (behind the feed's advisory lock on PostgreSQL). PostgreSQL:
  each of the two is ONE autocommitted statement (CTEs), one round trip, as the daemon's;
  SQLite: a batch's completion and the next claim share one transaction, as the daemon's
  completer does. W2 and W6 are set beside the driver the daemon writes through (SQLite:
  its write thread's `sqlite3`; aiosqlite's loop is listed too), W1 beside the library's
  (aiosqlite on SQLite). The pick-up floors wait on
  `PRAGMA data_version` every 1 ms (sqlite3) or LISTEN (asyncpg). Enqueue floors: one
  `INSERT … RETURNING` per transaction; `executemany` 1,000 per transaction; on
  PostgreSQL also one autocommitted `INSERT … RETURNING` a statement, from one connection
  and from as many as the library's writers. The engine's own bulk ceiling: the same rows
  made by the database itself in one `INSERT … SELECT` per 1,000 (a recursive CTE on
  SQLite, `generate_series` on PostgreSQL), on the floor's table right after it: no driver
  round trips, no client encoding, so no client can insert faster.
- W6's stack: a fresh `python` importing, one layer after another, what the daemon
  imports (asyncio, SQLAlchemy Core, its asyncio extension with the ORM, pydantic-settings,
  the driver, then the daemon's own modules); VmRSS after each layer.
- Ratio = figure ÷ floor: for throughput 1.0 means as fast as the bare loop, for times and
  memory 1.0 means as small. W5's bars apply to the ratio (history ÷ empty).
- Figures are noisy: 2 shared cores, other work running; drains are medians of rounds."""


def markdown(report: dict[str, Any], baseline: dict[str, Any] | None) -> str:
    """The generated block (between the markers) for RESULTS.md."""
    m, v, c = report["machine"], report["versions"], report["code"]
    settings = []
    for name, engine in report["engines"].items():
        s = engine.get("settings", {})
        if name == "sqlite":
            settings.append(
                f"SQLite journal_mode={s.get('journal_mode')}, "
                f"synchronous={s.get('synchronous')}, busy_timeout={s.get('busy_timeout_ms')} ms "
                "(read from the application's own connection; the floors set the same)"
            )
        else:
            settings.append(
                f"PostgreSQL {s.get('server_version')}: synchronous_commit="
                f"{s.get('synchronous_commit')}, fsync={s.get('fsync')}, "
                f"wal_level={s.get('wal_level')}, shared_buffers={s.get('shared_buffers')} "
                "(read from the server)"
            )
    dirty = c["uncommitted_changes"]
    code_line = (
        f"commit `{c['commit']}`; the daemon's code (backend/, migrations/) as of "
        f"`{c.get('daemon_commit')}` ({c.get('daemon_subject')})"
    )
    if dirty:
        code_line += f" plus uncommitted changes in {len(dirty)} file(s) under backend/"
    label = report.get("label") or "run"
    lines = [
        BEGIN,
        f"## {label}: {report['date']} (profile `{report['profile']}`, "
        f"{report['duration_minutes']:.1f} min)",
        "",
        f"- Code: {code_line}.",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, Linux "
        f"{m['kernel']}; load average {m['load_average_start']} at start, "
        f"{m.get('load_average_end')} at end (other work shares these cores).",
        f"- Versions: Python {v['python']}, SQLite {v['sqlite']}, "
        + ", ".join(f"{k} {v[k]}" for k in LIBRARIES)
        + ".",
        *[f"- {s}." for s in settings],
        "- Durability: PostgreSQL as the server is configured (above). SQLite in WAL with "
        "synchronous=NORMAL, the contract's setting: a commit survives any process's crash, "
        "but an OS crash or a power loss may roll back the last commits (SQLite's documented "
        "WAL trade-off). Other settings, when measured, are in their own tables beside "
        "these figures, never instead of them.",
        "",
        "### Goals (issue 7)",
        "",
        *goals_table(report, baseline),
        "",
        "### Every figure",
        "",
        *details_table(report),
        "",
    ]
    relaxed = relaxed_lines(report)
    if relaxed:
        lines += ["### Other durability settings", "", *relaxed]
    errors = {
        name: engine["errors"] for name, engine in report["engines"].items() if "errors" in engine
    }
    if errors:
        lines += ["### Errors", "", "```", str(errors), "```", ""]
    lines += ["### Method", "", METHOD, END]
    return "\n".join(lines) + "\n"


HEADER = """\
# Benchmark results

`make bench` (10-15 minutes on this shared machine) regenerates the block between the
markers below from a full run on this machine; `make bench-quick` writes
`bench/out/RESULTS-quick.md` instead. Text outside the markers (notes, before/after
history) is kept.

"""


def write_markdown(path: Path, block: str) -> None:
    """Replace the generated block of ``path`` (or create the file)."""
    if path.exists():
        text = path.read_text()
        if BEGIN in text and END in text:
            pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END) + "\n?", re.S)
            path.write_text(pattern.sub(lambda _: block, text, count=1))
            return
        path.write_text(text.rstrip() + "\n\n" + block)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + block)
