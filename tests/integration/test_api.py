"""The HTTP API through httpx on both engines: codes, bodies, isolation, idempotency."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from app.api.main import API_PREFIX, create_app
from app.config import QUEUE_NAME_PATTERN, load_settings
from app.db import Database, sqlite_path
from app.models import ApiToken, PendingAnalysis
from app.services import auth, hotpath, queue
from tests.helpers import eventually

P = API_PREFIX


@dataclass
class Api:
    client: httpx.AsyncClient
    db: Database
    tokens: dict[str, str]

    def h(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}"}

    async def post(self, who: str, path: str, **kw: Any) -> httpx.Response:
        return await self.client.post(P + path, headers=self.h(who), **kw)

    async def get(self, who: str, path: str, **kw: Any) -> httpx.Response:
        return await self.client.get(P + path, headers=self.h(who), **kw)


@pytest.fixture
async def api(db: Database, database_url: str) -> AsyncIterator[Api]:
    settings = load_settings(
        database_url=database_url,
        handler_modules=("app.services.analysis", "tests.e2e.job_handlers"),
        max_payload_bytes=1000,
    )
    app = create_app(settings)
    tokens = {}
    async with db.write_transaction() as s:
        for who, admin in (("alice", False), ("bob", False), ("root", True), ("gone", False)):
            row, tokens[who] = await auth.create_token(s, user_id=who, is_admin=admin)
            if who == "gone":
                await s.flush()
                await auth.revoke_token(s, row.id)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield Api(client, db, tokens)


@pytest.mark.parametrize("hot", [True, False])
async def test_enqueue_and_read_back(api: Api, hot: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """POST /tasks answers the task as GET reads it, whether its INSERT returned the row
    (a transaction of its own) or a write transaction read it back (the hot path off)."""
    monkeypatch.setattr(hotpath, "ENABLED", hot)
    r = await api.post(
        "alice",
        "/tasks",
        json={
            "kind": "chapter_analysis",
            "payload": {"text": "Hi."},
            "chapter_id": "c1",
            "priority": 7,
        },
    )
    assert r.status_code == 202
    body = r.json()
    assert r.headers["location"] == f"{P}/tasks/{body['id']}"
    assert (
        body["status"],
        body["user_id"],
        body["priority"],
        body["max_retries"],
        body["timeout_seconds"],
    ) == ("pending", "alice", 7, 3, 600)
    assert body["progress"] == {"current": None, "total": None, "message": None, "percent": None}
    got = await api.get("alice", f"/tasks/{body['id']}")
    assert got.status_code == 200 and got.json() == body
    latest = await api.get("alice", "/tasks/c1/latest")
    assert latest.json()["id"] == body["id"]


async def test_latest_for_a_chapter_whose_id_holds_a_slash(api: Api) -> None:
    """A chapter id is any string: one with "/" is reached as %2F (or a bare "/")."""
    r = await api.post("alice", "/tasks", json={"kind": "noop", "chapter_id": "vol/1"})
    assert r.status_code == 202
    for path in ("/tasks/vol%2F1/latest", "/tasks/vol/1/latest"):
        got = await api.get("alice", path)
        assert (got.status_code, got.json()["id"]) == (200, r.json()["id"])
    assert (await api.get("alice", "/tasks/vol/latest")).status_code == 404
    assert (await api.get("alice", "/tasks//latest")).status_code == 422


#: 300 levels (deeper than a response could show: pydantic stops at 255) in 600 bytes
DEEP: dict[str, Any] = {"a": json.loads("[" * 299 + "]" * 299)}


@pytest.mark.parametrize(
    ("body", "code", "detail"),
    [
        ({"kind": "nope"}, 422, "unknown kind 'nope'"),
        ({"kind": "noop", "payload": [1]}, 422, None),
        ({"kind": "noop", "payload": {"x": "y" * 2000}}, 413, "the limit is 1000"),
        ({"kind": "noop", "priority": 0}, 422, None),
        ({"kind": "noop", "priority": 11}, 422, None),
        ({"kind": "noop", "timeout_seconds": 0}, 422, None),
        ({"kind": "noop", "user_id": "bob"}, 422, "user_id may only be set by admin tokens"),
        ({"kind": "noop", "surprise": 1}, 422, None),
        ({"kind": "noop", "payload": DEEP}, 422, "more than 100 levels deep"),
        ({"kind": "noop", "queue": "a,b"}, 422, "no whitespace, comma"),
        ({"kind": "noop", "queue": "a b"}, 422, "no whitespace, comma"),
    ],
)
async def test_enqueue_validation(
    api: Api, body: dict[str, Any], code: int, detail: str | None
) -> None:
    r = await api.post("alice", "/tasks", json=body)
    assert r.status_code == code
    assert "detail" in r.json()
    if detail:
        assert detail in str(r.json()["detail"])
    async with api.db.read_transaction() as s:
        assert (
            await s.execute(select(func.count()).select_from(PendingAnalysis))
        ).scalar_one() == 0


@pytest.mark.parametrize("name", ["a%2Cb", "a%20b", "a=2", "a%09b", "a%0Ab", "a%0D%0Ab/c"])
async def test_pausing_a_queue_no_daemon_could_name_is_422(api: Api, name: str) -> None:
    r = await api.post("root", f"/queues/{name}/pause")
    assert r.status_code == 422 and "detail" in r.json()
    # the rule, in words, as for a task's queue (it showed the pattern's regex)
    assert "a queue's name is" in str(r.json()["detail"]), r.json()
    assert (await api.get("root", "/queues")).json() == []


async def test_a_long_queue_name_in_a_url_is_refused_before_it_is_cached(api: Api) -> None:
    """The name check is cached; a cache keyed by what a request sends held every refused
    60,000-character name (~270 MB per process after 4,096 of them, from a review)."""
    from app import config

    before = config._queue_name_matches.cache_info().currsize
    r = await api.post("alice", f"/queues/{'a' * 20_000}/pause")
    assert r.status_code == 422 and "a queue's name is" in str(r.json()["detail"])
    assert config._queue_name_matches.cache_info().currsize == before


@pytest.mark.parametrize("spelled", ["a/b", "a%2Fb"])
async def test_a_queue_whose_name_has_a_slash_pauses_and_resumes(api: Api, spelled: str) -> None:
    """A name the enqueue accepts can be paused: '/' is allowed in it (as in the CLI)."""
    r = await api.post("root", "/tasks", json={"kind": "noop", "queue": "a/b"})
    assert r.status_code == 202
    r = await api.post("root", f"/queues/{spelled}/pause")
    assert r.status_code == 200 and (r.json()["queue"], r.json()["paused"]) == ("a/b", True)
    listed = {q["queue"]: q["paused"] for q in (await api.get("root", "/queues")).json()}
    assert listed == {"a/b": True}
    r = await api.post("root", f"/queues/{spelled}/resume")
    assert r.status_code == 200 and (r.json()["queue"], r.json()["paused"]) == ("a/b", False)


async def test_admin_enqueues_for_a_user(api: Api) -> None:
    r = await api.post("root", "/tasks", json={"kind": "noop", "user_id": "bob"})
    assert r.status_code == 202 and r.json()["user_id"] == "bob"
    assert (await api.get("bob", f"/tasks/{r.json()['id']}")).status_code == 200


async def test_user_token_cannot_set_user_id(api: Api) -> None:
    """The documented 422 with a JSON detail, alone and in a bulk (naming the item), and
    nothing is written."""
    one = await api.post("alice", "/tasks", json={"kind": "noop", "user_id": "alice"})
    assert one.status_code == 422
    assert one.json() == {"detail": "user_id may only be set by admin tokens"}
    bulk = await api.post(
        "alice", "/tasks/bulk", json={"tasks": [{"kind": "noop"}, {"kind": "noop", "user_id": "b"}]}
    )
    assert bulk.status_code == 422
    assert bulk.json() == {"detail": "tasks[1]: user_id may only be set by admin tokens"}
    documented = create_app(load_settings()).openapi()["components"]["schemas"]["TaskCreate"]
    assert "422" in documented["properties"]["user_id"]["description"]
    async with api.db.read_transaction() as s:
        assert (
            await s.execute(select(func.count()).select_from(PendingAnalysis))
        ).scalar_one() == 0


async def test_a_schedules_key_is_refused(api: Api) -> None:
    """A user who took "cron:<kind>:<next tick>" stood in for that tick: the scheduled task
    never ran. The schedules' namespace is refused, alone and in a bulk."""
    key = "cron:nightly_report:2030-01-01T03:00:00Z"
    one = await api.post("alice", "/tasks", json={"kind": "noop", "idempotency_key": key})
    assert one.status_code == 422 and "reserved for periodic schedules" in str(one.json())
    bulk = await api.post(
        "root", "/tasks/bulk", json={"tasks": [{"kind": "noop", "idempotency_key": key}]}
    )
    assert bulk.status_code == 422 and "reserved for periodic schedules" in str(bulk.json())
    ok = await api.post("alice", "/tasks", json={"kind": "noop", "idempotency_key": "cronjob:1"})
    assert ok.status_code == 202


