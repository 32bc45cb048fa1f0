"""schemathesis against the running API, with a user and with an admin token, every check on.

``positive_data_acceptance`` (a schema-valid request must not be refused with a 4xx) holds
because the OpenAPI document states the API's rules: strings and payload values carry a
pattern that excludes NUL (which PostgreSQL cannot store, so no engine takes it). The one rule
that depends on the caller, "only admin tokens may set user_id", cannot be written in one
document for every token, so the user run fuzzes the document as a user token sees it: the
same, without TaskCreate.user_id (sending it is then invalid data, and must be refused). An
idempotency key held by another user's task answers 409, which the check accepts.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.db import Database
from app.services import auth

pytestmark = [pytest.mark.e2e]
MAX_EXAMPLES = "10"


def user_view(schema: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI document as a user token sees it: TaskCreate without the admin-only
    user_id (additionalProperties is false, so a user_id is then invalid input), and without
    the operators' routes (queues), which answer a user token 403 whatever it sends."""
    task_create = schema["components"]["schemas"]["TaskCreate"]
    assert task_create["additionalProperties"] is False
    del task_create["properties"]["user_id"]
    operator_paths = [p for p in schema["paths"] if "/queues" in p]
    assert operator_paths, "the queues routes moved: update the user's view"
    for path in operator_paths:
        del schema["paths"][path]
    return schema


@pytest.mark.parametrize("admin", [False, True], ids=["user", "admin"])
async def test_openapi_fuzzing_finds_no_failures(
    db: Database, api_url: str, admin: bool, tmp_path: Path
) -> None:
    async with db.write_transaction() as s:
        _, token = await auth.create_token(s, user_id="fuzzer", is_admin=admin)
    async with httpx.AsyncClient() as client:
        schema = (await client.get(f"{api_url}/openapi.json")).raise_for_status().json()
    document = tmp_path / "openapi.json"
    document.write_text(json.dumps(schema if admin else user_view(schema)))
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        str(document),
        "--url",
        api_url,
        "--checks",
        "all",
        "--header",
        f"Authorization: Bearer {token}",
        "--max-examples",
        MAX_EXAMPLES,
        "--seed",
        "42",
        "--exclude-path-regex",
        "stream",
        "--report-dir",
        str(tmp_path),
    ]
    result = await asyncio.to_thread(
        subprocess.run,
        command,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,  # schemathesis keeps its cache (.schemathesis/) in the working directory
    )
    assert result.returncode == 0, result.stdout[-6000:]
    assert "No issues found" in result.stdout
