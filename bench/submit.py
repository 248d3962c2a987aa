"""Submit throughput through the HTTP API: ``POST /api/v1/tasks/`` served by gunicorn (as ``make
run``: ASGI, 2 uvicorn workers; ``--server wsgi``: the earlier gthread 2 × 8), driven by
a separate load process (``bench/load.py``), next to pgbench's TPC-B-like tps at the same client
count, measured just before and just after in the same run.

Runs in a suite process whose Django points at the scratch database ``rivya_bench_submit``. No
Celery worker runs: a submit validates, records the task, holds its credits and enqueues the
upstream submission in Redis (db 9, flushed before and after); nothing consumes it. With no
worker every submitted task stays ``WAITING``, so the bench server runs with
``TASK_MAX_RUNNING_PER_USER`` and ``TASK_MAX_RUNNING`` set far above what a run can submit: the
capacity checks still run (two COUNTs per submit), they never refuse.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    ROOT,
    Row,
    SuiteConfig,
    SuiteResult,
    api_key,
    bench_env,
    cpu_cores,
    cpu_report,
    cpu_sample,
    flush_bench_redis,
    funded_user,
    percentile,
    pids_named,
    top_others,
    tree_pids,
)
from bench.procs import Processes
from bench.scratch import Pgbench, url_with_db

NO_LIMIT = str(10**9)
WARMUP_SECONDS = 2
BODY = {
    "model": "sandbox-image",
    "prompt": "a lighthouse at dusk, bench",
    "params": {"width": 512, "height": 512},
}


@dataclass
class LoadResult:
    seconds: float
    cpu_seconds: float
    statuses: dict[str, int]
    latencies: list[float]
    samples: list[str]
    errors: list[str]
    stuck: int
    cpu_line: str = ""
    cores: dict[str, float] | None = None


def run_load(
    config: SuiteConfig,
    url: str,
    spec: dict[str, Any],
    seconds: float,
    gunicorn_pid: int,
    tag: str,
    extra: dict[str, Callable[[], list[int]]] | None = None,
) -> LoadResult:
    """Run ``bench/load.py`` (``spec``: its ``path``, ``expect`` and ``keys`` + ``body`` or
    ``requests``) and sample CPU of gunicorn, PostgreSQL, Redis, the load process and ``extra``
    over the window it reports (between its START and END lines)."""
    run_dir = Path(config.run_dir)
    load_config = run_dir / f"load-{tag}.json"
    load_out = run_dir / f"load-{tag}-out.json"
    load_config.write_text(
        json.dumps(
            {
                "url": url,
                "threads": config.clients,
                "seconds": seconds,
                "keepalive": config.submit_keepalive,
                **spec,
            }
        )
    )
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "load.py"), str(load_config), str(load_out)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    groups: dict[str, Callable[[], list[int]]] = {
        "gunicorn": lambda: tree_pids(gunicorn_pid),
        "postgres": lambda: pids_named("postgres"),
        "redis": lambda: pids_named("redis-server"),
        "load client": lambda: [proc.pid],
        **(extra or {}),
    }
    # Each gunicorn worker too (GIL: at most about one core each); already counted above.
    workers = [pid for pid in tree_pids(gunicorn_pid) if pid != gunicorn_pid]
    for n, pid in enumerate(sorted(workers), start=1):
        groups[f"(gunicorn worker {n}"] = lambda pid=pid: [pid]
    before = after = None
    started = ended = 0.0
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # bounded: the load process prints two lines and exits
            if line.strip() == "START":
                before, started = cpu_sample(groups), time.perf_counter()
            elif line.strip() == "END":
                after, ended = cpu_sample(groups), time.perf_counter()
        proc.wait(timeout=seconds + 180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    if proc.returncode != 0 or not load_out.exists():
        raise RuntimeError(f"the load process failed (exit {proc.returncode})")
    result = LoadResult(**json.loads(load_out.read_text()))
    if before is not None and after is not None and ended > started:
        result.cpu_line = cpu_report(before, after, ended - started)
        result.cpu_line += f" (busiest others: {top_others(before, after, ended - started)})"
        result.cores = cpu_cores(before, after, ended - started)
    return result


def check_load(result: LoadResult, what: str, expect: str = "202") -> list[str]:
    problems = []
    if result.errors:
        problems.append(f"{what}: client errors: {result.errors[:3]}")
    if result.stuck:
        problems.append(f"{what}: {result.stuck} client thread(s) did not finish")
    others = {s: n for s, n in result.statuses.items() if s != expect}
    if others:
        problems.append(f"{what}: answers other than {expect}: {others}; e.g. {result.samples[:2]}")
    return problems


def run(config: SuiteConfig) -> SuiteResult:
    from billing.invariants import run_checks
    from tasks.catalog import seed_catalog
    from tasks.models import Task

    seed_catalog()
    keys = [api_key(funded_user(f"bench-submit-{n}")) for n in range(config.clients)]
    pgbench = Pgbench(
        url=config.url, database=config.pgbench_database, executable=config.pgbench_executable
    )
    env = {
        **bench_env(url_with_db(config.url, config.database)),
        "TASK_MAX_RUNNING_PER_USER": NO_LIMIT,
        "TASK_MAX_RUNNING": NO_LIMIT,
        "SANDBOX_URL": "http://127.0.0.1:9",  # nowhere: nothing may call the provider here
        "MEDIA_ROOT": str(Path(config.run_dir) / "media"),
    }
    flush_bench_redis()
    problems: list[str] = []
    try:
        with Processes(Path(config.run_dir), env) as procs:
            url, gunicorn = procs.gunicorn(server=config.server)
            # Warm up: every gunicorn thread opens its database connection, code paths load.
            spec = {"path": "/api/v1/tasks/", "keys": keys, "body": BODY, "expect": 202}
            warmup = run_load(config, url, spec, WARMUP_SECONDS, gunicorn.pid, "warmup")
            problems += check_load(warmup, "warm-up")
            before = pgbench.tpcb_tps(clients=config.clients, seconds=config.seconds)
            print(f"  pgbench before: {before:.1f} tps", flush=True)
            result = run_load(config, url, spec, config.seconds, gunicorn.pid, "measure")
            problems += check_load(result, "submit")
            after = pgbench.tpcb_tps(clients=config.clients, seconds=config.seconds)
            print(f"  pgbench after: {after:.1f} tps", flush=True)
    finally:
        flush_bench_redis()

    accepted = result.statuses.get("202", 0)
    rate = accepted / result.seconds if result.seconds > 0 else 0.0
    tps = (before + after) / 2
    p50, p99 = percentile(result.latencies, 50), percentile(result.latencies, 99)
    client_cores = result.cpu_seconds / result.seconds if result.seconds > 0 else 0.0
    print(
        f"  submit: {accepted} accepted in {result.seconds:.2f} s = {rate:.1f}/s; "
        f"response p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms; "
        f"load client {client_cores:.2f} cores",
        flush=True,
    )
    if result.cpu_line:
        print(f"  {result.cpu_line}", flush=True)

    stored = Task.objects.filter(status=Task.Status.WAITING).count()
    expected = accepted + warmup.statuses.get("202", 0)
    if stored != expected:
        problems.append(f"counted {expected} accepted submits, the database has {stored} tasks")
    breaches = run_checks()
    problems += [f"ledger_check: {b.check}: {b.detail}" for b in breaches]
    print(f"  tasks stored: {stored}; ledger_check: {'ok' if not breaches else 'BREACH'}")

    cores = result.cores or {}
    notes = (
        f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms; cores: gunicorn "
        f"{cores.get('gunicorn', 0):.2f}, postgres {cores.get('postgres', 0):.2f}, "
        f"load {cores.get('load client', 0):.2f}, other {cores.get('other processes', 0):.2f}"
    )
    rows = [
        Row(
            suite="submit",
            measurement=f"POST /api/v1/tasks/, {config.clients} clients"
            + (", keep-alive" if config.submit_keepalive else ""),
            value=f"{rate:.0f} submits/s",
            reference=f"pgbench {tps:.0f} tps",
            ratio=rate / tps if tps else None,
            notes=notes,
        )
    ]
    return SuiteResult(rows=rows, ok=not problems, problems=problems)