NUL = "a\x00b"


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"kind": NUL}, ["body", "kind"]),
        ({"kind": "noop", "queue": NUL}, ["body", "queue"]),
        ({"kind": "noop", "project_id": NUL}, ["body", "project_id"]),
        ({"kind": "noop", "chapter_id": NUL}, ["body", "chapter_id"]),
        ({"kind": "noop", "idempotency_key": NUL}, ["body", "idempotency_key"]),
        ({"kind": "noop", "payload": {"deep": [1, {"x": NUL}]}}, ["body", "payload"]),
        ({"kind": "noop", "payload": {NUL: 1}}, ["body", "payload"]),
    ],
)
async def test_nul_characters_are_refused_naming_the_field(
    api: Api, body: dict[str, Any], loc: list[str]
) -> None:
    """PostgreSQL cannot store NUL, so neither engine takes it: 422, the field in the detail."""
    r = await api.post("alice", "/tasks", json=body)
    assert r.status_code == 422
    [error] = r.json()["detail"]
    assert error["loc"] == loc
    bulk = await api.post("alice", "/tasks/bulk", json={"tasks": [{"kind": "noop"}, body]})
    assert bulk.status_code == 422
    assert bulk.json()["detail"][0]["loc"] == ["body", "tasks", 1, *loc[1:]]
    admin = await api.post("root", "/tasks", json={"kind": "noop", "user_id": NUL})
    assert admin.status_code == 422 and admin.json()["detail"][0]["loc"] == ["body", "user_id"]
    async with api.db.read_transaction() as s:
        assert (
            await s.execute(select(func.count()).select_from(PendingAnalysis))
        ).scalar_one() == 0
    # Backslashes and other control characters are fine: only NUL is refused.
    fine = {"kind": "noop", "chapter_id": "tab\there", "payload": {"s": "\\x00 \x01 \\\\"}}
    ok = await api.post("alice", "/tasks", json=fine)
    assert ok.status_code == 202 and ok.json()["payload"] == fine["payload"]


async def test_urls_with_nul_characters_are_refused(api: Api) -> None:
    """In the path (decoded) or the query string: 400 with a detail, before any route."""
    for url in (f"{P}/tasks/a%00b/latest", f"{P}/tasks?kind=a%00b"):
        r = await api.client.get(url, headers=api.h("alice"))
        assert r.status_code == 400, url
        assert r.json() == {"detail": "NUL characters are not allowed in URLs"}
    assert (await api.get("alice", "/tasks?kind=noop")).status_code == 200


async def test_a_trailing_slash_is_a_404_not_a_redirect(api: Api) -> None:
    """Starlette answered 307 to an absolute http:// URL built from the request: wrong
    behind a TLS proxy, and browsers drop Authorization when a redirect changes origin."""
    for method, path in (("GET", "/tasks/"), ("POST", "/tasks/"), ("GET", "/status/")):
        r = await api.client.request(method, P + path, headers=api.h("alice"), json={})
        assert r.status_code == 404, (method, path, r.status_code)
        assert "location" not in r.headers and "detail" in r.json()


async def test_method_not_allowed_lists_every_method_of_the_path(api: Api) -> None:
    """Starlette names only the first matching route's methods; the guard names them all."""
    r = await api.client.delete(f"{P}/tasks", headers=api.h("alice"))
    assert r.status_code == 405
    assert r.headers["Allow"] == "GET, POST"
    assert "detail" in r.json()
    r = await api.client.put(f"{P}/tasks/1/retry", headers=api.h("alice"))
    assert (r.status_code, r.headers["Allow"]) == (405, "POST")
    r = await api.client.post(f"{P}/tasks/1", headers=api.h("alice"))
    assert (r.status_code, r.headers["Allow"]) == (405, "GET")
    for method in ("GET", "HEAD", "DELETE", "OPTIONS", "TRACE"):  # POST only, not a task id
        r = await api.client.request(method, f"{P}/tasks/bulk", headers=api.h("alice"))
        assert (r.status_code, r.headers["Allow"]) == (405, "POST"), method


