"""Lifecycle latency: submit → SUCCESS through the whole platform, with a zero-latency sandbox.

Runs in a suite process whose Django points at the scratch database ``rivya_bench_latency``.
Started here, all on 127.0.0.1: the sandbox provider process, gunicorn (as ``make run``: ASGI, 2
uvicorn workers, ``CONN_MAX_AGE=0``; ``--server wsgi``: the earlier gthread 2 workers × 8
threads; it also receives the sandbox's signed callbacks, ``CALLBACK_BASE_URL``),
one Celery worker (prefork, concurrency 2: Celery's default pool, as ``make run``; or threads,
concurrency 8, as the end-to-end tests, with ``--latency-pool threads``) and Celery beat (the
project's schedule: polling every 2 s). Redis db 9 is the broker (flushed before and after).

The sandbox sets TCP_NODELAY on its connections (``Handler.disable_nagle_algorithm``): without
it each kept-alive request to it stalled about 40 ms on a delayed ACK, an artifact of the test
provider's ``http.server`` that a real provider does not have.

One client (this process, httpx with keep-alive) submits tasks one at a time through the API
(``sandbox_latency_ms`` 0: the upstream job is finished when it is created) and polls
``GET /api/v1/tasks/<id>/`` every 20 ms until ``SUCCESS``. The latency is from just before the
POST to the answer of the GET that saw ``SUCCESS`` (so it includes up to one polling interval).
The baseline is the round trip of ``GET /api/v1/credits/`` (API key lookup, one small read) on
the same server with the same client, measured in the same run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    Row,
    SuiteConfig,
    SuiteResult,
    api_key,
    flush_bench_redis,
    funded_user,
    lifecycle_env,
    percentile,
)
from bench.procs import Processes, free_port, new_webhook_secret

POLL_EVERY_S = 0.02
TASK_TIMEOUT_S = 60.0  # one task not finished by then fails the run
WARMUP_TASKS = 3
BODY: dict[str, Any] = {
    "model": "sandbox-image",
    "prompt": "latency bench",
    # The smallest image: the sandbox renders a PNG and the worker downloads and inspects it;
    # keep that provider-side work small, this measures the platform.
    "params": {"width": 64, "height": 64, "sandbox_latency_ms": 0},
}


@dataclass
class Sample:
    task_id: str
    seconds: float  # client: before the POST → the GET that saw SUCCESS
    submit_seconds: float  # client: the POST's round trip alone
    polls: int
    posted_at: float  # wall clock (time.time()) just before the POST
    observed_at: float  # wall clock when the GET that saw SUCCESS answered


def _one_task(client: httpx.Client) -> Sample:
    posted_at = time.time()
    started = time.perf_counter()
    response = client.post("/api/v1/tasks/", json=BODY)
    submitted = time.perf_counter()
    if response.status_code != 202:
        raise RuntimeError(f"submit answered {response.status_code}: {response.text[:300]}")
    task_id = response.json()["id"]
    deadline = started + TASK_TIMEOUT_S
    polls = 0
    while time.perf_counter() < deadline:  # bounded by the deadline
        tick = time.perf_counter()
        polls += 1
        got = client.get(f"/api/v1/tasks/{task_id}/")
        if got.status_code != 200:
            raise RuntimeError(f"GET of task {task_id} answered {got.status_code}")
        status = got.json()["status"]
        if status == "SUCCESS":
            return Sample(
                task_id=task_id,
                seconds=time.perf_counter() - started,
                submit_seconds=submitted - started,
                polls=polls,
                posted_at=posted_at,
                observed_at=time.time(),
            )
        if status not in ("WAITING", "GENERATING"):
            raise RuntimeError(f"task {task_id} ended {status}: {got.json().get('error')}")
        time.sleep(max(0.0, tick + POLL_EVERY_S - time.perf_counter()))
    raise RuntimeError(f"task {task_id} not SUCCESS after {TASK_TIMEOUT_S:.0f} s")


def _baseline(client: httpx.Client, count: int) -> list[float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        response = client.get("/api/v1/credits/")
        times.append(time.perf_counter() - started)
        if response.status_code != 200:
            raise RuntimeError(f"GET /api/v1/credits/ answered {response.status_code}")
    return times


PHASES = (
    "POST sent → task row created",
    "row created → accepted upstream (Celery hop, upstream submit)",
    "accepted upstream → callback stored (sandbox → gunicorn)",
    "callback stored → worker starts it (Celery hop; +2 s if deferred)",
    "worker starts it → SUCCESS written (download, store, capture)",
    "SUCCESS written → client sees it (commit, next 20 ms poll)",
)


@dataclass
class Phases:
    """Where the time went: one clock (every process is on this machine), from the task row,
    its timeline, its callback delivery and the client's wall-clock times."""

    created_to_finished: list[float]  # server clocks: the row's created_at → finished_at
    steps: dict[str, list[float]]  # PHASES → seconds per task (a step may be negative: the
    # zero-latency sandbox can call back before our worker has stored the upstream id)
    by_callback: int  # tasks finished by the callback's processing
    deferred: int  # callbacks that arrived before our upstream id was stored (retried in 2 s)


