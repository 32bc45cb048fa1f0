"""Flow control on both engines: named queues with their own slots, pause and resume, rate
limits, per-key concurrency, and how they show in status and metrics."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import Counter
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from app.api.main import create_app
from app.config import (
    SettingsError,
    load_settings,
    parse_key_limits,
    parse_queues,
    parse_rate_limits,
)
from app.db import Database
from app.services import auth, queue
from app.services.async_analysis_processor import (
    EngineConfig,
    ProcessorEngine,
    SlotPool,
    slot_pools,
)
from app.services.handlers import REGISTRY, import_handler_modules
from tests.helpers import eventually, task_row

import_handler_modules(["tests.e2e.job_handlers"])


async def enqueue(db: Database, queue_name: str, n: int, seconds: float = 0.0) -> list[int]:
    async with db.write_transaction() as s:
        rows = await queue.enqueue_tasks(
            s,
            [
                {"kind": "sleep", "queue": queue_name, "payload": {"seconds": seconds}}
                for _ in range(n)
            ],
        )
    return [r.id for r in rows]


async def claim(db: Database, **kw: object) -> list[int]:
    async with db.write_transaction() as s:
        got = await queue.claim_tasks(s, processor_id="p", limit=50, lease_seconds=30, **kw)  # type: ignore[arg-type]
    return sorted(t.id for t in got)


def test_queue_spec_parsing() -> None:
    assert parse_queues("ingest=2, extract=4,default") == (
        ("ingest", 2),
        ("extract", 4),
        ("default", None),
    )
    for bad in ("ingest=0", "ingest=x", "=3", "a,a", "a=1=2"):
        with pytest.raises(ValueError):
            parse_queues(bad)
    # ASYNC_PROCESSOR_QUEUES="," served every queue, where --queues "," exits 2
    for blank in (",", " , ,"):
        with pytest.raises(ValueError, match="names no queue"):
            parse_queues(blank)
    assert parse_queues("") == parse_queues("  ") == ()
    pools = slot_pools(3, parse_queues("ingest=2,default,bulk"))
    assert [(p.limit, p.queues) for p in pools] == [(2, ("ingest",)), (3, ("default", "bulk"))]
    assert [(p.limit, p.queues) for p in slot_pools(5, None)] == [(5, None)]


def test_limit_settings_parse_and_name_the_bad_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    rates = parse_rate_limits("llm=10/1s, report=100/m,big=5/2h")
    assert [(r.kind, r.count, r.seconds) for r in rates] == [
        ("llm", 10, 1.0),
        ("report", 100, 60.0),
        ("big", 5, 7200.0),
    ]
    [key] = parse_key_limits("chapter_analysis=chapter_id:1")
    assert (key.kind, key.column, key.limit) == ("chapter_analysis", "chapter_id", 1)
    for bad in (
        *("llm=10", "llm=0/s", "llm=x/s", "llm=10/1d", "=3/s", "a=1/s,a=2/s"),
        # a period that is no number of seconds stalled every claim (OverflowError, NaN)
        *("llm=1/nans", "llm=1/infs", "llm=1/1e400s", "llm=1/1e300h", "llm=1/367d", "llm=1/9000h"),
        *("llm=-1/s", "llm=1/-1s", "llm=1/0s", "llm=٣/s", "llm=1/1e-9s"),
    ):
        with pytest.raises(ValueError):
            parse_rate_limits(bad)
    for bad in ("k=payload:1", "k=chapter_id:0", "k=chapter_id", "k"):
        with pytest.raises(ValueError):
            parse_key_limits(bad)
    monkeypatch.setenv("ASYNC_PROCESSOR_RATE_LIMITS", "llm=10/fortnight")
    with pytest.raises(SettingsError, match="ASYNC_PROCESSOR_RATE_LIMITS='llm=10/fortnight'"):
        load_settings()


async def test_a_paused_queue_is_not_claimed_until_resumed(db: Database) -> None:
    a = await enqueue(db, "a", 2)
    b = await enqueue(db, "b", 2)
    async with db.write_transaction() as s:
        switch = await queue.set_queue_paused(s, "a", paused=True, by="ops")
    assert (switch.name, switch.paused, switch.updated_by) == ("a", True, "ops")
    assert await claim(db) == b
    assert await claim(db, queues=["a"]) == []
    async with db.read_transaction() as s:
        overview = {r["queue"]: r for r in await queue.queue_overview(s)}
    assert (overview["a"]["paused"], overview["a"]["pending"]) == (True, 2)
    assert (overview["b"]["paused"], overview["b"]["processing"]) == (False, 2)
    async with db.write_transaction() as s:
        await queue.set_queue_paused(s, "a", paused=False, by="ops")
    assert await claim(db) == a
    async with db.read_transaction() as s:
        assert (await queue.queue_switches(s))["a"].paused is False


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_a_queue_paused_by_hand_with_any_true_value_is_not_claimed(db: Database) -> None:
    """SQLite keeps the flag as a number: an operator's ``paused = 2`` reads back as paused,
    so no daemon claims from the queue either (``paused IS 1`` had let them)."""
    a = await enqueue(db, "a", 2)
    async with db.write_transaction() as s:
        await queue.set_queue_paused(s, "a", paused=True, by="ops")
        await s.execute(text("UPDATE queue_states SET paused = 2 WHERE name = 'a'"))
    async with db.read_transaction() as s:
        assert (await queue.queue_switches(s))["a"].paused is True
    assert await claim(db) == []
    async with db.write_transaction() as s:
        await queue.set_queue_paused(s, "a", paused=False, by="ops")
    assert await claim(db) == a


BAD_QUEUE_NAMES = ("", "x" * 101, "a\x00b", "a,b", "a=2", "a b", " a", "a\n", "a\tb", "a\x85b")


async def test_pause_rejects_a_bad_queue_name(db: Database) -> None:
    for bad in BAD_QUEUE_NAMES:
        async with db.write_transaction() as s:
            with pytest.raises(queue.InvalidTaskError, match="queue"):
                await queue.set_queue_paused(s, bad, paused=True)
    async with db.read_transaction() as s:
        assert await queue.queue_switches(s) == {}


async def test_a_queue_name_that_queues_could_not_name_is_refused_at_enqueue(
    db: Database,
) -> None:
    """A queue no daemon's QUEUES/--queues could list (a comma, "=", whitespace, a control
    character) is refused with the rule, before anything is stored; names with other
    punctuation and non-ASCII letters are fine, and --queues lists them."""
    for bad in BAD_QUEUE_NAMES:
        with pytest.raises(queue.InvalidTaskError, match="no whitespace, comma, '='"):
            queue.TaskSpec(kind="noop", queue=bad)
        with pytest.raises(queue.InvalidTaskError, match="queue"):
            async with db.write_transaction() as s:
                await queue.enqueue_tasks(s, [{"kind": "noop"}, {"kind": "noop", "queue": bad}])
    for bad in ("x" * 101, "a\x00b", "a b", "a\tb", "a\x85b", "=2"):  # what survives the split
        with pytest.raises(ValueError, match="is not QUEUE or QUEUE=N"):
            parse_queues(f"ok,{bad}=2")
    good = ["reports.v2", "ingest:eu-west/1", "é-queue", "x" * 100]
    ids = [(await enqueue(db, name, 1))[0] for name in good]
    assert [(await task_row(db, i)).queue for i in ids] == good
    assert parse_queues(",".join(good)) == tuple((name, None) for name in good)


class _PoolProbe(ProcessorEngine):
    """Records, at each start, the most jobs of each queue running at once."""

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.peaks: Counter[str] = Counter()
        self.now: Counter[str] = Counter()
        self.queue_of: dict[int, str] = {}

    def _start_job(self, task: queue.ClaimedTask, pool: SlotPool) -> None:
        super()._start_job(task, pool)
        self.queue_of[task.id] = task.queue
        self.now[task.queue] += 1
        self.peaks[task.queue] = max(self.peaks[task.queue], self.now[task.queue])

    def _job_done(
        self, task: queue.ClaimedTask, pool: SlotPool, job: asyncio.Task[None], started: float
    ) -> None:
        self.now[self.queue_of.pop(task.id)] -= 1  # first: the slot may start a waiting job
        super()._job_done(task, pool, job, started)


async def test_each_named_queue_has_its_own_slots(db: Database, database_url: str) -> None:
    ingest = await enqueue(db, "ingest", 12, 0.03)
    extract = await enqueue(db, "extract", 6, 0.03)
    default = await enqueue(db, "default", 12, 0.03)
    other = await enqueue(db, "other", 3)
    engine = _PoolProbe(
        db,
        REGISTRY,
        EngineConfig(
            database_url=database_url,
            concurrency=3,
            queues=parse_queues("ingest=2,extract=1,default"),
            lease_seconds=3,
            shutdown_grace=1,
        ),
    )
    await engine.start()
    try:
        for task_id in ingest + extract + default:
            await eventually(lambda i=task_id: _done(db, i), within=30)
        await asyncio.sleep(0.3)  # time enough to (wrongly) claim from an unlisted queue
    finally:
        await engine.stop()
    assert engine.capacity == 6
    assert dict(engine.peaks) == {"ingest": 2, "extract": 1, "default": 3}
    assert {(await task_row(db, i)).status for i in other} == {"pending"}


@pytest.mark.parametrize("engine_name", ["postgresql"])
async def test_pause_and_resume_across_two_daemons(db: Database, database_url: str) -> None:
    engines = [
        ProcessorEngine(
            db, REGISTRY, EngineConfig(database_url=database_url, concurrency=2, lease_seconds=3)
        )
        for _ in range(2)
    ]
    async with db.write_transaction() as s:
        await queue.set_queue_paused(s, "reports", paused=True)
    for engine in engines:
        await engine.start()
    try:
        paused = await enqueue(db, "reports", 4)
        flowing = await enqueue(db, "default", 4)
        for task_id in flowing:
            await eventually(lambda i=task_id: _done(db, i), within=15)
        await asyncio.sleep(0.5)
        assert {(await task_row(db, i)).status for i in paused} == {"pending"}
        async with db.write_transaction() as s:
            await queue.set_queue_paused(s, "reports", paused=False)
        for task_id in paused:
            await eventually(lambda i=task_id: _done(db, i), within=5)
    finally:
        for engine in engines:
            await engine.stop()
    assert sum(e.processed for e in engines) == 8


async def _done(db: Database, task_id: int) -> bool:
    return (await task_row(db, task_id)).status == "completed"


def _engines(db: Database, database_url: str, n: int, **config: object) -> list[ProcessorEngine]:
    return [
        ProcessorEngine(
            db,
            REGISTRY,
            EngineConfig(database_url=database_url, lease_seconds=3, shutdown_grace=1, **config),  # type: ignore[arg-type]
        )
        for _ in range(n)
    ]


async def _run(engines: list[ProcessorEngine], db: Database, ids: list[int], within: float) -> None:
    for engine in engines:
        await engine.start()
    try:
        for task_id in ids:
            await eventually(lambda i=task_id: _done(db, i), within=within)
    finally:
        for engine in engines:
            await engine.stop()


async def test_rate_limit_is_never_exceeded_across_daemons(
    db: Database, database_url: str, engine_name: str
) -> None:
    """5 starts per second for `noop`, two daemons on PostgreSQL: no window of one second
    holds more than 5 claims (claims are stamped with the clock read under the kind's
    lock); other kinds flow beside it unthrottled."""
    limited = await _enqueue_kind(db, "noop", 22)
    free = await _enqueue_kind(db, "sleep", 10)
    engines = _engines(
        db,
        database_url,
        2 if engine_name == "postgresql" else 1,
        concurrency=8,
        rate_limits=parse_rate_limits("noop=5/1s"),
    )
    await _run(engines, db, free + limited, within=20)
    starts = sorted([(await task_row(db, i)).started_at for i in limited])
    gaps = [(starts[i + 5] - starts[i]).total_seconds() for i in range(len(starts) - 5)]
    assert min(gaps) >= 1.0, gaps
    # ... and it waited for the window instead of polling: 22 starts took 4 windows, not 5 s polls
    assert (starts[-1] - starts[0]).total_seconds() < 4.5
    free_starts = [(await task_row(db, i)).started_at for i in free]
    assert max(free_starts) < starts[10]  # not held back behind the limited kind


async def test_per_key_concurrency_across_daemons(
    db: Database, database_url: str, engine_name: str, tmp_path: Path
) -> None:
    """At most one running `sleep` per chapter, two daemons on PostgreSQL: the handlers'
    own start/end ledger shows no overlap within a chapter; tasks without a chapter are not
    limited; different chapters run side by side."""
    ledger = tmp_path / "ledger.jsonl"
    chapters = [None if i % 5 == 4 else f"ch{i % 3}" for i in range(20)]
    async with db.write_transaction() as s:
        rows = await queue.enqueue_tasks(
            s,
            [
                {
                    "kind": "sleep",
                    "chapter_id": name,
                    "payload": {"seconds": 0.05, "ledger": str(ledger)},
                }
                for name in chapters
            ],
        )
    ids = [r.id for r in rows]
    engines = _engines(
        db,
        database_url,
        2 if engine_name == "postgresql" else 1,
        concurrency=4,
        key_limits=parse_key_limits("sleep=chapter_id:1"),
    )
    await _run(engines, db, ids, within=30)
    chapter = dict(zip(ids, chapters, strict=True))
    spans: dict[int, list[float]] = {}
    for line in ledger.read_text().splitlines():
        event = json.loads(line)
        spans.setdefault(event["task_id"], []).append(event["at"])
    by_chapter: dict[str | None, list[tuple[float, float]]] = {}
    for task_id, (start, end) in spans.items():
        by_chapter.setdefault(chapter[task_id], []).append((start, end))
    for name, runs in by_chapter.items():
        if name is None:
            continue
        runs.sort()
        for (_, end), (start, _) in itertools.pairwise(runs):
            assert start >= end, (name, runs)
    overall = sorted(s for runs in by_chapter.values() for s in runs)
    assert any(b[0] < a[1] for a, b in itertools.pairwise(overall))  # in parallel


async def _claim_once(db: Database, database_url: str, **config: object) -> list[tuple[str, str]]:
    """One claim of a daemon that is not running otherwise: (kind, chapter) of what it took,
    in claim order."""
    engine = ProcessorEngine(
        db,
        REGISTRY,
        EngineConfig(database_url=database_url, prefetch_window=0, **config),  # type: ignore[arg-type]
    )
    slots = engine.reserve()
    async with db.write_transaction() as s:
        claimed = await engine.claim(s, slots)
    claimed.sort(key=lambda t: (-t.priority, t.scheduled_at, t.id))
    return [(t.kind, t.chapter_id or "") for t in claimed]


async def test_limited_kinds_take_their_turn_by_priority(db: Database, database_url: str) -> None:
    """A limited kind of priority 10 waited behind any backlog of unlimited kinds (they
    were claimed first, the limited ones only for what was left), and the order between
    limited kinds changed with the process's hash seed. One claim order for all now."""
    async with db.write_transaction() as s:
        await queue.enqueue_tasks(s, [{"kind": "sleep", "priority": 1} for _ in range(8)])
        await queue.enqueue_tasks(
            s, [{"kind": "noop", "priority": 10, "chapter_id": f"c{i}"} for i in range(3)]
        )
        await queue.enqueue_tasks(s, [{"kind": "fail", "priority": 7} for _ in range(2)])
    config = {
        "rate_limits": parse_rate_limits("noop=100/1s"),
        "key_limits": parse_key_limits("fail=user_id:5"),
    }
    got = await _claim_once(db, database_url, concurrency=4, **config)
    assert got == [("noop", "c0"), ("noop", "c1"), ("noop", "c2"), ("fail", "")]
    got = await _claim_once(db, database_url, concurrency=3, **config)
    assert got == [("fail", ""), ("sleep", ""), ("sleep", "")]