async def test_head_on_the_health_routes_and_the_dashboard(api: Api) -> None:
    """Uptime checks and load balancers often probe with HEAD: the GET's status and
    headers (the server sends no body); other routes keep their 405."""
    for path in ("/healthz", "/readyz", "/metrics", "/dashboard"):
        got = await api.client.get(path)
        head = await api.client.head(path)
        assert (head.status_code, head.headers["content-type"]) == (
            got.status_code,
            got.headers["content-type"],
        ), path
        assert got.status_code == 200, path
    r = await api.client.head(f"{P}/tasks", headers=api.h("alice"))
    assert (r.status_code, r.headers["Allow"]) == (405, "GET, POST")


def test_openapi_types_every_error_response_as_a_problem() -> None:
    """Generated clients read errors as {detail: string | [problems]}: a 422 on /tasks is
    often a sentence, which FastAPI's HTTPValidationError (a list) mistyped."""
    schema = create_app(load_settings(database_url="sqlite+aiosqlite:///unused.db")).openapi()
    errors = 0
    for operations in schema["paths"].values():
        for operation in operations.values():
            for code, response in operation["responses"].items():
                if code[0] in "45":
                    errors += 1
                    ref = response["content"]["application/json"]["schema"]["$ref"]
                    assert ref == "#/components/schemas/Problem", (code, response)
    assert errors > 50
    assert "HTTPValidationError" not in json.dumps(schema)
    tasks = schema["paths"][f"{P}/tasks"]["post"]["responses"]
    assert {"400", "401", "409", "413", "415", "422", "503"} <= set(tasks)


def test_openapi_declares_the_nul_rule_on_every_string_input() -> None:
    """Every string a request carries (query, path, body, payload keys and values) has the
    pattern that refuses NUL, so a schema-valid request is one the API accepts."""
    from app.api.schemas import NO_NUL

    document = create_app(load_settings()).openapi()
    components = document["components"]["schemas"]

    def strings(schema: dict[str, Any], where: str) -> list[tuple[str, dict[str, Any]]]:
        if "$ref" in schema:
            return []  # components are walked on their own
        found = [(where, schema)] if schema.get("type") == "string" else []
        for option in schema.get("anyOf", []):
            found += strings(option, where)
        for name, prop in schema.get("properties", {}).items():
            found += strings(prop, f"{where}.{name}")
        if isinstance(schema.get("propertyNames"), dict):
            found.append((f"{where} keys", schema["propertyNames"]))
        for key in ("items", "additionalProperties"):
            if isinstance(schema.get(key), dict):
                found += strings(schema[key], f"{where}[]")
        return found

    inputs: list[tuple[str, dict[str, Any]]] = []
    for path, item in document["paths"].items():
        for method, operation in item.items():
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "header":
                    continue  # HTTP itself refuses NUL in a header
                where = f"{method.upper()} {path} {parameter['name']}"
                inputs += strings(parameter["schema"], where)
    for name in ("TaskCreate", "JsonValue"):
        inputs += strings(components[name], name)
    assert len(inputs) > 15
    for where, schema in inputs:
        if "enum" not in schema and "format" not in schema:  # those cannot hold a NUL
            # a queue's name has its own pattern, which holds no NUL either
            assert schema.get("pattern") in (NO_NUL, QUEUE_NAME_PATTERN), where


async def test_idempotency_key(api: Api) -> None:
    first = await api.post("alice", "/tasks", json={"kind": "noop", "idempotency_key": "k1"})
    again = await api.post("alice", "/tasks", json={"kind": "noop", "idempotency_key": "k1"})
    other = await api.post("bob", "/tasks", json={"kind": "noop", "idempotency_key": "k1"})
    assert (first.status_code, again.status_code, other.status_code) == (202, 200, 409)
    assert again.json()["id"] == first.json()["id"]
    assert "alice" not in other.text


async def test_concurrent_enqueues_with_one_key_create_one_row(api: Api) -> None:
    responses = await asyncio.gather(
        *(
            api.post("alice", "/tasks", json={"kind": "noop", "idempotency_key": "same"})
            for _ in range(100)
        )
    )
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * 99 + [202]
    assert len({r.json()["id"] for r in responses}) == 1
    async with api.db.read_transaction() as s:
        assert (
            await s.execute(select(func.count()).select_from(PendingAnalysis))
        ).scalar_one() == 1


async def test_bulk_is_all_or_nothing(api: Api) -> None:
    bad = await api.post(
        "alice",
        "/tasks/bulk",
        json={"tasks": [{"kind": "noop"}, {"kind": "noop"}, {"kind": "nope"}]},
    )
    assert bad.status_code == 422 and bad.json()["detail"].startswith("tasks[2]: unknown kind")
    bad = await api.post("alice", "/tasks/bulk", json={"tasks": [{"kind": "noop", "priority": 99}]})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == [
        "body",
        "tasks",
        0,
        "priority",
    ]
    ok = await api.post(
        "alice",
        "/tasks/bulk",
        json={"tasks": [{"kind": "noop", "payload": {"n": i}} for i in range(5)]},
    )
    assert ok.status_code == 202
    assert [t["payload"]["n"] for t in ok.json()["tasks"]] == [0, 1, 2, 3, 4]
    too_many = await api.post("alice", "/tasks/bulk", json={"tasks": [{"kind": "noop"}] * 1001})
    assert too_many.status_code == 422


async def test_a_key_repeated_in_one_bulk(api: Api) -> None:
    """One user's key twice in a bulk: one task, both items answer it. Two users' items
    with one key (an admin's bulk): 409 and nothing stored, as for a single POST."""

    def item(user: str) -> dict[str, Any]:
        return {"kind": "noop", "idempotency_key": "k3", "user_id": user}

    mixed = await api.post("root", "/tasks/bulk", json={"tasks": [item("bob"), item("carol")]})
    assert mixed.status_code == 409, mixed.text
    assert mixed.json() == {"detail": "tasks[1]: idempotency_key already used"}
    async with api.db.read_transaction() as s:
        assert await queue.list_tasks(s) == []
    same = await api.post("root", "/tasks/bulk", json={"tasks": [item("bob"), item("bob")]})
    assert same.status_code == 202
    [first, second] = same.json()["tasks"]
    assert first["id"] == second["id"] and first["user_id"] == "bob"
    assert same.json()["created"] == [True, False]  # which items made a task
    # every key known already: nothing created, 200 with the tasks (as a single POST says)
    again = await api.post("root", "/tasks/bulk", json={"tasks": [item("bob")]})
    assert again.status_code == 200 and again.json()["tasks"][0]["id"] == first["id"]
    fresh = {"kind": "noop", "idempotency_key": "k4", "user_id": "bob"}
    mixed_new = await api.post("root", "/tasks/bulk", json={"tasks": [item("bob"), fresh]})
    assert mixed_new.status_code == 202 and mixed_new.json()["created"] == [False, True]


