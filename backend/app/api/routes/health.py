"""Liveness, readiness and Prometheus metrics (no token needed; no user data exposed)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from sqlalchemy.exc import SQLAlchemyError

from app.api.deps import DbDep, SettingsDep
from app.schema import SchemaError, check_migrated
from app.services import queue, stats
from app.services.handlers import REGISTRY
from app.services.schedules import shown_schedules

router = APIRouter(tags=["health"])


@router.get("/healthz")
@router.head("/healthz", include_in_schema=False)  # uptime checks and load balancers use HEAD
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Database unreachable or not migrated"}})
@router.head("/readyz", include_in_schema=False)
async def readyz(db: DbDep) -> JSONResponse:
    """200 only when the database answers and is migrated to head (and, on SQLite, is still
    the file this process opened)."""
    problem = db.file_problem()
    if problem is not None:
        return JSONResponse(
            {"status": "unavailable", "detail": f"{problem}: restart the API"},
            status_code=503,
            headers={"Retry-After": "5"},
        )
    try:
        await check_migrated(db.engine)
    except (SchemaError, SQLAlchemyError, OSError, TimeoutError) as exc:
        return JSONResponse(
            {"status": "unavailable", "detail": str(exc)},
            status_code=503,
            headers={"Retry-After": "5"},
        )
    return JSONResponse({"status": "ready"})


DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0)
PICKUP_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)


def _histogram(
    name: str, doc: str, kinds: dict[str, stats.KindTimings], bounds: tuple[float, ...], part: str
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=["kind"])
    for kind, timings in kinds.items():
        counts = getattr(timings, f"{part}_buckets")
        buckets = [(str(b), float(n)) for b, n in zip(bounds, counts, strict=True)]
        buckets.append(("+Inf", float(timings.count)))
        family.add_metric([kind], buckets, sum_value=getattr(timings, f"{part}_sum"))
    return family


#: Queues given series of their own in /metrics; the rest are summed under OTHER_QUEUES.
#: Any user may name a queue: without a cap, 31 bulk requests made 31,000 queues and a
#: 9.4 MB scrape of 155,000 series.
MAX_QUEUE_SERIES = 100
#: The label of the queues past MAX_QUEUE_SERIES (a space: no queue can have this name).
OTHER_QUEUES = "(other queues)"


def capped_queues(queues: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """``queues``' counts, the busiest MAX_QUEUE_SERIES - 1 queues (pending and
    processing, then all tasks) by name and the rest summed as OTHER_QUEUES."""
    if len(queues) <= MAX_QUEUE_SERIES:
        return queues

    def busy(item: tuple[str, dict[str, int]]) -> tuple[int, int, str]:
        name, counts = item
        active = counts.get("pending", 0) + counts.get("processing", 0)
        return (-active, -sum(counts.values()), name)

    ranked = sorted(queues.items(), key=busy)
    kept = dict(ranked[: MAX_QUEUE_SERIES - 1])
    other: dict[str, int] = {}
    for _, counts in ranked[MAX_QUEUE_SERIES - 1 :]:
        for status, n in counts.items():
            other[status] = other.get(status, 0) + n
    return {**kept, OTHER_QUEUES: other}


class _Snapshot:
    """A one-scrape collector over the stats of this moment."""

    def __init__(
        self,
        summary: dict[str, object],
        kinds: dict[str, dict[str, int]],
        timings: dict[str, stats.KindTimings],
    ) -> None:
        self._summary = summary
        self._kinds = kinds
        self._timings = timings

    def _per_kind(self) -> list[GaugeMetricFamily | HistogramMetricFamily]:
        by_kind = GaugeMetricFamily(
            "async_processor_tasks_by_kind",
            "Tasks by kind and status (retained history)",
            labels=["kind", "status"],
        )
        for kind, counts in sorted(self._kinds.items()):
            for status in stats.STATUS_ORDER:
                by_kind.add_metric([kind, status], counts.get(status, 0))
        return [
            by_kind,
            _histogram(
                "async_processor_job_duration_seconds",
                "Run time of jobs completed in the last hour (a sliding window, not cumulative)",
                self._timings,
                DURATION_BUCKETS,
                "duration",
            ),
            _histogram(
                "async_processor_pickup_seconds",
                "Due time to start of jobs completed in the last hour (a sliding window)",
                self._timings,
                PICKUP_BUCKETS,
                "pickup",
            ),
        ]

    def collect(self) -> list[GaugeMetricFamily | HistogramMetricFamily]:
        depth = GaugeMetricFamily(
            "async_processor_tasks", "Tasks by queue and status", labels=["queue", "status"]
        )
        queues: dict[str, dict[str, int]] = self._summary["queues"]  # type: ignore[assignment]
        for name, counts in capped_queues(queues).items():
            for status in stats.STATUS_ORDER:
                depth.add_metric([name, status], counts.get(status, 0))
        age = GaugeMetricFamily(
            "async_processor_oldest_pending_age_seconds",
            "Age of the oldest due pending task, paused queues not counted",
        )
        age.add_metric([], float(self._summary["oldest_pending_age_seconds"] or 0.0))  # type: ignore[arg-type]
        procs = GaugeMetricFamily("async_processor_processors", "Live processors")
        procs.add_metric([], len(self._summary["processors"]))  # type: ignore[arg-type]
        in_flight = GaugeMetricFamily(
            "async_processor_in_flight", "Jobs running on live processors"
        )
        in_flight.add_metric([], sum(p["in_flight"] for p in self._summary["processors"]))  # type: ignore[attr-defined]
        silent = GaugeMetricFamily(
            "async_processor_processors_silent",
            "Processors not stopped but silent for three leases (their process died)",
        )
        silent.add_metric([], len(self._summary["silent_processors"]))  # type: ignore[arg-type]
        paused = GaugeMetricFamily(
            "async_processor_queue_paused", "1 for each paused queue", labels=["queue"]
        )
        for name in self._summary["paused_queues"][:MAX_QUEUE_SERIES]:  # type: ignore[index]
            paused.add_metric([name], 1)
        return [depth, age, procs, silent, in_flight, paused, *self._per_kind()]


def _timestamp(iso: str | None) -> float:
    return datetime.fromisoformat(iso).timestamp() if iso else 0.0


class _Schedules:
    """Periodic schedules: next and last tick (Unix time), tasks enqueued (all daemons)."""

    def __init__(self, schedules: list[dict[str, Any]]) -> None:
        self._schedules = schedules

    def collect(self) -> list[GaugeMetricFamily | CounterMetricFamily]:
        labels = ["kind"]
        next_tick = GaugeMetricFamily(
            "async_processor_schedule_next_tick_timestamp_seconds",
            "Next tick of each periodic schedule",
            labels=labels,
        )
        last_tick = GaugeMetricFamily(
            "async_processor_schedule_last_tick_timestamp_seconds",
            "Last tick enqueued (or skipped as before the schedule started)",
            labels=labels,
        )
        enqueued = CounterMetricFamily(
            "async_processor_scheduled_tasks",
            "Tasks enqueued by each periodic schedule, over every daemon",
            labels=labels,
        )
        for s in self._schedules:
            next_tick.add_metric([s["kind"]], _timestamp(s["next_tick"]))
            last_tick.add_metric([s["kind"]], _timestamp(s["last_tick"]))
            enqueued.add_metric([s["kind"]], s["enqueued_total"])
        return [next_tick, last_tick, enqueued]


class _Limits:
    """Rate limits (allowed starts and starts in the current window) and per-key limits."""

    def __init__(self, limits: dict[str, list[dict[str, Any]]]) -> None:
        self._limits = limits

    def collect(self) -> list[GaugeMetricFamily]:
        allowed = GaugeMetricFamily(
            "async_processor_rate_limit_starts_allowed",
            "Starts allowed per window, per rate-limited kind",
            labels=["kind", "window_seconds"],
        )
        used = GaugeMetricFamily(
            "async_processor_rate_limit_starts_used",
            "Starts in the current window, per rate-limited kind (all daemons)",
            labels=["kind", "window_seconds"],
        )
        for rate in self._limits["rate_limits"]:
            labels = [rate["kind"], f"{rate['per_seconds']:g}"]
            allowed.add_metric(labels, rate["count"])
            used.add_metric(labels, rate["used"])
        keys = GaugeMetricFamily(
            "async_processor_key_limit",
            "Running tasks allowed per key value, per kind",
            labels=["kind", "key"],
        )
        for key in self._limits["key_limits"]:
            keys.add_metric([key["kind"], key["column"]], key["limit"])
        return [allowed, used, keys]


@router.get("/metrics", response_class=Response)
@router.head("/metrics", response_class=Response, include_in_schema=False)
async def metrics(db: DbDep, settings: SettingsDep) -> Response:
    """Prometheus text format: depth by queue and status, tasks by kind and status,
    duration and pick-up histograms per kind (last hour), live processors."""
    registry = CollectorRegistry(auto_describe=False)
    snapshot = _Snapshot(
        await stats.summary(db, lease_seconds=settings.lease_seconds),
        await stats.by_kind(db),
        await stats.recent_histograms(db, DURATION_BUCKETS, PICKUP_BUCKETS),
    )
    registry.register(snapshot)
    periodic = shown_schedules(REGISTRY, settings)
    registry.register(_Schedules(await stats.schedule_overview(db, periodic)))
    async with db.read_transaction() as session:
        limits = await queue.flow_limits(session, settings.rate_limits, settings.key_limits)
    registry.register(_Limits(limits))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