async def test_a_busy_key_does_not_hold_other_keys_back(db: Database, database_url: str) -> None:
    """One chapter's backlog (100 tasks, one allowed at a time) hid every other chapter's
    tasks behind it: the key scan read the first 20 per free slot in claim order, all of
    the busy chapter, and slots stood idle. Keys at their limit are left out of the scan."""
    async with db.write_transaction() as s:
        await queue.enqueue_tasks(s, [{"kind": "sleep", "chapter_id": "A"} for _ in range(100)])
        await queue.enqueue_tasks(s, [{"kind": "sleep", "chapter_id": "B"} for _ in range(3)])
        await queue.enqueue_tasks(s, [{"kind": "sleep", "chapter_id": "C"} for _ in range(2)])
    keys = parse_key_limits("sleep=chapter_id:1")
    # Nothing running: the first claim's own pick fills A within its page of 40.
    assert await _claim_once(db, database_url, concurrency=2, key_limits=keys) == [
        ("sleep", "A"),
        ("sleep", "B"),
    ]
    # A and B are running (their rows are processing): the scan starts past them.
    assert await _claim_once(db, database_url, concurrency=3, key_limits=keys) == [
        ("sleep", "C"),
    ]


async def _enqueue_kind(db: Database, kind: str, n: int) -> list[int]:
    async with db.write_transaction() as s:
        rows = await queue.enqueue_tasks(s, [{"kind": kind, "payload": {}} for _ in range(n)])
    return [r.id for r in rows]


