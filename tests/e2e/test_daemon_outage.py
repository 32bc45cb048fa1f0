"""The daemon through a PostgreSQL outage: same process, outcomes written after, work resumes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from app import schema
from app.db import Database
from app.services import queue
from tests.e2e.daemon import Daemon
from tests.helpers import eventually, task_row
from tests.pgcluster import Cluster

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]


async def test_daemon_survives_an_outage_and_writes_outcomes_after(
    cluster: Cluster, tmp_path: Path
) -> None:
    url = cluster.url()
    await asyncio.to_thread(schema.upgrade, url)
    db = Database.from_url(url)
    try:
        async with db.write_transaction() as s:
            ids = [
                r.id
                for r in await queue.enqueue_tasks(
                    s, [{"kind": "sleep", "payload": {"seconds": 2}}] * 3
                )
            ]
        daemon = Daemon(url, tmp_path, lease_seconds="30", max_concurrent="3").start()
        try:
            await eventually(lambda: _all(db, ids, "processing"), within=20)
            await db.dispose()
            await asyncio.to_thread(cluster.stop)
            await asyncio.sleep(5)  # the jobs finish while the database is away
            assert daemon.proc is not None and daemon.proc.poll() is None
            await asyncio.to_thread(cluster.start)
            started = time.monotonic()
            await eventually(lambda: _all(db, ids, "completed"), within=30)
            assert time.monotonic() - started < 15
            async with db.write_transaction() as s:
                [late] = await queue.enqueue_tasks(s, [{"kind": "noop"}])
            await eventually(lambda: _all(db, [late.id], "completed"), within=15)
            log = daemon.log()
            assert "database error" in log and "reachable again" in log
            assert log.count("database error") < 60  # backed off, not a busy loop
            assert daemon.stop() == 0
        finally:
            daemon.kill()
    finally:
        await db.dispose()


async def _all(db: Database, ids: list[int], status: str) -> bool:
    try:
        rows = [await task_row(db, i) for i in ids]
    except Exception:
        return False
    return all(r.status == status for r in rows)
