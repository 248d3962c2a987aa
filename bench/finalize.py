"""Callback throughput: signed provider callbacks taken in through the HTTP API, and their
finalization (SUCCESS, outputs copied, hold captured, notification) by the Celery worker, each
next to pgbench's TPC-B-like tps at the same number of clients, measured just before and just
after in the same run.

Runs in a suite process whose Django points at the scratch database ``rivya_bench_finalize``.
Started here, all on 127.0.0.1: the sandbox provider, gunicorn (as ``make run``: ASGI, 2 uvicorn
workers, ``CONN_MAX_AGE=0``; ``--server wsgi``: the earlier gthread 2 × 8) and, for the second
part only, one Celery worker (prefork, concurrency 2, as ``make run``).
Redis db 9 is the broker (flushed before, between the parts and after). No beat: nothing polls.

1. Setup (not timed): ``tasks`` tasks are submitted through ``tasks.services.task_submit`` and
   sent upstream by this process (``task_send_upstream``) with the sandbox's
   ``sandbox_callback: none`` and ``sandbox_latency_ms: 0``: each is GENERATING, credits held,
   and its upstream job has finished with one 64×64 PNG, but no callback was sent. For each
   job this process reads the job from the sandbox and signs a ``job.updated`` delivery with
   the sandbox's webhook secret (Standard Webhooks), exactly as the sandbox would send it.
2. Intake: ``bench/load.py`` posts every delivery once to ``/api/v1/callbacks/sandbox/`` with
   ``clients`` threads (one connection per request). Each answer must be 200: signature
   verified over the raw body, the delivery stored once, its processing queued. Rate =
   deliveries ÷ the time from the first request to the last answer. The queued processing is
   then flushed from Redis, so every delivery stays pending for part 3.
3. Finalization: the worker is started and, once it is ready, this process queues
   ``tasks.process_callback`` for every pending delivery (as ``tasks.retry_pending_callbacks``
   does). Rate = tasks ÷ the time from the first message queued to the last task's
   ``finished_at``. Each processing reads the delivery, records the timeline, downloads the
   output from the sandbox, checks it, stores it, then one transaction: the conditional
   UPDATE to SUCCESS, the capture, the events and the notification.

A warm-up of ``WARMUP`` tasks goes through parts 2 and 3 first (untimed). Checks after the run:
every task SUCCESS and charged its price, every delivery processed, one hold captured and one
success notification per task, ``ledger_check`` clean.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from standardwebhooks import Webhook

from bench.common import (
    Row,
    SuiteConfig,
    SuiteResult,
    cpu_cores,
    cpu_report,
    cpu_sample,
    flush_bench_redis,
    funded_user,
    lifecycle_env,
    pids_named,
    top_others,
    tree_pids,
)
from bench.procs import Processes, free_port, new_webhook_secret
from bench.scratch import Pgbench
from bench.submit import LoadResult, check_load, run_load

WARMUP = 20
WORKER_CONCURRENCY = 2  # as make run (Celery's prefork default on this 2-core machine)
FINISH_TIMEOUT_S = 300.0
PARAMS = {
    "width": 64,
    "height": 64,
    "sandbox_latency_ms": 0,
    "sandbox_callback": "none",
}


def _generating_tasks(user: Any, count: int) -> list[str]:
    """``count`` GENERATING tasks whose upstream jobs have finished without a callback."""
    from tasks import services

    ids = []
    for _ in range(count):
        outcome = services.task_submit(
            user=user, model_slug="sandbox-image", prompt="finalize bench", params=PARAMS
        )
        if not outcome.accepted:
            raise RuntimeError(f"submit refused: {outcome.task.error_code}")
        task_id = str(outcome.task.pk)
        if not services.task_send_upstream(task_id=task_id):
            raise RuntimeError(f"task {task_id} did not go upstream")
        ids.append(task_id)
    return ids


def _signed_deliveries(
    task_ids: list[str], sandbox_url: str, secret: str
) -> list[tuple[dict[str, str], str]]:
    """The delivery the sandbox would send for each task's finished job, signed now."""
    from tasks.models import Task

    upstream = {
        str(pk): upstream_id
        for pk, upstream_id in Task.objects.filter(pk__in=task_ids).values_list("pk", "upstream_id")
    }
    webhook = Webhook(secret)
    deliveries = []
    with httpx.Client(base_url=sandbox_url, timeout=30.0, trust_env=False) as client:
        for n, task_id in enumerate(task_ids):
            job_id = upstream[task_id]
            job = client.get(f"/v1/jobs/{job_id}")
            job.raise_for_status()
            data = job.json()
            if data.get("status") != "succeeded":
                raise RuntimeError(f"sandbox job {job_id} is {data.get('status')}, not succeeded")
            body = json.dumps({"type": "job.updated", "data": data}, separators=(",", ":"))
            msg_id = f"msg_bench_{n}_{job_id}"
            sent_at = datetime.now(tz=UTC)
            headers = {
                "webhook-id": msg_id,
                "webhook-timestamp": str(int(sent_at.timestamp())),
                "webhook-signature": webhook.sign(msg_id, sent_at, body),
            }
            deliveries.append((headers, body))
    return deliveries


