"""`make bench-quick` runs end to end with a tiny N (the smoke profile), so the suite cannot
rot (speed is not asserted: these machines are noisy; `make bench` publishes the figures)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import pg

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SECTIONS = ("settings", "W1", "W2", "W3", "W4", "W5", "W6", "floors")


@pytest.mark.timeout(300)
def test_bench_smoke_profile_measures_every_workload(tmp_path: Path, pg_available: bool) -> None:
    engines = ["sqlite", "postgres"] if pg_available else ["sqlite"]
    out, md = tmp_path / "smoke.json", tmp_path / "smoke.md"
    args = [
        "--profile",
        "smoke",  # after the target's own --profile quick: the last one counts
        "--engines",
        ",".join(engines),
        "--pg-url",
        pg.admin_url(),
        "--json",
        str(out),
        "--markdown",
        str(md),
    ]
    proc = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "bench-quick",
            f"PY={sys.executable}",
            "BENCH_ARGS=" + " ".join(args),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    report = json.loads(out.read_text())
    assert set(report["engines"]) == set(engines)
    for name in engines:
        engine = report["engines"][name]
        assert "errors" not in engine, engine.get("errors")
        for section in SECTIONS:
            assert section in engine, f"{name}: {section} missing"
        assert engine["W2"]["jobs_per_second"] > 0
        assert engine["W3"]["samples"] == report["sizes"]["pickup_jobs"]
        # measured from just before the COMMIT was sent: no job can start before that
        assert engine["W3"]["measured_from"] == "commit sent"
        assert engine["W3"]["min_ms"] > 0, engine["W3"]
        assert engine["W3"]["commit"]["samples"] == report["sizes"]["pickup_jobs"]
        # the other durability setting, beside the default: SQLite FULL, PostgreSQL off
        other = engine["relaxed"]
        assert other["kind"] == ("stricter" if name == "sqlite" else "relaxed")
        assert other["W2_jobs_per_second"] > 0 and other["floor_drain"]["jobs_per_second"] > 0
        assert engine["W6"]["rss_mb"] > 0
        stack = [mb for _, mb in engine["W6"]["import_rss_mb"]]
        assert len(stack) == 7 and stack[-1] > stack[0] > 0
        ceiling = "sqlite3" if name == "sqlite" else "asyncpg"
        assert engine["floors"]["enqueue"][ceiling]["rows_made_here_per_second"] > 0
        assert engine["floors"]["drain"] and engine["floors"]["pickup"]
        assert (
            engine["W1"]["library_alone_writers"]["writers"] == report["sizes"]["enqueue_writers"]
        )
    measured = {(g["key"], g["engine"]) for g in report["goals"] if g["met"] is not None}
    assert {key for key, _ in measured} >= {
        "w1_single",
        "w1_alone",
        "w1_alone_writers",
        "w1_bulk",
        "w2_drain",
        "w3_p50",
        "w3_p95",
        "w4_sleep",
        "w5_claim",
        "w5_drain",
        "w6_rss",
        "w6_idle_cpu",
    }
    text = md.read_text()
    assert "<!-- bench:begin -->" in text and "| W2 |" in text
    assert "the engine's own ceiling" in text and "importing the daemon's stack" in text
    assert "synchronous=FULL" in text and "### Other durability settings" in text
