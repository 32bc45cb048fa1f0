"""Liveness, readiness and Prometheus metrics (no token needed; no user data exposed)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from sqlalchemy.exc import SQLAlchemyError

from app.api.deps import DbDep
from app.schema import SchemaError, check_migrated
from app.services import stats

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Database unreachable or not migrated"}})
async def readyz(db: DbDep) -> JSONResponse:
    """200 only when the database answers and is migrated to head."""
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
    name: str, doc: str, values: dict[str, list[float]], bounds: tuple[float, ...]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=["kind"])
    for kind, samples in sorted(values.items()):
        buckets = [(str(b), float(sum(v <= b for v in samples))) for b in bounds]
        buckets.append(("+Inf", float(len(samples))))
        family.add_metric([kind], buckets, sum_value=sum(samples))
    return family


class _Snapshot:
    """A one-scrape collector over the stats of this moment."""

    def __init__(
        self,
        summary: dict[str, object],
        kinds: dict[str, dict[str, int]],
        timings: list[tuple[str, float, float]],
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
        durations: dict[str, list[float]] = {}
        pickups: dict[str, list[float]] = {}
        for kind, duration, pickup in self._timings:
            durations.setdefault(kind, []).append(duration)
            pickups.setdefault(kind, []).append(pickup)
        return [
            by_kind,
            _histogram(
                "async_processor_job_duration_seconds",
                "Run time of jobs completed in the last hour",
                durations,
                DURATION_BUCKETS,
            ),
            _histogram(
                "async_processor_pickup_seconds",
                "Due time to start, jobs completed in the last hour",
                pickups,
                PICKUP_BUCKETS,
            ),
        ]

    def collect(self) -> list[GaugeMetricFamily | HistogramMetricFamily]:
        depth = GaugeMetricFamily(
            "async_processor_tasks", "Tasks by queue and status", labels=["queue", "status"]
        )
        queues: dict[str, dict[str, int]] = self._summary["queues"]  # type: ignore[assignment]
        for queue, counts in queues.items():
            for status in stats.STATUS_ORDER:
                depth.add_metric([queue, status], counts.get(status, 0))
        age = GaugeMetricFamily(
            "async_processor_oldest_pending_age_seconds", "Age of the oldest due pending task"
        )
        age.add_metric([], float(self._summary["oldest_pending_age_seconds"] or 0.0))  # type: ignore[arg-type]
        procs = GaugeMetricFamily("async_processor_processors", "Live processors")
        procs.add_metric([], len(self._summary["processors"]))  # type: ignore[arg-type]
        in_flight = GaugeMetricFamily(
            "async_processor_in_flight", "Jobs running on live processors"
        )
        in_flight.add_metric([], sum(p["in_flight"] for p in self._summary["processors"]))  # type: ignore[attr-defined]
        return [depth, age, procs, in_flight, *self._per_kind()]


@router.get("/metrics", response_class=Response)
async def metrics(db: DbDep) -> Response:
    """Prometheus text format: depth by queue and status, tasks by kind and status,
    duration and pick-up histograms per kind (last hour), live processors."""
    registry = CollectorRegistry(auto_describe=False)
    snapshot = _Snapshot(
        await stats.summary(db), await stats.by_kind(db), await stats.recent_timings(db)
    )
    registry.register(snapshot)
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