async def test_list_paging_and_filters(api: Api) -> None:
    ids = [
        (await api.post("alice", "/tasks", json={"kind": "noop", "project_id": "p"})).json()["id"]
        for _ in range(5)
    ]
    await api.post("bob", "/tasks", json={"kind": "noop", "project_id": "p"})
    page = (await api.get("alice", "/tasks", params={"limit": 2})).json()
    assert [t["id"] for t in page["items"]] == ids[::-1][:2] and page["next_cursor"] == ids[3]
    page2 = (
        await api.get("alice", "/tasks", params={"limit": 2, "cursor": page["next_cursor"]})
    ).json()
    assert [t["id"] for t in page2["items"]] == [ids[2], ids[1]]
    everything = (await api.get("root", "/tasks", params={"project_id": "p"})).json()
    assert len(everything["items"]) == 6 and everything["next_cursor"] is None
    assert (await api.get("alice", "/tasks", params={"status": "completed"})).json()["items"] == []


async def test_cancel_and_retry_codes(api: Api) -> None:
    task_id = (await api.post("alice", "/tasks", json={"kind": "noop", "max_retries": 0})).json()[
        "id"
    ]
    assert (await api.post("alice", f"/tasks/{task_id}/retry")).status_code == 409
    r = await api.post("alice", f"/tasks/{task_id}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert (await api.post("alice", f"/tasks/{task_id}/cancel")).status_code == 409
    r = await api.post("alice", f"/tasks/{task_id}/retry")
    assert r.status_code == 200 and r.json()["status"] == "pending"
    async with api.db.write_transaction() as s:
        await queue.claim_tasks(s, processor_id="p", limit=1, lease_seconds=30)
    r = await api.post("alice", f"/tasks/{task_id}/cancel")
    assert r.status_code == 202 and r.json()["cancel_requested"] is True


async def test_notifications_feed(api: Api) -> None:
    for _ in range(3):
        await api.post("alice", "/tasks", json={"kind": "noop"})
    await api.post("bob", "/tasks", json={"kind": "noop"})
    async with api.db.write_transaction() as s:
        await queue.claim_tasks(s, processor_id="p", limit=10, lease_seconds=30)
    feed = (await api.get("alice", "/notifications")).json()
    ids = [n["id"] for n in feed["items"]]
    assert len(ids) == 3 and ids == sorted(ids, reverse=True) and feed["unread_count"] == 3
    assert {n["user_id"] for n in feed["items"]} == {"alice"}
    after = (await api.get("alice", "/notifications", params={"after_id": ids[-1]})).json()
    assert [n["id"] for n in after["items"]] == sorted(ids)[1:]
    bobs = (await api.get("bob", "/notifications")).json()["items"][0]["id"]
    assert (await api.post("alice", f"/notifications/{bobs}/read")).status_code == 404
    assert (await api.post("alice", f"/notifications/{ids[0]}/read")).json() == {"marked": 1}
    # up_to_id: what the client has shown; a notification that came after it stays unread
    shown = sorted(ids)[0]
    r = await api.post("alice", "/notifications/read-all", params={"up_to_id": shown})
    assert r.json() == {"marked": 1}
    unread = (await api.get("alice", "/notifications", params={"unread_only": True})).json()
    assert [n["id"] for n in unread["items"]] == [sorted(ids)[1]]
    for bad in ("-1", "x", str(2**63)):
        r = await api.post("alice", "/notifications/read-all", params={"up_to_id": bad})
        assert r.status_code == 422 and "detail" in r.json()
    assert (await api.post("alice", "/notifications/read-all")).json() == {"marked": 1}
    assert (await api.get("alice", "/notifications", params={"unread_only": True})).json() == {
        "items": [],
        "unread_count": 0,
    }


async def test_status_is_scoped(api: Api) -> None:
    await api.post("alice", "/tasks", json={"kind": "noop"})
    await api.post("bob", "/tasks", json={"kind": "noop"})
    async with api.db.write_transaction() as s:
        await queue.register_processor(
            s, processor_id="web-1:77:abc", hostname="web-1", pid=77, version="v", concurrency=3
        )
    mine = (await api.get("alice", "/status")).json()
    assert mine["counts"]["pending"] == 1
    # a user sees that daemons run, not their names, pids or every user's job counts
    assert [set(p) for p in mine["processors"]] == [
        {"state", "concurrency", "in_flight", "last_seen_at", "silent_seconds"}
    ]
    admin = (await api.get("root", "/status")).json()
    assert admin["counts"]["pending"] == 2
    assert admin["processors"][0]["hostname"] == "web-1"
    assert admin["processors"][0]["queues"] == "*"  # what it serves (operations.md)


async def test_the_oldest_pending_age_leaves_paused_queues_out(api: Api) -> None:
    """A deliberately paused queue's tasks wait on purpose: counting them tripped every
    age alert for as long as the pause lasted."""
    past = "2000-01-01T00:00:00Z"
    body = {"kind": "noop", "queue": "reports", "scheduled_at": past}
    assert (await api.post("alice", "/tasks", json=body)).status_code == 202
    async with api.db.write_transaction() as s:
        await queue.set_queue_paused(s, "reports", paused=True)
    status = (await api.get("root", "/status")).json()
    assert status["oldest_pending_age_seconds"] is None and status["paused_queues"] == ["reports"]
    metrics = (await api.client.get("/metrics")).text
    assert "async_processor_oldest_pending_age_seconds 0.0" in metrics
    await api.post("alice", "/tasks", json={"kind": "noop", "scheduled_at": past})
    assert (await api.get("root", "/status")).json()["oldest_pending_age_seconds"] >= 0


async def test_a_past_schedule_counts_from_creation(api: Api) -> None:
    """A task enqueued with scheduled_at in 2000 waited from its creation: the oldest
    pending age and its pick-up delay are seconds, not 26 years."""
    body = {"kind": "noop", "scheduled_at": "2000-01-01T00:00:00Z"}
    assert (await api.post("alice", "/tasks", json=body)).status_code == 202
    age = (await api.get("root", "/status")).json()["oldest_pending_age_seconds"]
    assert 0 <= age < 60
    metrics = (await api.client.get("/metrics")).text
    [line] = [x for x in metrics.splitlines() if x.startswith("async_processor_oldest_pending")]
    assert 0 <= float(line.split()[-1]) < 60
    async with api.db.write_transaction() as s:
        [t] = await queue.claim_tasks(s, processor_id="p", limit=1, lease_seconds=30)
        await queue.complete_task(
            s, task_id=t.id, processor_id="p", attempt=1, result=None, duration_seconds=0.1
        )
    metrics = (await api.client.get("/metrics")).text
    [line] = [x for x in metrics.splitlines() if x.startswith("async_processor_pickup_seconds_sum")]
    assert 0 <= float(line.split()[-1]) < 60


async def test_admin_status_of_a_project_scopes_the_timeline(api: Api) -> None:
    for project in ("p1", "p2", "p2"):
        await api.post("alice", "/tasks", json={"kind": "noop", "project_id": project})
    async with api.db.write_transaction() as s:
        for t in await queue.claim_tasks(s, processor_id="p", limit=3, lease_seconds=30):
            await queue.complete_task(
                s, task_id=t.id, processor_id="p", attempt=1, result=None, duration_seconds=0.1
            )

    async def completed(query: str) -> int:
        body = (await api.get("root", f"/status{query}")).json()
        return sum(minute["completed"] for minute in body["timeline"])

    assert [await completed(q) for q in ("", "?project_id=p1", "?project_id=p2")] == [3, 1, 2]
    assert await completed("?project_id=none") == 0


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_readyz_says_when_the_database_file_was_replaced(
    api: Api, database_url: str, tmp_path: Path
) -> None:
    """A restore by `mv` under the running API: it answered from the old file, 202s for
    jobs no daemon would see. /readyz now says so (a load balancer takes it out)."""
    assert (await api.client.get("/readyz")).status_code == 200
    path = sqlite_path(database_url)
    assert path is not None
    shutil.copyfile(path, tmp_path / "restored.db")
    os.replace(tmp_path / "restored.db", path)
    r = await api.client.get("/readyz")
    assert r.status_code == 503 and "was replaced" in r.json()["detail"], r.text
    assert r.headers["retry-after"] == "5"


async def test_health_ready_metrics(api: Api) -> None:
    assert (await api.client.get("/healthz")).json() == {"status": "ok"}
    assert (await api.client.get("/readyz")).status_code == 200
    await api.post("alice", "/tasks", json={"kind": "noop", "payload": {"secret": "s3cret"}})
    async with api.db.write_transaction() as s:
        [t] = await queue.claim_tasks(s, processor_id="p", limit=1, lease_seconds=30)
        await queue.complete_task(
            s,
            task_id=t.id,
            processor_id="p",
            attempt=1,
            result={"secret": "s3cret"},
            duration_seconds=0.2,
        )
    await api.post("alice", "/tasks", json={"kind": "noop"})
    text = (await api.client.get("/metrics")).text
    assert 'async_processor_tasks{queue="default",status="pending"} 1.0' in text
    assert 'async_processor_tasks_by_kind{kind="noop",status="completed"} 1.0' in text
    assert 'async_processor_job_duration_seconds_bucket{kind="noop",le="0.1"} 0.0' in text
    assert 'async_processor_job_duration_seconds_bucket{kind="noop",le="0.5"} 1.0' in text
    assert 'async_processor_pickup_seconds_count{kind="noop"} 1.0' in text
    assert "s3cret" not in text and "alice" not in text


async def test_metrics_give_at_most_a_hundred_queues_series_of_their_own(api: Api) -> None:
    """Any user may name a queue: the busiest 99 keep their own series, the rest are summed
    under "(other queues)", so a flood of queue names cannot flood the scrape."""
    tasks = [{"kind": "noop", "queue": f"q{i:03}"} for i in range(150)]
    tasks += [{"kind": "noop", "queue": "q149"} for _ in range(3)]  # the busiest
    assert (await api.post("alice", "/tasks/bulk", json={"tasks": tasks})).status_code == 202
    text = (await api.client.get("/metrics")).text
    pending = re.findall(r'async_processor_tasks\{queue="([^"]+)",status="pending"\} (\S+)', text)
    assert len(pending) == 100
    counts = {name: float(n) for name, n in pending}
    assert counts["q149"] == 4.0
    # q149 and 98 others keep their series; the 51 left, one task each, are summed
    assert counts["(other queues)"] == 51.0 and sum(counts.values()) == 153


def _routes(app_openapi: dict[str, Any]) -> list[tuple[str, str]]:
    routes = []
    for path, methods in app_openapi["paths"].items():
        if not path.startswith(P):
            continue
        for method, spec in methods.items():
            if spec.get("security") is not None or "401" in spec.get("responses", {}):
                routes.append((method.upper(), path))
    return routes


async def test_authorization_matrix(api: Api) -> None:
    """Every protected route (from the OpenAPI document), for every kind of caller."""
    mine = (await api.post("alice", "/tasks", json={"kind": "noop", "chapter_id": "ch"})).json()[
        "id"
    ]
    async with api.db.write_transaction() as s:
        await queue.claim_tasks(s, processor_id="p", limit=1, lease_seconds=30)
    async with api.db.read_transaction() as s:
        from app.services import notifications

        note = (await notifications.list_for_user(s, user_id="alice"))[0].id
    routes = _routes(api.client._transport.app.openapi())  # type: ignore[attr-defined]
    assert len(routes) >= 10
    values = {
        "task_id": str(mine),
        "chapter_id": "ch",
        "notification_id": str(note),
        "name": "default",
    }
    bodies = {"/tasks": {"kind": "noop"}, "/tasks/bulk": {"tasks": [{"kind": "noop"}]}}
    for method, path in routes:
        url = re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], path)
        json_body = bodies.get(path.removeprefix(P))
        for headers, code in (
            ({}, 401),
            ({"Authorization": "Bearer nonsense"}, 401),
            ({"Authorization": "Basic abc"}, 401),
            (api.h("gone"), 401),
        ):
            r = await api.client.request(method, url, headers=headers, json=json_body)
            assert r.status_code == code, (method, path, headers)
            assert "detail" in r.json()
        if path.endswith("/stream"):
            continue  # an endless response; its scoping is proven in tests/e2e/test_sse.py
        admin_only = (method, path) in ADMIN_ONLY
        r = await api.client.request(method, url, headers=api.h("bob"), json=json_body)
        assert "alice" not in r.text, (method, path)
        stranger = 403 if admin_only else 404 if "{" in path else OWNER_CODES[(method, path)]
        assert r.status_code == stranger, (method, path)
        for who in ("alice", "root"):
            r = await api.client.request(method, url, headers=api.h(who), json=json_body)
            expected = 403 if admin_only and who != "root" else OWNER_CODES[(method, path)]
            assert r.status_code == expected, (who, method, path, r.text)


