"""Liveness, readiness and Prometheus metrics (no token needed; no user data exposed)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
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


class _Snapshot:
    """A one-scrape collector over a stats summary."""

    def __init__(self, summary: dict[str, object]) -> None:
        self._summary = summary

    def collect(self) -> list[GaugeMetricFamily]:
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
        return [depth, age, procs, in_flight]


@router.get("/metrics", response_class=Response)
async def metrics(db: DbDep) -> Response:
    """Prometheus text format: queue depth by status and queue, live processors."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(await stats.summary(db)))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
