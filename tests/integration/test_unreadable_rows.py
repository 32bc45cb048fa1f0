"""Rows an operator edited by hand into values their columns' types cannot hold: the API
shows them (the unreadable values null, named in ``unreadable``) and every other row as
stored; no read that meets one answers 500. SQLite keeps any value in any column;
PostgreSQL keeps dates before year 1 and JSON nested deeper than Python decodes."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from sqlalchemy import text

from app.db import Database
from app.services import queue
from tests.integration.test_api import Api, api  # noqa: F401 (the fixture)

DEEP = "[" * 3000 + "]" * 3000

# (the edit, the fields it leaves unreadable); :id is the task's id
SQLITE_EDITS = [
    ("UPDATE pending_analysis SET payload = '{bad' WHERE id = :id", ["payload"]),
    (
        "UPDATE pending_analysis SET result = '{bad', status = 'completed' WHERE id = :id",
        ["result"],
    ),
    ("UPDATE pending_analysis SET payload = :deep WHERE id = :id", ["payload"]),
    ("UPDATE pending_analysis SET payload = '[1, 2]' WHERE id = :id", ["payload"]),
    ("UPDATE pending_analysis SET created_at = 'garbage' WHERE id = :id", ["created_at"]),
    ("UPDATE pending_analysis SET scheduled_at = 'later' WHERE id = :id", ["scheduled_at"]),
    ("UPDATE pending_analysis SET priority = 5.5 WHERE id = :id", ["priority"]),
    ("UPDATE pending_analysis SET attempts = 'x', token_usage = 'y' WHERE id = :id", None),
    ("UPDATE pending_analysis SET kind = x'ff00' WHERE id = :id", ["kind"]),
    (
        "UPDATE pending_analysis SET progress_current = 'a', progress_total = 3 WHERE id = :id",
        ["progress.current"],
    ),
    # text that is not UTF-8 is read with U+FFFD in place of the bad bytes, not a 503
    ("UPDATE pending_analysis SET kind = CAST(x'ff00' AS TEXT) WHERE id = :id", []),
    ("UPDATE pending_analysis SET queue = x'ff00' WHERE id = :id", ["queue"]),
]
PG_EDITS = [
    ("UPDATE pending_analysis SET created_at = '0044-03-15 BC' WHERE id = :id", ["created_at"]),
    ("UPDATE pending_analysis SET payload = CAST(:deep AS jsonb) WHERE id = :id", ["payload"]),
    (
        "UPDATE pending_analysis SET result = CAST(:deep AS jsonb), status = 'completed'"
        " WHERE id = :id",
        ["result"],
    ),
]


async def _task(client: Api, who: str = "alice", chapter: str = "c1") -> int:
    r = await client.post(
        who, "/tasks", json={"kind": "chapter_analysis", "payload": {"t": 1}, "chapter_id": chapter}
    )
    assert r.status_code == 202, r.text
    return int(r.json()["id"])


async def _edit(client: Api, sql: str, task_id: int) -> None:
    async with client.db.write_transaction() as s:
        await s.execute(text(sql), {"id": task_id, "deep": DEEP})


async def test_tasks_edited_by_hand_into_unreadable_values_are_shown(
    api: Api,  # noqa: F811
) -> None:
    edits = PG_EDITS if api.db.dialect == "postgresql" else SQLITE_EDITS
    for sql, fields in edits:
        await _check_edit(api, sql, ["attempts", "token_usage"] if fields is None else fields)
        async with api.db.write_transaction() as s:
            await s.execute(text("DELETE FROM analysis_notifications"))
            await s.execute(text("DELETE FROM pending_analysis"))


async def _check_edit(api: Api, sql: str, fields: list[str]) -> None:  # noqa: F811
    good = await _task(api)
    bad = await _task(api)
    await _edit(api, sql, bad)
    shown: dict[str, Any] = {}
    for who in ("alice", "root"):
        r = await api.get(who, f"/tasks/{bad}")
        assert r.status_code == 200, r.text
        shown = r.json()
        assert shown["unreadable"] == sorted(fields), (sql, shown)
        assert all(shown[f] is None for f in fields if not f.startswith("progress"))
        if "CAST(x'ff00' AS TEXT)" in sql:
            assert shown["kind"] == "\ufffd\x00"
        assert (shown["id"], shown["user_id"], shown["chapter_id"]) == (bad, "alice", "c1")
        # one bad row does not take the list (nor a chapter's latest) down with it
        page = await api.get(who, "/tasks")
        assert page.status_code == 200, page.text
        items = {t["id"]: t for t in page.json()["items"]}
        assert set(items) == {good, bad}
        assert items[good]["unreadable"] == [] and items[good]["payload"] == {"t": 1}
        assert items[bad]["unreadable"] == sorted(fields)
        latest = await api.get(who, "/tasks/c1/latest")
        assert (latest.status_code, latest.json()["id"]) == (200, bad)
    for path in ("/status", "/queues", "/notifications"):
        assert (await api.get("root", path)).status_code == 200, path
    assert (await api.client.get("/metrics")).status_code == 200
    # acting on it answers as for any task: cancel (pending) or 409 (finished), then retry
    if shown["status"] == "pending":
        r = await api.post("alice", f"/tasks/{bad}/cancel")
        assert (r.status_code, r.json()["status"]) == (200, "cancelled"), r.text
        assert r.json()["unreadable"] == sorted(fields)
        r = await api.post("alice", f"/tasks/{bad}/retry")
        assert (r.status_code, r.json()["status"]) == (200, "pending"), r.text


async def test_a_notification_edited_by_hand_is_shown_and_the_feed_goes_on(
    api: Api,  # noqa: F811
) -> None:
    task_id = await _task(api)
    async with api.db.write_transaction() as s:
        for _ in range(11):
            await queue.enqueue_task(s, kind="chapter_analysis", payload={}, user_id="alice")
        claimed = await queue.claim_tasks(s, processor_id="p", limit=20, lease_seconds=30)
    assert len(claimed) == 12  # twelve "started" notifications for alice, ids 1 to 12
    if api.db.dialect == "postgresql":
        edit = "UPDATE analysis_notifications SET created_at = '0044-03-15 BC' WHERE task_id = :id"
        fields = ["created_at"]
    else:
        edit = (
            "UPDATE analysis_notifications SET data = '{bad', created_at = 'garbage'"
            " WHERE task_id = :id"
        )
        fields = ["created_at", "data"]
    await _edit(api, edit, task_id)
    for query in ("", "?after_id=0", "?unread_only=true"):
        r = await api.get("alice", "/notifications" + query)
        assert r.status_code == 200, r.text
        items = r.json()["items"]
        assert len(items) == 12 and r.json()["unread_count"] == 12
        ids = [n["id"] for n in items]  # in id order, as numbers (9 before 10)
        assert ids == sorted(ids, reverse="after_id" not in query), ids
        by_task = {n["task_id"]: n for n in items}
        assert by_task[task_id]["unreadable"] == fields
        assert all(by_task[task_id][f] is None for f in fields)
        assert by_task[task_id]["type"] == "started"
        others = [n for n in items if n["task_id"] != task_id]
        assert all(n["unreadable"] == [] and n["created_at"] is not None for n in others)


async def test_text_that_is_not_utf8_is_claimed_and_fails_saying_so(
    sqlite_template: Path, tmp_path: Path
) -> None:
    """SQLite only (PostgreSQL refuses such text): a kind edited by hand into bytes that
    are not UTF-8 made every claim that met the row fail ("Could not decode to UTF-8"),
    for ever, holding every other job back. Now the row is claimed beside the others, its
    kind read with U+FFFD, and the daemon's executor fails it as a kind no handler has."""
    path = tmp_path / "q.db"
    shutil.copyfile(sqlite_template, path)
    db = Database.from_url(f"sqlite+aiosqlite:///{path}")
    try:
        async with db.write_transaction() as s:
            bad = await queue.enqueue_task(s, kind="chapter_analysis", payload={})
            good = await queue.enqueue_task(s, kind="chapter_analysis", payload={})
            await s.execute(
                text("UPDATE pending_analysis SET kind = CAST(x'ff00' AS TEXT) WHERE id = :id"),
                {"id": bad.id},
            )
        async with db.write_transaction() as s:
            claimed = await queue.claim_tasks(s, processor_id="p", limit=5, lease_seconds=30)
        assert [(t.id, t.kind) for t in claimed] == [
            (bad.id, "\ufffd\x00"),
            (good.id, "chapter_analysis"),
        ]
    finally:
        await db.dispose()