def _intake(
    config: SuiteConfig,
    url: str,
    deliveries: list[tuple[dict[str, str], str]],
    gunicorn_pid: int,
    tag: str,
) -> LoadResult:
    spec = {
        "path": "/api/v1/callbacks/sandbox/",
        "requests": [[headers, body] for headers, body in deliveries],
        "expect": 200,
    }
    # The deadline only bounds a stuck run: every delivery is sent once.
    return run_load(config, url, spec, 600, gunicorn_pid, tag)


def _finalize(task_ids: list[str], groups: dict[str, Callable[[], list[int]]]) -> dict[str, Any]:
    """Queue the processing of every pending delivery of ``task_ids`` and wait until every task
    has finished. Returns the rate's figures and the CPU used meanwhile."""
    from tasks.models import CallbackDelivery, Task
    from tasks.tasks import process_callback

    upstream_ids = list(Task.objects.filter(pk__in=task_ids).values_list("upstream_id", flat=True))
    deliveries = list(
        CallbackDelivery.objects.filter(
            upstream_id__in=upstream_ids, status=CallbackDelivery.Status.PENDING
        ).values_list("pk", flat=True)
    )
    if len(deliveries) != len(task_ids):
        raise RuntimeError(f"{len(deliveries)} pending deliveries for {len(task_ids)} tasks")
    before = cpu_sample(groups)
    started_wall, started = time.time(), time.perf_counter()
    for delivery_id in deliveries:
        process_callback.delay(delivery_id)
    queued = time.perf_counter() - started
    deadline = started + FINISH_TIMEOUT_S
    unfinished = len(task_ids)
    while time.perf_counter() < deadline:  # bounded by the deadline
        unfinished = Task.objects.filter(pk__in=task_ids, finished_at__isnull=True).count()
        if not unfinished:
            break
        time.sleep(0.05)
    wall = time.perf_counter() - started
    after = cpu_sample(groups)
    if unfinished:
        raise RuntimeError(f"{unfinished} tasks not finished after {FINISH_TIMEOUT_S:.0f} s")
    last = max(
        t.timestamp()
        for t in Task.objects.filter(pk__in=task_ids).values_list("finished_at", flat=True)
    )
    seconds = last - started_wall
    return {
        "seconds": seconds,
        "rate": len(task_ids) / seconds,
        "queued": queued,
        "cpu_line": cpu_report(before, after, wall)
        + f" (busiest others: {top_others(before, after, wall)})",
        "cores": cpu_cores(before, after, wall),
    }


def _verify(task_ids: list[str], user: Any) -> list[str]:
    from billing.invariants import run_checks
    from billing.models import Hold
    from notifications.models import Notification
    from tasks.models import CallbackDelivery, Task

    problems = []
    tasks = Task.objects.filter(pk__in=task_ids)
    not_success = tasks.exclude(status=Task.Status.SUCCESS).count()
    if not_success:
        problems.append(f"{not_success} tasks did not end SUCCESS")
    wrong_charge = sum(
        1
        for price, charged in tasks.values_list("price_micro", "charged_micro")
        if price != charged
    )
    if wrong_charge:
        problems.append(f"{wrong_charge} tasks not charged exactly their price")
    upstream_ids = list(tasks.values_list("upstream_id", flat=True))
    unprocessed = (
        CallbackDelivery.objects.filter(upstream_id__in=upstream_ids)
        .exclude(status=CallbackDelivery.Status.PROCESSED)
        .count()
    )
    if unprocessed:
        problems.append(f"{unprocessed} deliveries not processed")
    captured = Hold.objects.filter(subject_id__in=task_ids, status=Hold.Status.CAPTURED).count()
    if captured != len(task_ids):
        problems.append(f"{captured} holds captured for {len(task_ids)} tasks")
    notified = Notification.objects.filter(
        user=user, kind=Notification.Kind.GENERATION_SUCCESS
    ).count()
    if notified != len(task_ids):
        problems.append(f"{notified} success notifications for {len(task_ids)} tasks")
    problems += [f"ledger_check: {b.check}: {b.detail}" for b in run_checks()]
    return problems


