"""Workload sizes: ``full`` (make bench, the published figures), ``quick`` (make bench-quick,
under 3 minutes) and ``smoke`` (the test suite's run, under a minute, figures meaningless)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Profile:
    """How big each workload is."""

    name: str
    # W1 enqueue
    single_enqueues: int
    bulk_calls: int
    bulk_size: int
    http_requests: int
    http_clients: int
    # W2 drain
    drain_jobs: int
    drain_repeats: int
    concurrency: int
    # W3 pick-up latency
    pickup_jobs: int
    pickup_gap: float
    pickup_idle: float
    # W4 sleeping jobs
    sleep_jobs: int
    sleep_seconds: float
    # W5 scale
    finished_rows: int
    later_rows: int  # pending, scheduled a day ahead at priority 10
    claim_iterations: int
    claim_limit: int
    # W6 idle cost
    idle_seconds: float
    # floors
    floor_batch: int
    floor_large_batch: int
    # PostgreSQL synchronous_commit=off beside the durable figures
    relaxed: bool
    # W1: enqueues alone from this many tasks at once (a web application's requests)
    enqueue_writers: int = 4
    # W1: rounds of the library figures and their floors, alternating (medians reported)
    w1_rounds: int = 1


PROFILES = {
    "full": Profile(
        name="full",
        single_enqueues=3_000,
        bulk_calls=30,
        bulk_size=1_000,
        http_requests=3_000,
        http_clients=8,
        drain_jobs=5_000,
        drain_repeats=5,
        concurrency=10,
        pickup_jobs=50,
        pickup_gap=0.2,
        pickup_idle=2.0,
        sleep_jobs=200,
        sleep_seconds=0.05,
        finished_rows=1_000_000,
        later_rows=100_000,
        claim_iterations=300,
        claim_limit=10,
        idle_seconds=30.0,
        floor_batch=10,
        floor_large_batch=100,
        relaxed=True,
        w1_rounds=3,
    ),
    "quick": Profile(
        name="quick",
        single_enqueues=500,
        bulk_calls=5,
        bulk_size=1_000,
        http_requests=500,
        http_clients=8,
        drain_jobs=2_000,
        drain_repeats=1,
        concurrency=10,
        pickup_jobs=20,
        pickup_gap=0.2,
        pickup_idle=2.0,
        sleep_jobs=200,
        sleep_seconds=0.05,
        finished_rows=20_000,
        later_rows=20_000,
        claim_iterations=100,
        claim_limit=10,
        idle_seconds=5.0,
        floor_batch=10,
        floor_large_batch=100,
        relaxed=False,
    ),
    "smoke": Profile(
        name="smoke",
        single_enqueues=50,
        bulk_calls=1,
        bulk_size=200,
        http_requests=50,
        http_clients=4,
        drain_jobs=300,
        drain_repeats=1,
        concurrency=10,
        pickup_jobs=5,
        pickup_gap=0.1,
        pickup_idle=0.5,
        sleep_jobs=20,
        sleep_seconds=0.05,
        finished_rows=2_000,
        later_rows=2_000,
        claim_iterations=20,
        claim_limit=10,
        idle_seconds=1.0,
        floor_batch=10,
        floor_large_batch=100,
        relaxed=True,  # CI runs this profile: the other durability settings' path too
    ),
}
