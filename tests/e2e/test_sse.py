"""The notification stream (Server-Sent Events) against a real uvicorn process."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest

from app.db import Database
from app.services import auth, queue

pytestmark = [pytest.mark.e2e]


async def read_events(response: httpx.Response, n: int) -> list[tuple[int, dict[str, object]]]:
    events: list[tuple[int, dict[str, object]]] = []
    event_id = None
    async for line in response.aiter_lines():
        if line.startswith("id: "):
            event_id = int(line[4:])
        elif line.startswith("data: ") and event_id is not None:
            events.append((event_id, json.loads(line[6:])))
            if len(events) == n:
                break
    return events


async def test_stream_pushes_the_callers_notifications_and_resumes(
    db: Database, api_url: str
) -> None:
    async with db.write_transaction() as s:
        _, alice = await auth.create_token(s, user_id="alice")
        await queue.enqueue_tasks(
            s, [{"kind": "noop", "user_id": u} for u in ("alice", "bob", "alice")]
        )
    headers = {"Authorization": f"Bearer {alice}"}
    url = f"{api_url}/api/async-analysis/notifications/stream"
    async with httpx.AsyncClient(timeout=20) as client:
        async with client.stream("GET", url, headers=headers, params={"after_id": 0}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            async with db.write_transaction() as s:
                await queue.claim_tasks(s, processor_id="p", limit=10, lease_seconds=30)
            events = await read_events(response, 2)
        assert [e["user_id"] for _, e in events] == ["alice", "alice"]
        assert [e["type"] for _, e in events] == ["started", "started"]
        resume = {**headers, "Last-Event-ID": str(events[0][0])}
        async with client.stream("GET", url, headers=resume) as response:
            [(again, _)] = await read_events(response, 1)
    assert again == events[1][0]


async def test_a_revoked_token_ends_its_open_stream(db: Database, api_url: str) -> None:
    """Revoking a token cuts off a stream opened with it at its next poll (every
    STREAM_POLL_SECONDS; notifications written after the revocation are not sent);
    reconnecting gets 401."""
    from app.api.routes.notifications import STREAM_POLL_SECONDS

    async with db.write_transaction() as s:
        row, alice = await auth.create_token(s, user_id="alice")
    headers = {"Authorization": f"Bearer {alice}"}
    url = f"{api_url}/api/async-analysis/notifications/stream"
    async with httpx.AsyncClient(timeout=30) as client:
        async with client.stream("GET", url, headers=headers) as response:
            assert response.status_code == 200
            async with db.write_transaction() as s:
                assert await auth.revoke_token(s, row.id)
            revoked = time.monotonic()
            async with db.write_transaction() as s:
                await queue.enqueue_tasks(s, [{"kind": "noop", "user_id": "alice"}])
                await queue.claim_tasks(s, processor_id="p", limit=1, lease_seconds=30)
            lines = [line async for line in response.aiter_lines()]  # until the server ends it
        assert time.monotonic() - revoked < STREAM_POLL_SECONDS + 5
        assert not [line for line in lines if line.startswith("data: ")], lines
        assert (await client.get(url, headers=headers)).status_code == 401


@pytest.mark.parametrize("engine_name", ["sqlite"])
@pytest.mark.parametrize("value", ["99999999999999999999999", "9223372036854775808", "-1", "x"])
async def test_a_last_event_id_that_is_no_id_is_refused(
    db: Database, api_url: str, value: str
) -> None:
    async with db.write_transaction() as s:
        _, alice = await auth.create_token(s, user_id="alice")
    headers = {"Authorization": f"Bearer {alice}", "Last-Event-ID": value}
    url = f"{api_url}/api/async-analysis/notifications/stream"
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.get(url, headers=headers)
    assert r.status_code == 422 and "Last-Event-ID" in r.json()["detail"], r.text


@pytest.mark.parametrize("engine_name", ["sqlite"])
@pytest.mark.parametrize("workers", ["1", "2"])
async def test_sigterm_ends_the_api_with_a_stream_open(
    db: Database, database_url: str, tmp_path: Path, workers: str
) -> None:
    """An open stream never ends by itself: after SIGTERM the API held the stop for
    API_SHUTDOWN_SECONDS, then cancelled it with an ERROR and a traceback in its log, at
    every restart (seen by a newcomer's walk-through). Streams now end as the stop begins
    (the client sees the response end and reconnects later), and the API (one process, or
    the parent and its workers) exits 0 with a clean log."""
    from app.cli import API_SHUTDOWN_SECONDS
    from tests.e2e.daemon import Api

    async with db.write_transaction() as s:
        _, alice = await auth.create_token(s, user_id="alice")
    api = Api(database_url, tmp_path, args=("--workers", workers))
    await asyncio.to_thread(api.start)
    assert api.proc is not None
    try:
        url = f"{api.base}/api/async-analysis/notifications/stream"
        headers = {"Authorization": f"Bearer {alice}"}
        async with httpx.AsyncClient(timeout=60) as client:
            async with client.stream("GET", url, headers=headers) as response:
                assert response.status_code == 200
                lines = response.aiter_lines()
                assert await anext(lines) == "retry: 2000"  # the stream is being served
                # its position, for a client that gets nothing before the stream ends
                opening = await anext(lines)
                assert opening.startswith("id: ") and opening[4:].isdigit(), opening
                started = time.monotonic()
                api.proc.terminate()
                async with asyncio.timeout(API_SHUTDOWN_SECONDS - 2):
                    rest = [line async for line in lines]  # ends: the server closed it
                ended = time.monotonic() - started
                code = await asyncio.to_thread(api.proc.wait, API_SHUTDOWN_SECONDS + 15)
                took = time.monotonic() - started
        assert code == 0, api.log()  # a graceful stop (app.api.server.GracefulServer)
        assert rest == [""] or rest == [], rest
        assert ended < API_SHUTDOWN_SECONDS - 2 and took < API_SHUTDOWN_SECONDS - 2, (ended, took)
        log = api.log()
        assert "ERROR" not in log and "Traceback" not in log, log
    finally:
        if api.proc.poll() is None:
            api.proc.kill()
            api.proc.wait(10)