def run(config: SuiteConfig) -> SuiteResult:
    from django.conf import settings

    from tasks.catalog import seed_catalog

    seed_catalog()
    user = funded_user("bench-finalize")
    count = config.finalize_tasks
    run_dir = Path(config.run_dir)
    secret, port = new_webhook_secret(), free_port()
    env = lifecycle_env(config, secret=secret, port=port)
    pgbench = Pgbench(
        url=config.url, database=config.pgbench_database, executable=config.pgbench_executable
    )
    flush_bench_redis()
    problems: list[str] = []
    try:
        with Processes(run_dir, env) as procs:
            sandbox_url, sandbox = procs.sandbox(secret)
            procs.env["SANDBOX_URL"] = sandbox_url
            # This process sends the jobs upstream itself (setup).
            settings.SANDBOX_URL = sandbox_url
            settings.SANDBOX_WEBHOOK_SECRET = secret
            settings.CALLBACK_BASE_URL = env["CALLBACK_BASE_URL"]
            # Every task is running at once here; the capacity checks still run, never refuse.
            settings.TASK_MAX_RUNNING_PER_USER = settings.TASK_MAX_RUNNING = 10**9
            url, gunicorn = procs.gunicorn(port=port, server=config.server)

            started = time.perf_counter()
            warm_ids = _generating_tasks(user, WARMUP)
            task_ids = _generating_tasks(user, count)
            warm = _signed_deliveries(warm_ids, sandbox_url, secret)
            measured = _signed_deliveries(task_ids, sandbox_url, secret)
            flush_bench_redis()  # the submissions queued by task_submit: already sent
            print(
                f"  setup: {WARMUP} + {count} tasks GENERATING with finished jobs, deliveries "
                f"signed, in {time.perf_counter() - started:.1f} s",
                flush=True,
            )

            # 2. Intake through gunicorn.
            problems += check_load(
                _intake(config, url, warm, gunicorn.pid, "intake-warmup"), "warm-up", "200"
            )
            before = pgbench.tpcb_tps(clients=config.clients, seconds=config.seconds)
            intake = _intake(config, url, measured, gunicorn.pid, "intake")
            problems += check_load(intake, "intake", "200")
            after = pgbench.tpcb_tps(clients=config.clients, seconds=config.seconds)
            flush_bench_redis()  # the queued processing: part 3 queues it itself
            intake_tps = (before + after) / 2
            intake_rate = intake.statuses.get("200", 0) / intake.seconds if intake.seconds else 0
            print(
                f"  intake: {intake.statuses.get('200', 0)} deliveries in {intake.seconds:.2f} s "
                f"= {intake_rate:.1f}/s; pgbench -c {config.clients}: {before:.0f} before, "
                f"{after:.0f} after",
                flush=True,
            )
            if intake.cpu_line:
                print(f"  {intake.cpu_line}", flush=True)

            # 3. Finalization by the worker.
            worker = procs.celery_worker(pool="prefork", concurrency=WORKER_CONCURRENCY)
            groups: dict[str, Callable[[], list[int]]] = {
                "worker": lambda: tree_pids(worker.pid),
                "postgres": lambda: pids_named("postgres"),
                "sandbox": lambda: [sandbox.pid],
                "redis": lambda: pids_named("redis-server"),
            }
            _finalize(warm_ids, groups)
            before2 = pgbench.tpcb_tps(clients=WORKER_CONCURRENCY, seconds=config.seconds)
            final = _finalize(task_ids, groups)
            after2 = pgbench.tpcb_tps(clients=WORKER_CONCURRENCY, seconds=config.seconds)
            final_tps = (before2 + after2) / 2
            print(
                f"  finalize: {count} tasks in {final['seconds']:.2f} s = {final['rate']:.1f}/s "
                f"(queuing took {final['queued'] * 1000:.0f} ms); pgbench "
                f"-c {WORKER_CONCURRENCY}: {before2:.0f} before, {after2:.0f} after",
                flush=True,
            )
            print(f"  {final['cpu_line']}", flush=True)
    finally:
        flush_bench_redis()

    problems += _verify(warm_ids + task_ids, user)
    print(f"  checks: {'ok' if not problems else 'FAILED'}", flush=True)
    cores = intake.cores or {}
    fcores = final["cores"]
    rows = [
        Row(
            suite="callbacks",
            measurement=f"POST /api/v1/callbacks/sandbox/, {config.clients} clients",
            value=f"{intake_rate:.0f} deliveries/s",
            reference=f"pgbench {intake_tps:.0f} tps",
            ratio=intake_rate / intake_tps if intake_tps else None,
            notes=f"{count} signed deliveries; cores: gunicorn {cores.get('gunicorn', 0):.2f}, "
            f"postgres {cores.get('postgres', 0):.2f}",
        ),
        Row(
            suite="callbacks",
            measurement=f"finalization, worker prefork ×{WORKER_CONCURRENCY}",
            value=f"{final['rate']:.0f} tasks/s",
            reference=f"pgbench -c {WORKER_CONCURRENCY} {final_tps:.0f} tps",
            ratio=final["rate"] / final_tps if final_tps else None,
            notes=f"{count} tasks to SUCCESS; cores: worker {fcores.get('worker', 0):.2f}, "
            f"postgres {fcores.get('postgres', 0):.2f}, sandbox {fcores.get('sandbox', 0):.2f}",
        ),
    ]
    return SuiteResult(rows=rows, ok=not problems, problems=problems)
