"""The dashboard in a real headless Chromium, against a running API and daemon."""

from __future__ import annotations

import re
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from playwright.async_api import Page, async_playwright, expect
from sqlalchemy import update

from app.db import Database
from app.models import Processor
from app.services import auth, queue
from tests.e2e.test_daemon import Spawn
from tests.helpers import eventually, task_row

pytestmark = [pytest.mark.e2e]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "dashboard.png"


async def login(page: Page, url: str, token: str) -> None:
    await page.goto(f"{url}/dashboard")
    await page.fill("#token", token)
    await page.click("#login")


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_dashboard_login_counts_detail_retry_and_pause(
    db: Database, api_url: str, spawn: Spawn, tmp_path: Path
) -> None:
    async with db.write_transaction() as s:
        _, admin = await auth.create_token(s, user_id="ops", is_admin=True)
        _, user = await auth.create_token(s, user_id="alice")
        [bad] = await queue.enqueue_tasks(
            s, [{"kind": "fail", "user_id": "alice", "max_retries": 0}]
        )
        await queue.enqueue_tasks(s, [{"kind": "noop", "user_id": "alice"} for _ in range(5)])
    daemon = spawn()
    await eventually(lambda: _finished(db, bad.id), within=20)
    await eventually(lambda: _count_completed(db, 5), within=20)
    assert daemon.stop() == 0  # so the retried task stays pending for the assertion
    async with db.write_transaction() as s:  # a daemon killed long ago, with none to reap it
        await queue.register_processor(
            s, processor_id="ghost:1", hostname="gone", pid=1, version="v", concurrency=3
        )
        old = datetime.now(UTC) - timedelta(minutes=10)
        await s.execute(update(Processor).where(Processor.id == "ghost:1").values(last_seen_at=old))

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = await browser.new_page(viewport={"width": 1280, "height": 1000})
        console_errors: list[str] = []
        page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
        await login(page, api_url, user)
        await expect(page.locator("#login-error")).to_contain_text("needs an admin token")
        await login(page, api_url, admin)
        await expect(page.locator("#count-failed")).to_have_text("1")
        await expect(page.locator("#count-completed")).to_have_text("5")
        await expect(page.locator("#processors")).to_contain_text("ghost:1")
        await expect(page.locator("#processors")).to_contain_text(re.compile(r"silent 6\d\d s"))
        await page.click(f"#tasks tr[data-id='{bad.id}']")
        await expect(page.locator("#detail-status")).to_have_text("failed")
        await expect(page.locator("#detail-error")).to_contain_text(
            "RuntimeError: boom on attempt 1"
        )
        await expect(page.locator("#detail-notes")).to_contain_text("started")
        await page.screenshot(path=str(tmp_path / "failed-task.png"), full_page=True)
        await page.click("#retry")
        await expect(page.locator("#detail-status")).to_have_text("pending")
        await expect(page.locator("#count-pending")).to_have_text("1")
        await page.screenshot(path=str(tmp_path / "retried.png"), full_page=True)
        await expect(page.locator("#limits")).to_contain_text("No rate limits")
        await page.click("#queue-pause-default")
        await expect(page.locator("#queue-resume-default")).to_be_visible()
        async with db.read_transaction() as s:
            assert (await queue.queue_switches(s))["default"].paused is True
        await page.click("#queue-resume-default")
        await expect(page.locator("#queue-pause-default")).to_be_visible()
        response = await page.goto(f"{api_url}/dashboard")
        assert response is not None
        csp = response.headers["content-security-policy"]
        assert "script-src 'sha256-" in csp and "frame-ancestors 'none'" in csp
        assert response.headers["x-frame-options"] == "DENY"
        await browser.close()
    # The policy allows the page's own script and style: had a hash not matched, the page
    # would not have worked above, and the browser would have said so here.
    assert not [m for m in console_errors if "Content Security Policy" in m], console_errors
    assert (await task_row(db, bad.id)).status == "pending"
    if not DOCS_SCREENSHOT.exists():
        shutil.copyfile(tmp_path / "failed-task.png", DOCS_SCREENSHOT)


async def _finished(db: Database, task_id: int) -> bool:
    return (await task_row(db, task_id)).status == "failed"


async def _count_completed(db: Database, n: int) -> bool:
    async with db.read_transaction() as s:
        return len(await queue.list_tasks(s, status="completed")) == n