#: What the owner (and an admin) get from each route in the matrix above, where the task is
#: running and the notification exists. A new route fails the matrix until it is listed here.
OWNER_CODES = {
    ("GET", f"{P}/tasks"): 200,
    ("POST", f"{P}/tasks"): 202,
    ("POST", f"{P}/tasks/bulk"): 202,
    ("GET", f"{P}/tasks/{{task_id}}"): 200,
    ("POST", f"{P}/tasks/{{task_id}}/retry"): 409,
    ("POST", f"{P}/tasks/{{task_id}}/cancel"): 202,
    ("GET", f"{P}/tasks/{{chapter_id}}/latest"): 200,
    ("GET", f"{P}/notifications"): 200,
    ("POST", f"{P}/notifications/read-all"): 200,
    ("POST", f"{P}/notifications/{{notification_id}}/read"): 200,
    ("GET", f"{P}/status"): 200,
    ("GET", f"{P}/me"): 200,
    ("GET", f"{P}/queues"): 200,
    ("POST", f"{P}/queues/{{name}}/pause"): 200,
    ("POST", f"{P}/queues/{{name}}/resume"): 200,
}
#: Routes for operators: a user token gets 403 (they are nobody's resource, so not 404).
ADMIN_ONLY = {
    ("GET", f"{P}/queues"),
    ("POST", f"{P}/queues/{{name}}/pause"),
    ("POST", f"{P}/queues/{{name}}/resume"),
}


