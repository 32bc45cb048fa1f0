"""The API while its PostgreSQL is down: 503 with Retry-After, fast; back by itself after."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from app import schema
from app.api.main import API_PREFIX, create_app
from app.config import load_settings
from app.db import Database
from app.services import auth
from tests.pgcluster import Cluster

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]


async def test_outage_answers_503_then_recovers(cluster: Cluster) -> None:
    url = cluster.url()
    await asyncio.to_thread(schema.upgrade, url)
    db = Database.from_url(url)
    async with db.write_transaction() as s:
        _, token = await auth.create_token(s, user_id="alice")
    await db.dispose()
    app = create_app(load_settings(database_url=url))
    headers = {"Authorization": f"Bearer {token}"}
    body = {"kind": "chapter_analysis", "payload": {"text": "Hi."}}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://t", timeout=30
        ) as client:
            assert (
                await client.post(f"{API_PREFIX}/tasks", headers=headers, json=body)
            ).status_code == 202
            await asyncio.to_thread(cluster.stop)
            for method, path in (
                ("POST", f"{API_PREFIX}/tasks"),
                ("GET", f"{API_PREFIX}/tasks/1"),
                ("GET", f"{API_PREFIX}/notifications"),
                ("GET", "/readyz"),
            ):
                started = time.monotonic()
                r = await client.request(
                    method, path, headers=headers, json=body if method == "POST" else None
                )
                assert r.status_code == 503, (path, r.status_code, r.text)
                assert "detail" in r.json() and r.headers["retry-after"] == "5"
                assert time.monotonic() - started < 5
            assert (await client.get("/healthz")).status_code == 200
            await asyncio.to_thread(cluster.start)
            deadline = time.monotonic() + 20
            while (
                r := await client.get(f"{API_PREFIX}/tasks/1", headers=headers)
            ).status_code != 200:
                assert r.status_code == 503 and time.monotonic() < deadline
                await asyncio.sleep(0.2)
            assert r.json()["status"] == "pending"


@pytest.mark.parametrize("engine_name", ["postgresql"])
async def test_a_database_refusing_connections_answers_503(database_url: str) -> None:
    """ALLOW_CONNECTIONS false (an operator closing the database, 55000), then a connection
    cap or a restart (53300, 57P03) take the same path: asyncpg's errors for them reach
    SQLAlchemy as plain DBAPIErrors, which answered 500 as text."""
    from sqlalchemy.engine import make_url

    from tests import pg

    name = make_url(database_url).database
    db = Database.from_url(database_url)
    async with db.write_transaction() as s:
        _, token = await auth.create_token(s, user_id="alice")
    await db.dispose()
    app = create_app(load_settings(database_url=database_url))
    headers = {"Authorization": f"Bearer {token}"}
    body = {"kind": "chapter_analysis", "payload": {"text": "Hi."}}
    close = (
        f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false;'
        f" SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
    )
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get(f"{API_PREFIX}/tasks", headers=headers)).status_code == 200
            await pg._admin(close)
            try:
                for method, path in (
                    ("POST", f"{API_PREFIX}/tasks"),
                    ("GET", f"{API_PREFIX}/tasks"),
                    ("GET", f"{API_PREFIX}/notifications"),
                    ("GET", f"{API_PREFIX}/status"),
                    ("GET", "/readyz"),
                ):
                    # (the first request may meet a pooled connection the server killed)
                    for _ in range(2):
                        r = await client.request(
                            method, path, headers=headers, json=body if method == "POST" else None
                        )
                    assert r.status_code == 503, (path, r.status_code, r.text)
                    assert r.json()["detail"] and r.headers["retry-after"] == "5"
            finally:
                await pg._admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            assert (await client.get(f"{API_PREFIX}/tasks", headers=headers)).status_code == 200