def _phases(samples: list[Sample]) -> Phases:
    from tasks.models import CallbackDelivery, Task, TaskEvent

    ids = [s.task_id for s in samples]
    tasks = {str(t.pk): t for t in Task.objects.filter(pk__in=ids)}
    callback_event: dict[str, Any] = {}
    written: dict[str, Any] = {}
    for event in TaskEvent.objects.filter(task_id__in=ids).order_by("created_at", "id"):
        task_id = str(event.task_id)
        if event.kind == "callback":
            callback_event.setdefault(task_id, event.created_at)
        elif event.kind in ("succeeded", "credits_captured"):
            written[task_id] = event.created_at  # the last write of the finishing transaction
    received: dict[str, Any] = {}
    for delivery in CallbackDelivery.objects.filter(task_id__in=ids).order_by("received_at"):
        received.setdefault(str(delivery.task_id), delivery.received_at)
    deferred = CallbackDelivery.objects.filter(task_id__in=ids, attempts__gt=1).count()
    phases = Phases([], {name: [] for name in PHASES}, 0, deferred)
    for sample in samples:
        task = tasks[sample.task_id]
        if task.finished_at is None or task.submitted_at is None:
            continue
        phases.created_to_finished.append((task.finished_at - task.created_at).total_seconds())
        got, cb, done = (
            received.get(sample.task_id),
            callback_event.get(sample.task_id),
            written.get(sample.task_id),
        )
        if cb is not None and cb <= task.finished_at:
            phases.by_callback += 1
        if got is None or cb is None or done is None:
            continue  # finished by polling: no callback steps to show
        points = [
            sample.posted_at,
            task.created_at.timestamp(),
            task.submitted_at.timestamp(),
            got.timestamp(),
            cb.timestamp(),
            done.timestamp(),
            sample.observed_at,
        ]
        for name, start, end in zip(PHASES, points, points[1:], strict=False):
            phases.steps[name].append(end - start)
    return phases


def _p(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"p50 {percentile(values, 50) * 1000:.0f} ms, p99 {percentile(values, 99) * 1000:.0f} ms"


def run(config: SuiteConfig) -> SuiteResult:
    from billing.invariants import run_checks
    from tasks.catalog import seed_catalog

    seed_catalog()
    key = api_key(funded_user("bench-latency"))
    run_dir = Path(config.run_dir)
    secret, port = new_webhook_secret(), free_port()
    env = lifecycle_env(config, secret=secret, port=port)
    flush_bench_redis()
    problems: list[str] = []
    baseline_count = 50 if config.quick else 200
    try:
        with Processes(run_dir, env) as procs:
            sandbox_url, _ = procs.sandbox(secret)
            procs.env["SANDBOX_URL"] = sandbox_url
            url, _ = procs.gunicorn(port=port, server=config.server)
            if config.latency_pool == "threads":  # as the end-to-end tests
                procs.celery_worker(pool="threads", concurrency=8)
            else:  # Celery's default pool, as make run
                procs.celery_worker(pool="prefork", concurrency=2)
            procs.celery_beat()
            procs.dispatcher()
            with httpx.Client(
                base_url=url,
                headers={"Authorization": f"Bearer {key}"},
                timeout=30.0,
                trust_env=False,
            ) as client:
                for _ in range(WARMUP_TASKS):  # first imports, connections, the media path
                    _one_task(client)
                baseline = _baseline(client, baseline_count)
                samples = [_one_task(client) for _ in range(config.latency_tasks)]
    finally:
        flush_bench_redis()

    latencies = [s.seconds for s in samples]
    phases = _phases(samples)
    breaches = run_checks()
    problems += [f"ledger_check: {b.check}: {b.detail}" for b in breaches]
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    b50, b99 = percentile(baseline, 50), percentile(baseline, 99)
    print(
        f"  baseline GET /api/v1/credits/ x{len(baseline)}: p50 {b50 * 1000:.2f} ms, "
        f"p99 {b99 * 1000:.2f} ms",
        flush=True,
    )
    print(
        f"  submit → SUCCESS x{len(samples)} (client, polling every 20 ms): {_p(latencies)}; "
        f"max {max(latencies) * 1000:.0f} ms; the POST alone: "
        f"{_p([s.submit_seconds for s in samples])}; server clocks created → finished_at: "
        f"{_p(phases.created_to_finished)}",
        flush=True,
    )
    print("  where the time goes (tasks finished by their callback):", flush=True)
    width = max(len(name) for name in PHASES)
    for name in PHASES:
        print(f"    {name.ljust(width)}  {_p(phases.steps[name])}", flush=True)
    print(
        f"  finished by the callback: {phases.by_callback} of {len(samples)}; callbacks "
        f"deferred (processed before our upstream id was stored, retried 2 s later): "
        f"{phases.deferred}; ledger_check: {'ok' if not breaches else 'BREACH'}",
        flush=True,
    )
    rows = [
        Row(
            suite="latency",
            measurement=f"submit → SUCCESS p50 ({len(samples)} tasks)",
            value=f"{p50 * 1000:.0f} ms",
            reference=f"GET /credits/ p50 {b50 * 1000:.1f} ms",
            ratio=p50 / b50,
            notes=f"{config.latency_pool} worker; server "
            f"clocks created → finished_at "
            f"{_p(phases.created_to_finished)}",
        ),
        Row(
            suite="latency",
            measurement=f"submit → SUCCESS p99 ({len(samples)} tasks)",
            value=f"{p99 * 1000:.0f} ms",
            reference=f"GET /credits/ p99 {b99 * 1000:.1f} ms",
            ratio=p99 / b99,
            notes=(
                f"{phases.by_callback}/{len(samples)} finished by callback, "
                f"{phases.deferred} callbacks deferred"
            ),
        ),
    ]
    return SuiteResult(rows=rows, ok=not problems, problems=problems)