async def test_inline_mode_runs_the_job_before_answering(db: Database, database_url: str) -> None:
    settings = load_settings(database_url=database_url, inline=True)
    app = create_app(settings)
    async with db.write_transaction() as s:
        _, token = await auth.create_token(s, user_id="alice")
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            r = await client.post(
                f"{P}/tasks",
                headers={"Authorization": f"Bearer {token}"},
                json={"kind": "chapter_analysis", "payload": {"text": "One two. Three."}},
            )
            bulk = await client.post(
                f"{P}/tasks/bulk",
                headers={"Authorization": f"Bearer {token}"},
                json={
                    "tasks": [
                        {"kind": "chapter_analysis", "payload": {"text": text}}
                        for text in ("One.", "One two.")
                    ]
                },
            )
    assert r.status_code == 202
    body = r.json()
    assert (body["status"], body["attempts"], body["result"]["word_count"]) == ("completed", 1, 3)
    assert bulk.status_code == 202, bulk.text
    assert [(t["status"], t["result"]["word_count"]) for t in bulk.json()["tasks"]] == [
        ("completed", 1),
        ("completed", 2),
    ]


@pytest.mark.parametrize("engine_name", ["sqlite"])
@pytest.mark.parametrize(("origins", "allowed"), [((), False), (("https://app.example",), True)])
async def test_cors_is_off_unless_configured(
    database_url: str, db: Database, origins: tuple[str, ...], allowed: bool
) -> None:
    app = create_app(load_settings(database_url=database_url, cors_origins=origins))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
            r = await client.options(f"{P}/tasks", headers=preflight)
            bulk = await client.options(f"{P}/tasks/bulk", headers=preflight)
    assert (r.headers.get("access-control-allow-origin") == "https://app.example") is allowed
    # /tasks/bulk serves POST only, and a browser may still ask before it POSTs
    assert (bulk.headers.get("access-control-allow-origin") == "https://app.example") is allowed
    if not allowed:
        assert (bulk.status_code, bulk.headers["Allow"]) == (405, "POST")


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_answers_of_the_guard_carry_cors_headers(database_url: str, db: Database) -> None:
    """CORS is the outermost layer: the guard's 400 and 405 reach a browser as JSON it may
    read, not as an opaque network error."""
    app = create_app(
        load_settings(database_url=database_url, cors_origins=("https://app.example",))
    )
    origin = {"Origin": "https://app.example"}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            not_allowed = await client.get(f"{P}/tasks/bulk", headers=origin)
            nul = await client.get(f"{P}/tasks/%00/latest", headers=origin)
    for r, code in ((not_allowed, 405), (nul, 400)):
        assert r.status_code == code
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        assert "detail" in r.json()


@pytest.mark.parametrize("field", ["priority", "max_retries", "timeout_seconds", "scheduled_at"])
@pytest.mark.parametrize("number", ["1e400", "-1e400"])
async def test_a_number_beyond_a_double_gets_a_422_that_is_json(
    api: Api, field: str, number: str
) -> None:
    """``1e400`` is valid JSON that Python reads as infinity; echoed as ``Infinity`` the
    detail was not JSON (JSON.parse threw). Non-finite numbers are echoed as text."""
    headers = {**api.h("alice"), "Content-Type": "application/json"}
    for path, body in (
        ("/tasks", f'{{"kind": "noop", "{field}": {number}}}'),
        ("/tasks/bulk", f'{{"tasks": [{{"kind": "noop", "{field}": {number}}}]}}'),
    ):
        r = await api.client.post(P + path, content=body, headers=headers)
        assert r.status_code == 422, r.text
        constants: list[str] = []
        detail = json.loads(r.text, parse_constant=constants.append)
        assert constants == [], r.text  # NaN, Infinity: not JSON
        assert detail["detail"]


async def test_a_large_input_is_not_echoed_back(api: Api) -> None:
    """A body that is not an object (here 50,000 characters of text) gets a 422 naming the
    problem without sending the body back."""
    headers = {**api.h("alice"), "Content-Type": "application/json"}
    body = json.dumps("x" * 50_000)
    r = await api.client.post(f"{P}/tasks", content=body, headers=headers)
    assert r.status_code == 422
    assert len(r.content) < 2_000
    [error] = r.json()["detail"]
    assert error["input"] == "(not shown: 50,002 characters as JSON)"