async def test_limits_and_pauses_show_in_status_and_metrics(
    db: Database, database_url: str
) -> None:
    settings = load_settings(
        database_url=database_url, rate_limits="noop=5/1m", key_limits="sleep=chapter_id:1"
    )
    await _enqueue_kind(db, "noop", 3)
    async with db.write_transaction() as s:
        pick = await queue.pick_limited(s, kind="noop", limit=2, rate=settings.rate_limits[0])
        got = await queue.claim_picked(s, pick, processor_id="p", lease_seconds=30)
        await queue.set_queue_paused(s, "reports", paused=True)
    assert (len(got), pick.wait) == (2, None)
    app = create_app(settings)
    async with db.write_transaction() as s:
        _, token = await auth.create_token(s, user_id="ops", is_admin=True)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            headers = {"Authorization": f"Bearer {token}"}
            body = (await client.get("/api/async-analysis/status", headers=headers)).json()
            metrics = (await client.get("/metrics")).text
    assert body["paused_queues"] == ["reports"]
    assert body["limits"] == {
        "rate_limits": [{"kind": "noop", "count": 5, "per_seconds": 60.0, "used": 2}],
        "key_limits": [{"kind": "sleep", "column": "chapter_id", "limit": 1}],
    }
    assert 'async_processor_queue_paused{queue="reports"} 1.0' in metrics
    assert 'async_processor_rate_limit_starts_used{kind="noop",window_seconds="60"} 2.0' in metrics
    assert 'async_processor_key_limit{key="chapter_id",kind="sleep"} 1.0' in metrics


async def test_a_kind_limit_holds_the_kind_as_a_whole(db: Database, database_url: str) -> None:
    """KEY_LIMITS=kind=kind:N: at most N running tasks of the kind over every daemon (a
    scheduled task has no user, project or chapter to be limited by)."""
    async with db.write_transaction() as s:
        await queue.enqueue_tasks(s, [{"kind": "sleep"} for _ in range(5)])
        await queue.enqueue_tasks(s, [{"kind": "noop"} for _ in range(2)])
    keys = parse_key_limits("sleep=kind:2")
    assert (keys[0].column, keys[0].limit) == ("kind", 2)
    got = await _claim_once(db, database_url, concurrency=5, key_limits=keys)
    assert Counter(kind for kind, _ in got) == {"sleep": 2, "noop": 2}
    assert await _claim_once(db, database_url, concurrency=5, key_limits=keys) == []
