"""Outbound webhooks (issue 19): deliveries per second to a receiver on loopback, and the time
from a task's SUCCESS to its event reaching the receiver.

Runs in a suite process whose Django points at the scratch database ``rivya_bench_webhooks``.
Started here, on 127.0.0.1: the receiver (``notifications/tests/receiver.py``, a threaded
standard-library server that records each request and answers 200), the worker of the
``webhooks`` queue as ``make run`` starts it (threads ×16; ``WEBHOOK_ALLOW_PRIVATE`` and
``WEBHOOK_ALLOW_HTTP`` on, since the receiver is on loopback over http), and for the latency
part the whole lifecycle
stack of the latency suite (sandbox, gunicorn ASGI, the lifecycle's worker as
``--latency-pool`` says, beat, the submit dispatcher).

1. **Throughput.** One endpoint; this process records N events (``webhook_event_record``, as a
   state change does) in one transaction, so that the Celery messages are all published at its
   commit, and the worker delivers them. The rate is N ÷ the time from the start of that
   transaction to the last message stored as succeeded (recording and publishing, in this
   process, included). Recording events one transaction each is timed apart (each is a commit).
   Reference: pgbench TPC-B-like at the suite's client count, before and after, on the same
   server (mean). Checked: every message succeeded, the receiver got each ``webhook-id`` (at
   least once), and a sample of the requests verify with the standardwebhooks library.
2. **Latency.** Tasks submitted one at a time through the API with ``webhook_url`` (a path of
   their own on the receiver) and ``webhook_events: ["completed"]``; for each, the receiver's
   arrival time minus the task's ``finished_at`` (one clock: every process is on this machine).
   Reference: a POST from this process straight to the receiver (its own round trip).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    Row,
    SuiteConfig,
    SuiteResult,
    api_key,
    cpu_cores,
    cpu_report,
    cpu_sample,
    flush_bench_redis,
    funded_user,
    lifecycle_env,
    percentile,
    pids_named,
    tree_pids,
)
from bench.procs import Proc, Processes, free_port, new_webhook_secret, wait_until
from bench.scratch import Pgbench

ROOT = Path(__file__).resolve().parent.parent
WEBHOOK_ENV = {"WEBHOOK_ALLOW_PRIVATE": "1", "WEBHOOK_ALLOW_HTTP": "1", "WEBHOOK_SWEEP_EVERY": "1"}
TASK_TIMEOUT_S = 60.0
# The deliveries' worker, as make run starts it (bin/dev.py); and the lifecycle's worker
# (--latency-pool) as the latency suite starts it.
WEBHOOKS_WORKER: dict[str, Any] = {
    "name": "webhooks-worker",
    "queues": "webhooks",
    "pool": "threads",
    "concurrency": 16,
}
LIFECYCLE_POOLS: dict[str, dict[str, Any]] = {
    "prefork": {"pool": "prefork", "concurrency": 2},
    "threads": {"pool": "threads", "concurrency": 8},
}
WARMUP = 50


def _receiver(procs: Processes) -> tuple[str, Proc]:
    port = free_port()
    proc = procs.start(
        "receiver",
        [sys.executable, "-m", "notifications.tests.receiver", "--port", str(port)],
    )
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{base}/healthz", timeout=1, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(up, proc=proc, timeout=30, what="the webhook receiver")
    return base, proc


def _received(base: str, path: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{base}/_received", params={"path": path}, timeout=60, trust_env=False)
    return list(answer.json())


def _record(user_id: Any, numbers: range) -> None:
    """One event per number, in one transaction: delivery starts at its commit."""
    from django.db import transaction

    from notifications import webhooks

    with transaction.atomic():
        for n in numbers:
            webhooks.webhook_event_record(
                user_id=user_id,
                event_type="task.completed",
                subject_type="bench",
                subject_id=str(n),
                data=lambda n=n: {"n": n, "status": "SUCCESS"},
            )


def _all_done(count: int) -> bool:
    from notifications.models import WebhookMessage

    return WebhookMessage.objects.filter(status=WebhookMessage.Status.SUCCEEDED).count() >= count


def _throughput(config: SuiteConfig, run_dir: Path, problems: list[str]) -> tuple[float, str]:
    from django.conf import settings
    from standardwebhooks import Webhook

    from notifications import webhooks
    from notifications.models import WebhookMessage

    settings.WEBHOOK_ALLOW_PRIVATE = settings.WEBHOOK_ALLOW_HTTP = True  # this process's checks
    count = 300 if config.quick else 2000
    user = funded_user("bench-webhooks")
    env = lifecycle_env(config, secret=new_webhook_secret(), port=free_port())
    with Processes(run_dir / "throughput", env) as procs:
        base, receiver = _receiver(procs)
        endpoint = webhooks.endpoint_create(user=user, url=f"{base}/bench")
        worker = procs.celery_worker(**WEBHOOKS_WORKER, **WEBHOOK_ENV)
        # Warm-up, and recording one event per transaction timed apart.
        started = time.perf_counter()
        for n in range(WARMUP):
            _record(user.pk, range(-1 - n, -2 - n, -1))
        recorded = (time.perf_counter() - started) / WARMUP
        wait_until(
            lambda: _all_done(WARMUP), proc=worker, timeout=60, what="the warm-up deliveries"
        )
        groups = {
            "worker": lambda: tree_pids(worker.pid),
            "receiver": lambda: tree_pids(receiver.pid),
            "postgres": lambda: pids_named("postgres"),
            "redis": lambda: pids_named("redis-server"),
            "this process (recording, publishing)": lambda: [os.getpid()],
        }
        before, started = cpu_sample(groups), time.perf_counter()
        _record(user.pk, range(count))
        recorded_at = time.perf_counter()
        wait_until(
            lambda: _all_done(WARMUP + count),
            proc=worker,
            timeout=120,
            what="every delivery to succeed",
            every=0.02,
        )
        elapsed = time.perf_counter() - started
        after = cpu_sample(groups)
        got = _received(base, "/bench")
    ids = {r["headers"]["webhook-id"] for r in got}
    messages = WebhookMessage.objects.filter(endpoint=endpoint)
    expected = {m.webhook_id for m in messages}
    statuses = set(messages.values_list("status", flat=True))
    if ids != expected or statuses != {WebhookMessage.Status.SUCCEEDED}:
        problems.append(
            f"webhooks: {len(expected)} messages ({statuses}), receiver got {len(ids)} ids"
        )
    for request in got[:: max(1, len(got) // 20)]:
        Webhook(endpoint.secret).verify(request["body"], request["headers"])
    rate = count / elapsed
    print(
        f"  {count} deliveries in {elapsed:.2f} s = {rate:.0f}/s (recording them "
        f"included); receiver got {len(got)} requests for {len(expected)} messages; recording one "
        f"event in its own transaction: {recorded * 1000:.2f} ms; the recording transaction "
        f"and its publishing took {recorded_at - started:.2f} s",
        flush=True,
    )
    cores = cpu_cores(before, after, elapsed)
    print(f"  {cpu_report(before, after, elapsed)}", flush=True)
    per = {name: cores[name] / rate * 1000 for name in ("worker", "postgres", "receiver")}
    print("  CPU per delivery: " + ", ".join(f"{k} {v:.2f} ms" for k, v in per.items()), flush=True)
    return rate, (
        f"{count} events, threads ×16 webhooks worker (as make run); worker CPU "
        f"{per['worker']:.1f} ms per delivery"
    )


def _latency(config: SuiteConfig, run_dir: Path, problems: list[str]) -> dict[str, list[float]]:
    from tasks.catalog import seed_catalog
    from tasks.models import Task

    seed_catalog()
    key = api_key(funded_user("bench-webhooks-latency"))
    tasks = 20 if config.quick else 100
    secret, port = new_webhook_secret(), free_port()
    env = lifecycle_env(config, secret=secret, port=port)
    added: list[float] = []
    direct: list[float] = []
    with Processes(run_dir / "latency", {**env, **WEBHOOK_ENV}) as procs:
        base, receiver = _receiver(procs)
        sandbox_url, _ = procs.sandbox(secret)
        procs.env["SANDBOX_URL"] = sandbox_url
        url, _ = procs.gunicorn(port=port)
        procs.celery_worker(**LIFECYCLE_POOLS[config.latency_pool], queues="celery")
        procs.celery_worker(**WEBHOOKS_WORKER)
        procs.celery_beat()
        procs.dispatcher()
        with (
            httpx.Client(
                base_url=url,
                headers={"Authorization": f"Bearer {key}"},
                timeout=30,
                trust_env=False,
            ) as client,
            httpx.Client(base_url=base, timeout=30, trust_env=False) as to_receiver,
        ):
            for _ in range(50):
                started = time.perf_counter()
                to_receiver.post("/direct", content=b"{}")
                direct.append(time.perf_counter() - started)
            for n in range(-3, tasks):  # three warm-up tasks
                path = f"/latency/{n}"
                answer = client.post(
                    "/api/v1/tasks/",
                    json={
                        "model": "sandbox-image",
                        "prompt": "webhook latency",
                        "params": {"width": 64, "height": 64, "sandbox_latency_ms": 0},
                        "webhook_url": base + path,
                        "webhook_events": ["completed"],
                    },
                )
                if answer.status_code != 202:
                    raise RuntimeError(f"submit answered {answer.status_code}: {answer.text}")
                task_id = answer.json()["id"]
                got = wait_until(
                    lambda path=path: _received(base, path),
                    proc=receiver,
                    timeout=TASK_TIMEOUT_S,
                    what=f"the completed event of task {task_id}",
                    every=0.01,
                )
                task = Task.objects.get(pk=task_id)
                payload = json.loads(got[0]["body"])
                if payload["type"] != "task.completed" or task.finished_at is None:
                    problems.append(f"webhooks: task {task_id} sent {payload['type']}")
                    continue
                if n >= 0:
                    added.append(got[0]["at"] - task.finished_at.timestamp())
    return {"added": added, "direct": direct}


def run(config: SuiteConfig) -> SuiteResult:
    from billing.invariants import run_checks

    run_dir = Path(config.run_dir)
    problems: list[str] = []
    pgbench = Pgbench(
        url=config.url, database=config.pgbench_database, executable=config.pgbench_executable
    )
    flush_bench_redis()
    try:
        before = pgbench.tpcb_tps(clients=config.clients, seconds=config.seconds)
        print(f"  pgbench before: {before:.1f} tps", flush=True)
        rate, notes = _throughput(config, run_dir, problems)
        after = pgbench.tpcb_tps(clients=config.clients, seconds=config.seconds)
        tps = (before + after) / 2
        print(f"  pgbench after: {after:.1f} tps; mean {tps:.1f} tps", flush=True)
        flush_bench_redis()
        times = _latency(config, run_dir, problems)
    finally:
        flush_bench_redis()
    breaches = run_checks()
    problems += [f"ledger_check: {b.check}: {b.detail}" for b in breaches]
    added, direct = times["added"], times["direct"]
    a50, a99 = percentile(added, 50), percentile(added, 99)
    d50, d99 = percentile(direct, 50), percentile(direct, 99)
    print(
        f"  SUCCESS → receiver x{len(added)}: p50 {a50 * 1000:.1f} ms, p99 {a99 * 1000:.1f} ms, "
        f"max {max(added) * 1000:.1f} ms; a POST straight to the receiver p50 "
        f"{d50 * 1000:.2f} ms, p99 {d99 * 1000:.2f} ms; ledger_check: "
        f"{'ok' if not breaches else 'BREACH'}",
        flush=True,
    )
    rows = [
        Row(
            suite="webhooks",
            measurement="deliveries to a loopback receiver",
            value=f"{rate:.0f}/s",
            reference=f"pgbench {tps:.0f} tps",
            ratio=rate / tps,
            notes=notes,
        ),
        Row(
            suite="webhooks",
            measurement=f"task SUCCESS → receiver p50 ({len(added)} tasks)",
            value=f"{a50 * 1000:.1f} ms",
            reference=f"direct POST p50 {d50 * 1000:.2f} ms",
            ratio=a50 / d50,
            notes="finished_at → the receiver's arrival time; the Celery hop after commit",
        ),
        Row(
            suite="webhooks",
            measurement=f"task SUCCESS → receiver p99 ({len(added)} tasks)",
            value=f"{a99 * 1000:.1f} ms",
            reference=f"direct POST p99 {d99 * 1000:.2f} ms",
            ratio=a99 / d99,
            notes=f"max {max(added) * 1000:.1f} ms",
        ),
    ]
    return SuiteResult(rows=rows, ok=not problems, problems=problems)