async def test_a_body_that_is_not_json_by_its_content_type_is_415(api: Api) -> None:
    """What fetch() sends for a string body with no headers: text/plain. A 415 says what to
    send instead (it was a 422, "Input should be a valid dictionary", echoing the body)."""
    for path in ("/tasks", "/tasks/bulk"):
        for kind in ("text/plain;charset=UTF-8", "application/x-www-form-urlencoded"):
            headers = {**api.h("alice"), "Content-Type": kind}
            r = await api.client.post(P + path, content='{"kind": "noop"}', headers=headers)
            assert r.status_code == 415, (path, kind, r.text)
            assert "Content-Type: application/json" in r.json()["detail"]
    for kind in ("application/json; charset=utf-8", "application/merge-patch+json"):
        headers = {**api.h("alice"), "Content-Type": kind}
        r = await api.client.post(f"{P}/tasks", content='{"kind": "noop"}', headers=headers)
        assert r.status_code == 202, (kind, r.text)
    async with api.db.read_transaction() as s:
        assert await s.scalar(select(func.count()).select_from(PendingAnalysis)) == 2


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32"])
async def test_a_body_not_in_utf8_is_400(api: Api, encoding: str) -> None:
    """JSON is UTF-8 (RFC 8259); json.loads of bytes guessed UTF-16 and UTF-32 and took
    them, although the docs said 400."""
    body = '{"kind": "noop"}'.encode(encoding)
    headers = {**api.h("alice"), "Content-Type": "application/json"}
    r = await api.client.post(f"{P}/tasks", content=body, headers=headers)
    assert r.status_code == 400, r.text
    assert r.json() == {"detail": "request bodies must be UTF-8 (RFC 8259)"}
    bom = b"\xef\xbb\xbf" + b'{"kind": "noop"}'  # a UTF-8 byte order mark is let be
    assert (await api.client.post(f"{P}/tasks", content=bom, headers=headers)).status_code == 202

    async def trickled() -> AsyncIterator[bytes]:  # its first chunk too short to tell
        yield body[:1]
        yield body[1:]

    r = await api.client.post(f"{P}/tasks", content=trickled(), headers=headers)
    assert r.status_code == 400, r.text
    # a GET's body is the route's to ignore, not the guard's to judge
    r = await api.client.request(
        "GET", f"{P}/notifications", content=b"\x00\x01", headers=api.h("alice")
    )
    assert r.status_code == 200


async def test_an_enqueue_without_a_token_is_401_before_its_body_is_read(api: Api) -> None:
    """Anyone could make the API parse up to MAX_REQUEST_BYTES of JSON before the token
    check said 401 (four such loops slowed every other request to ~0.9 s)."""
    read: list[int] = []

    async def body() -> AsyncIterator[bytes]:
        read.append(1)  # the app asked for the body
        yield b'{"kind": "noop"}'

    for headers in ({}, {"Authorization": "Basic YWxpY2U6eA=="}):
        r = await api.client.post(
            f"{P}/tasks", content=body(), headers={**headers, "Content-Type": "application/json"}
        )
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
        assert r.json() == {"detail": "missing bearer token (Authorization: Bearer <token>)"}
    assert read == []
    ok = await api.post("alice", "/tasks", json={"kind": "noop"})
    assert ok.status_code == 202


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_a_body_over_max_request_bytes_is_413_before_it_is_read(
    database_url: str, db: Database
) -> None:
    app = create_app(
        load_settings(database_url=database_url, max_request_bytes=100_000, max_payload_bytes=1000)
    )
    async with db.write_transaction() as s:
        _, token = await auth.create_token(s, user_id="alice")
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    tasks = [{"kind": "noop", "payload": {"text": "x" * 500}} for _ in range(300)]
    body = json.dumps({"tasks": tasks}).encode()
    assert len(body) > 100_000

    async def streamed() -> AsyncIterator[bytes]:  # no Content-Length: found while read
        for at in range(0, len(body), 8_192):
            yield body[at : at + 8_192]

    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            said = await client.post(f"{P}/tasks/bulk", content=body, headers=headers)
            found = await client.post(f"{P}/tasks/bulk", content=streamed(), headers=headers)
            fits = await client.post(
                f"{P}/tasks/bulk", json={"tasks": tasks[:100]}, headers=headers
            )
    for r in (said, found):
        assert r.status_code == 413, r.text
        assert r.json()["detail"].startswith("the request body is over 100,000 bytes")
    assert fits.status_code == 202
    async with db.read_transaction() as s:
        assert await s.scalar(select(func.count()).select_from(PendingAnalysis)) == 100


LONE = "a \ud800 b"  # a lone surrogate: no UTF-8 encodes it, PostgreSQL's json refuses it


@pytest.mark.parametrize(
    "body",
    [
        {"kind": "noop", "payload": {"text": LONE}},
        {"kind": "noop", "payload": {LONE: 1}},
        {"kind": "noop", "chapter_id": LONE},
        {"kind": "noop", "project_id": LONE},
        {"kind": "noop", "idempotency_key": LONE},
        {"kind": "noop", "queue": LONE},
    ],
)
async def test_lone_surrogates_are_refused_and_nothing_is_stored(
    api: Api, body: dict[str, Any]
) -> None:
    """A JSON body may escape half a surrogate pair (\\ud800): 422 with a detail, never a
    500, and no row (a client retrying a 500 would otherwise enqueue twice)."""
    content = json.dumps(body)  # ASCII, the surrogate as the escape \ud800
    headers = {**api.h("alice"), "Content-Type": "application/json"}
    r = await api.client.post(f"{P}/tasks", content=content, headers=headers)
    assert r.status_code == 422, r.text
    assert "detail" in r.json()
    bulk = json.dumps({"tasks": [{"kind": "noop"}, body]})
    r = await api.client.post(f"{P}/tasks/bulk", content=bulk, headers=headers)
    assert r.status_code == 422, r.text
    async with api.db.read_transaction() as s:
        assert (
            await s.execute(select(func.count()).select_from(PendingAnalysis))
        ).scalar_one() == 0
    # A pair is one character (U+1F600), and fine.
    ok = await api.post("alice", "/tasks", json={"kind": "noop", "payload": {"e": "\U0001f600"}})
    assert ok.status_code == 202 and ok.json()["payload"] == {"e": "\U0001f600"}


@pytest.mark.parametrize("when", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"])
async def test_a_schedule_with_no_utc_instant_is_a_422(api: Api, when: str) -> None:
    """A time at the calendar's edge whose UTC instant Python cannot hold: a 422 naming the
    field, not an OverflowError's 500."""
    r = await api.post("alice", "/tasks", json={"kind": "noop", "scheduled_at": when})
    assert r.status_code == 422 and "scheduled_at" in str(r.json()["detail"]), r.text
    async with api.db.read_transaction() as s:
        assert (
            await s.execute(select(func.count()).select_from(PendingAnalysis))
        ).scalar_one() == 0


async def test_the_payload_limit_counts_utf8_bytes(api: Api) -> None:
    """MAX_PAYLOAD_BYTES (1000 here) counts the JSON text's UTF-8 bytes: 400 "é" are
    ~800 bytes (their \\u00e9 escapes would be 2,400)."""
    fits = await api.post("alice", "/tasks", json={"kind": "noop", "payload": {"x": "é" * 400}})
    assert fits.status_code == 202, fits.text
    over = await api.post("alice", "/tasks", json={"kind": "noop", "payload": {"x": "é" * 600}})
    assert over.status_code == 413 and over.json()["detail"].startswith("payload is 1208 bytes")


async def test_an_unknown_status_filter_is_a_422(api: Api) -> None:
    r = await api.get("alice", "/tasks?status=bogus")
    assert r.status_code == 422 and "detail" in r.json()
    ok = await api.get("alice", "/tasks?status=pending")
    assert ok.status_code == 200 and ok.json()["items"] == []


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_a_read_does_not_wait_for_the_write_lock_to_record_a_tokens_use(
    api: Api, database_url: str
) -> None:
    """Recording a token's last use (once a minute at most) is written after the answer,
    and on SQLite only when the write lock is free: while another process holds it, a read
    still answers at once (and no writer of this process waits behind the bookkeeping);
    the next request after the lock is free records the use."""
    import sqlite3

    path = database_url.split("///", 1)[1]
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        r = await api.get("alice", "/tasks?limit=1")
        assert r.status_code == 200  # not 503 after the 5 s busy timeout
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert (await api.get("alice", "/tasks?limit=1")).status_code == 200  # the lock is free

    async def used() -> bool:
        async with api.db.read_transaction() as s:
            rows = await s.execute(select(ApiToken.last_used_at).where(ApiToken.user_id == "alice"))
            return rows.scalar_one() is not None

    await eventually(used, within=10)


@pytest.mark.parametrize("hot", [True, False])
async def test_a_token_is_looked_up_on_every_request(
    api: Api, hot: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whether the token is read on the bare driver or through a session: a user token
    acts as its user, an admin's sees every user's tasks, an unknown or revoked one is a
    401, and a revocation holds from the very next request (nothing is cached)."""
    monkeypatch.setattr(hotpath, "ENABLED", hot)
    mine = (await api.post("alice", "/tasks", json={"kind": "noop"})).json()
    assert mine["user_id"] == "alice"
    assert (await api.get("bob", f"/tasks/{mine['id']}")).status_code == 404
    assert (await api.get("root", f"/tasks/{mine['id']}")).status_code == 200
    unknown = {"Authorization": "Bearer ap_" + "x" * 43}
    for headers in (api.h("gone"), unknown):
        r = await api.client.get(f"{P}/tasks", headers=headers)
        assert (r.status_code, r.json()["detail"]) == (401, "unknown or revoked token")
    async with api.db.write_transaction() as s:
        [alice] = (await s.scalars(select(ApiToken.id).where(ApiToken.user_id == "alice"))).all()
        assert await auth.revoke_token(s, alice)
    assert (await api.get("alice", f"/tasks/{mine['id']}")).status_code == 401


@pytest.mark.parametrize("when", ["1700000000", " 1700000000.5 ", "-1", "1e9", 1700000000])
async def test_a_schedule_given_as_a_number_is_a_422(api: Api, when: object) -> None:
    """scheduled_at is ISO 8601: a number, or a string of one, is not read as Unix time."""
    r = await api.post("alice", "/tasks", json={"kind": "noop", "scheduled_at": when})
    assert r.status_code == 422 and "ISO 8601" in str(r.json()["detail"]), r.text
    ok = await api.post("alice", "/tasks", json={"kind": "noop", "scheduled_at": "2030-01-01"})
    assert ok.status_code == 202 and ok.json()["scheduled_at"].startswith("2030-01-01T00:00:00")


@pytest.mark.parametrize("depth", [101, 500, 940, 950, 954, 990])
async def test_a_payload_nested_too_deep_is_refused_at_any_depth(api: Api, depth: int) -> None:
    """A 422 where JSON could read it, a 400 past what it can; never a 500 (between ~950
    and ~955 levels the NUL check's json.dumps ran out of recursion), nothing stored."""
    payload = "[" * (depth - 1) + "]" * (depth - 1)
    body = f'{{"kind": "noop", "payload": {{"x": {payload}}}}}'
    headers = {**api.h("alice"), "Content-Type": "application/json"}
    for path, content in (("/tasks", body), ("/tasks/bulk", f'{{"tasks": [{body}]}}')):
        r = await api.client.post(P + path, content=content, headers=headers)
        assert r.status_code in (400, 422), (path, r.status_code, r.text[:300])
        if depth <= 500:
            assert r.status_code == 422 and "levels deep" in json.dumps(r.json()["detail"])
    async with api.db.read_transaction() as s:
        assert await s.scalar(select(func.count()).select_from(PendingAnalysis)) == 0


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (b'{"kind": "noop",', 422),  # not valid JSON: json_invalid
        (b'{"kind": "no\xffop"}', 400),  # not UTF-8
        (b"[" * 100_000, 400),  # nested too deep to parse
    ],
)
async def test_bodies_that_cannot_be_read_are_answered_as_documented(
    api: Api, content: bytes, code: int
) -> None:
    headers = {**api.h("alice"), "Content-Type": "application/json"}
    r = await api.client.post(f"{P}/tasks", content=content, headers=headers)
    assert r.status_code == code, r.text
    assert "detail" in r.json()
    if code == 422:
        assert r.json()["detail"][0]["type"] == "json_invalid"
    async with api.db.read_transaction() as s:
        assert (
            await s.execute(select(func.count()).select_from(PendingAnalysis))
        ).scalar_one() == 0
