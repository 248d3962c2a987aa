"""Fault injection, measured (issue 20): a scripted fault on a real stack, and what it cost.

    make install   # once; then, PostgreSQL's URL in DATABASE_URL (only its server is used):
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/rivya_bench \\
        .venv/bin/python bench/chaos.py --run callbacks|cancel-race [--small]

Each run uses its own scratch database (``rivya_bench_chaos``, created again, dropped at the
end unless ``--keep``) and a **private** ``redis-server`` on a free port (never the shared 6379
that ``make test`` uses), and starts on 127.0.0.1, as ``make run`` does: the sandbox provider,
gunicorn (ASGI; it also receives the sandbox's callbacks), the Celery worker (prefork ×2, both
queues), beat and the submit dispatcher. Every run is bounded in time and ends with
``ledger_check``. The runs so far:

- ``callbacks``: 50 tasks (``--small``: 5) on a copy of ``sandbox-image`` that is polled only
  every 10 minutes and whose jobs do not call back, so that the deliveries decide. Once each job
  has finished upstream, 100 signed deliveries per task are posted in a random order, 16 at a
  time, all tasks mixed: 40 copies of the final delivery under one id, 30 more final ones under
  ids of their own (a provider retrying with new ids), and 30 stale ones (``running`` and
  ``starting``, ids of their own) posted around them. Each distinct delivery id must be stored
  exactly once (61 per task).
- ``worker-kills`` and ``redis-outage``: see their functions' docstrings.
- ``cancel-race``: 200 tasks (``--small``: 20) whose sandbox job finishes after 0-300 ms and
  calls back, each cancelled through the API after 0-300 ms (8 at a time): success and cancel
  race. Either may win; the money must follow the winner.

Printed, and written to ``var/chaos/<run>.json``: the tasks submitted (accepted with 202), those
that reached a terminal state, the time from submit to it (p50, max), the 5xx answers, and the
counts that must be 0:

- **double charges**: tasks with more than one capture, or charged more than their price;
- **double refunds**: tasks whose hold was both captured and released, or whose charge and
  refund do not add up to what was held;
- **lost tasks**: accepted but missing, or not finished when the run ends;
- **stuck holds**: holds still open for a finished task;
- **duplicate upstream jobs**: jobs the sandbox created beyond one per task sent upstream;
- and ``ledger_check``'s breaches.

The exit status is 0 only if all of those are 0. ``tests/chaos/test_chaos.py`` runs each run
``--small`` in ``make test``; ``docs/reliability.md`` has the figures of the full runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from django.utils import timezone

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402 - needs ROOT on sys.path
    DB_PREFIX,
    INHERITED,
    api_key,
    bench_env,
    funded_user,
    percentile,
)
from bench.procs import Processes, free_port, new_webhook_secret, wait_until  # noqa: E402
from bench.scratch import drop_database, recreate_database, url_with_db  # noqa: E402

DATABASE = f"{DB_PREFIX}chaos"
TERMINAL = ("SUCCESS", "FAILED", "REJECTED", "CANCELLED")
SUBJECT = "tasks.task"
RUN_TIMEOUT_S = 300.0
SILENT_MODEL = "sandbox-image-chaos"  # polled every 10 minutes: the deliveries decide


class Stack:
    """The processes of a run and how to reach them."""

    def __init__(self, procs: Processes, api_url: str, sandbox_url: str, secret: str, key: str):
        self.procs = procs
        self.api_url = api_url
        self.sandbox_url = sandbox_url
        self.secret = secret
        self.key = key
        self.kill_dir = Path()  # the worker's FAULT_KILL_DIR (rivya/faults.py)
        self.redis: Any = None  # the private redis-server's Proc
        self.sandbox: Any = None  # the sandbox's Proc
        self.supervisor: Any = None  # the WorkerSupervisor of the Celery worker
        self.redis_url = ""

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.api_url,
            headers={"Authorization": f"Bearer {self.key}"},
            timeout=30,
            trust_env=False,
        )


def setup_django_on(database_url: str, broker: str) -> None:
    """Django in this process on the scratch database and the private Redis (never 6379)."""
    os.environ.update({**bench_env(database_url), "CELERY_BROKER_URL": broker, "REDIS_URL": broker})

    import django
    from django.conf import settings
    from django.core.management import call_command

    django.setup()
    if settings.DATABASES["default"]["NAME"] != DATABASE:  # never into a real database
        raise SystemExit(f"Django points at {settings.DATABASES['default']['NAME']!r}")
    call_command("migrate", verbosity=0, interactive=False)


def private_redis(procs: Processes, port: int | None = None) -> str:
    """A redis-server of the run's own on ``port`` (default: a free one); its URL once up."""
    import redis

    port = port or free_port()
    proc = procs.start(
        "redis",
        [
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
        ],
    )
    client = redis.Redis(host="127.0.0.1", port=port)

    def up() -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    wait_until(up, proc=proc, timeout=20, what="the private redis-server")
    return f"redis://127.0.0.1:{port}/0"


def start_stack(procs: Processes, env: dict[str, str], worker_env: dict[str, str]) -> Stack:
    from tasks.catalog import seed_catalog
    from tasks.models import AIModel

    seed_catalog()
    model = AIModel.objects.get(slug="sandbox-image")
    fields = {
        f.name: getattr(model, f.name)
        for f in AIModel._meta.concrete_fields
        if f.name not in ("id", "created_at", "updated_at")
    }
    fields.update(slug=SILENT_MODEL, name="Sandbox image (chaos)", poll_interval_seconds=600)
    AIModel.objects.create(**fields)
    key = api_key(funded_user("chaos"))
    sandbox_url, sandbox = procs.sandbox(env["SANDBOX_WEBHOOK_SECRET"])
    procs.env["SANDBOX_URL"] = sandbox_url
    api_url, _ = procs.gunicorn(port=int(env["CALLBACK_BASE_URL"].rsplit(":", 1)[1]))
    stack = Stack(procs, api_url, sandbox_url, env["SANDBOX_WEBHOOK_SECRET"], key)
    stack.supervisor = WorkerSupervisor(procs, worker_env)
    procs.celery_beat()
    procs.dispatcher()
    stack.sandbox = sandbox
    return stack


class WorkerSupervisor:
    """The Celery worker under ``rivya.supervise``, as in production: started again whenever
    it exits (Celery's worker exits on an error its consumer cannot recover from; the
    ``redis-outage`` run met one). Its restarts are counted."""

    def __init__(self, procs: Processes, worker_env: dict[str, str]) -> None:
        import itertools
        import threading

        from rivya.supervise import Supervisor

        # Its first start waits until it is ready (a failed start raises there), so any later
        # exit is a crash to restart, however soon it comes: the redis-outage run met one 6 s
        # after the start.
        self.supervisor = Supervisor(
            min_uptime=0, log=lambda line: print(f"[chaos] {line}", flush=True)
        )
        self._stop = threading.Event()
        names = itertools.count(1)

        def start() -> Any:
            n = next(names)
            return procs.celery_worker(
                pool="prefork",
                concurrency=2,
                name="worker" if n == 1 else f"worker-{n}",
                wait=n == 1,
                **worker_env,
            ).popen

        self.child = self.supervisor.add("the Celery worker", start)
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            self.supervisor.poll()  # restarts only: with min_uptime 0 nothing is a failed start

    @property
    def restarts(self) -> int:
        return self.child.starts - 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def submit(client: httpx.Client, model: str, params: dict[str, Any], tally: dict[str, int]) -> str:
    answer = client.post(
        "/api/v1/tasks/", json={"model": model, "prompt": "chaos", "params": params}
    )
    count(tally, answer)
    if answer.status_code != 202:
        raise RuntimeError(f"submit answered {answer.status_code}: {answer.text[:300]}")
    return str(answer.json()["id"])


def count(tally: dict[str, int], answer: httpx.Response) -> None:
    """Count an answer; a 5xx is one unless it is a 503 saying why (a clean refusal)."""
    tally["requests"] = tally.get("requests", 0) + 1
    if answer.status_code < 500:
        return
    try:
        reason = answer.json().get("error", {}).get("code")
    except ValueError:
        reason = None
    key = "refused_503" if answer.status_code == 503 and reason else "5xx"
    tally[key] = tally.get(key, 0) + 1


def wait_terminal(ids: list[str], timeout: float) -> None:
    from tasks.models import Task

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if Task.objects.filter(pk__in=ids, status__in=TERMINAL).count() == len(ids):
            return
        time.sleep(0.5)


# --- the runs ------------------------------------------------------------------------------


def signed_delivery(secret: str, job: dict[str, Any], msg_id: str) -> tuple[bytes, dict[str, str]]:
    """A Standard Webhooks delivery of ``job``, as the sandbox signs its callbacks."""
    from standardwebhooks import Webhook

    at = datetime.now(tz=UTC)
    body = json.dumps({"type": "job.updated", "data": job}).encode()
    return body, {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, at, body.decode()),
    }


def run_callbacks(stack: Stack, small: bool, tally: dict[str, int]) -> list[str]:
    from tasks.models import Task

    tasks = 5 if small else 50
    params = {"width": 64, "height": 64, "sandbox_callback": "none", "sandbox_latency_ms": 0}
    with stack.client() as client:
        ids = [submit(client, SILENT_MODEL, params, tally) for _ in range(tasks)]

    def generating() -> bool:
        return Task.objects.filter(pk__in=ids, status="GENERATING").count() == len(ids)

    deadline = time.monotonic() + 60
    while not generating() and time.monotonic() < deadline:
        time.sleep(0.2)
    deliveries: list[tuple[bytes, dict[str, str]]] = []
    with httpx.Client(trust_env=False, timeout=30) as sandbox:
        for task in Task.objects.filter(pk__in=ids):
            job = sandbox.get(f"{stack.sandbox_url}/v1/jobs/{task.upstream_id}").json()
            uid = task.upstream_id

            def signed(data: dict[str, Any], msg_id: str) -> tuple[bytes, dict[str, str]]:
                return signed_delivery(stack.secret, data, msg_id)

            deliveries += [signed(job, f"msg_{uid}_final")] * 40
            deliveries += [signed(job, f"msg_{uid}_retry_{n}") for n in range(30)]
            deliveries += [
                signed(
                    {**job, "status": random.choice(("running", "starting"))}, f"msg_{uid}_old_{n}"
                )
                for n in range(30)
            ]
    random.shuffle(deliveries)
    url = f"{stack.api_url}/api/v1/callbacks/sandbox/"
    with httpx.Client(trust_env=False, timeout=30) as client, ThreadPoolExecutor(16) as pool:

        def post(delivery: tuple[bytes, dict[str, str]]) -> None:
            count(tally, client.post(url, content=delivery[0], headers=delivery[1]))

        list(pool.map(post, deliveries))
    tally["deliveries"] = len(deliveries)
    wait_terminal(ids, 120)
    # Each distinct delivery id stored once: 1 final, 30 retries, 30 stale per task.
    from tasks.models import CallbackDelivery

    upstream_ids = Task.objects.filter(pk__in=ids).values_list("upstream_id", flat=True)
    tally["deliveries_stored"] = CallbackDelivery.objects.filter(
        provider="sandbox", upstream_id__in=list(upstream_ids)
    ).count()
    tally["deliveries_distinct"] = 61 * len(ids)
    return ids


def run_cancel_race(stack: Stack, small: bool, tally: dict[str, int]) -> list[str]:
    """Each task's cancel is aimed at the moment its job finishes upstream: once the task is
    GENERATING (the job started), wait the job's latency, minus 50 ms to plus 250 ms, then
    cancel. The success (the callback, or a poll) and the cancel race for the task."""
    from tasks.models import Task

    tasks = 20 if small else 200
    rng = random.Random(20)
    plans = [(rng.randint(50, 250), rng.randint(-50, 250) / 1000) for _ in range(tasks)]

    def one(plan: tuple[int, float]) -> str:
        latency, jitter = plan
        with stack.client() as client:
            task_id = submit(
                client,
                "sandbox-image",
                {"width": 64, "height": 64, "sandbox_latency_ms": latency},
                tally,
            )
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                status = Task.objects.filter(pk=task_id).values_list("status", flat=True).get()
                if status != "WAITING":
                    break
                time.sleep(0.005)
            time.sleep(max(0.0, latency / 1000 + jitter))
            answer = client.post(f"/api/v1/tasks/{task_id}/cancel/")
            count(tally, answer)
            key = f"cancel_{answer.status_code}"
            tally[key] = tally.get(key, 0) + 1
        return task_id

    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(one, plans))
    wait_terminal(ids, 120)
    return ids


def wait_for_text(path: Path, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return path.read_text()
        time.sleep(0.01)
    return ""


def run_worker_kills(stack: Stack, small: bool, tally: dict[str, int]) -> list[str]:
    """The worker killed with SIGKILL at each of ``rivya.faults.POINTS``, 30 times each (2 with
    ``--small``): for each kill, the point is armed, one task submitted, and the run waits
    until the worker killed itself there (Celery's main process starts a new child). Recovery
    is the product's: the submit message redelivered (``acks_late``), the callback's retry, the
    poll. A kill while storing outputs leaves the task's output lease (300 s) to run out; the
    run ends that lease at once, as if it had (so the time to terminal leaves it out), and
    counts those tasks."""
    from rivya.faults import POINTS
    from tasks.models import Task

    per_point = 2 if small else 30
    ids: list[str] = []
    victims: dict[str, set[str]] = {point: set() for point in POINTS}
    params = {"width": 64, "height": 64, "sandbox_latency_ms": 0}
    with stack.client() as client:
        for point in POINTS:
            for _ in range(per_point):
                armed = stack.kill_dir / point
                hit = stack.kill_dir / f"{point}.killed"
                hit.unlink(missing_ok=True)
                armed.touch()
                task_id = submit(client, "sandbox-image", params, tally)
                ids.append(task_id)
                deadline = time.monotonic() + 30
                while armed.exists() and time.monotonic() < deadline:
                    time.sleep(0.02)
                if armed.exists():
                    armed.unlink()
                    tally["not_killed"] = tally.get("not_killed", 0) + 1
                    continue
                tally[f"killed_{point}"] = tally.get(f"killed_{point}", 0) + 1
                # The kill may hit another task than the one just submitted (one recovering
                # from an earlier kill passes the same point): the point says which.
                victim = wait_for_text(hit)
                victims[point].add(victim)
                if victim != task_id:
                    tally["kills_of_an_earlier_task"] = tally.get("kills_of_an_earlier_task", 0) + 1
                if point != "after_upstream_accept":
                    tally["output_leases_ended"] = tally.get("output_leases_ended", 0) + 1
                    Task.objects.filter(pk=victim, output_lease_until__isnull=False).update(
                        output_lease_until=timezone.now()
                    )
    for point, hit_tasks in victims.items():
        tally[f"tasks_killed_{point}"] = len(hit_tasks)
    wait_terminal(ids, 180)
    return ids


def run_redis_outage(stack: Stack, small: bool, tally: dict[str, int]) -> list[str]:
    """A steady submit load (4 clients, a submit every 50 ms each); after 10 s the private
    redis-server is killed for 60 s (``--small``: 5 s), then started again on the same port,
    empty; the load goes on 15 s more. Midway through the outage the Celery worker's main
    process is killed too, as Celery's reconnection crash does now and then
    (docs/reliability.md): its supervisor must start it again. Every submit must be answered
    202, or refused cleanly (a 4xx, or a 503 with an error code), never with another 5xx;
    every accepted task must finish."""
    import signal
    from urllib.parse import urlsplit

    before, outage, after = (3.0, 5.0, 5.0) if small else (10.0, 60.0, 15.0)
    params = {"width": 64, "height": 64, "sandbox_latency_ms": 0}
    load, ids = steady_load(stack, tally, params, every=0.05)
    try:
        time.sleep(before)
        stack.redis.popen.kill()
        stack.redis.popen.wait(timeout=10)
        time.sleep(outage / 2)
        worker = stack.supervisor.child.pid
        if worker is not None and stack.supervisor.child.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker, signal.SIGKILL)
            tally["worker_killed"] = 1
        time.sleep(outage / 2)
        private_redis(stack.procs, port=urlsplit(stack.redis_url).port)
        time.sleep(after)
    finally:
        load.stop()
    wait_terminal(ids, 180)
    return ids


def steady_load(
    stack: Stack, tally: dict[str, int], params: dict[str, Any], every: float
) -> tuple[Any, list[str]]:
    """Four clients submitting one task each every ``every`` seconds until the returned event
    is set; the ids of the accepted tasks. Each answer is counted in ``tally``."""
    import threading

    stop = threading.Event()
    ids: list[str] = []
    lock = threading.Lock()

    def load() -> None:
        with stack.client() as client:
            while not stop.is_set():
                try:
                    answer = client.post(
                        "/api/v1/tasks/",
                        json={"model": "sandbox-image", "prompt": "chaos", "params": params},
                    )
                except httpx.HTTPError:
                    with lock:
                        tally["no_answer"] = tally.get("no_answer", 0) + 1
                    continue
                with lock:
                    count(tally, answer)
                    key = f"submit_{answer.status_code}"
                    tally[key] = tally.get(key, 0) + 1
                    if answer.status_code == 202:
                        ids.append(str(answer.json()["id"]))
                time.sleep(every)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()

    class Load:
        def stop(self) -> None:
            stop.set()
            for thread in threads:
                thread.join(timeout=60)

    return Load(), ids


def run_sandbox_outage(stack: Stack, small: bool, tally: dict[str, int]) -> list[str]:
    """Tasks whose jobs take 1 s, submitted steadily (4 clients, one every 200 ms each); after
    10 s the sandbox process is killed for 60 s (``--small``: 5 s), then started again on the
    same port, with none of its jobs (it keeps them in memory); the load goes on 20 s more.
    Submits must be answered; every accepted task must finish: SUCCESS, or FAILED and refunded
    when its job was lost with the sandbox."""
    before, outage, after = (3.0, 5.0, 5.0) if small else (10.0, 60.0, 20.0)
    params = {"width": 64, "height": 64, "sandbox_latency_ms": 1000}
    port = int(stack.sandbox_url.rsplit(":", 1)[1])
    load, ids = steady_load(stack, tally, params, every=0.2)
    try:
        time.sleep(before)
        stack.sandbox.popen.kill()
        stack.sandbox.popen.wait(timeout=10)
        time.sleep(outage)
        _, stack.sandbox = stack.procs.sandbox(stack.secret, port=port)
        time.sleep(after)
    finally:
        load.stop()
    wait_terminal(ids, 240)
    return ids


def run_pg_terminate(stack: Stack, small: bool, tally: dict[str, int]) -> list[str]:
    """A steady submit load (4 clients, a task every 100 ms each, jobs of 200 ms); every 2 s
    for 60 s (``--small``: 10 s), every other connection to the run's database is terminated
    (``pg_terminate_backend``): the web's, the worker's, beat's and the dispatcher's, whatever
    they are doing. Then the load goes on 10 s more. Submits must be answered without a 5xx;
    every accepted task must finish."""
    from django.db import connection

    duration = 10.0 if small else 60.0
    params = {"width": 64, "height": 64, "sandbox_latency_ms": 200}
    load, ids = steady_load(stack, tally, params, every=0.1)
    try:
        deadline = time.monotonic() + duration
        while time.monotonic() < deadline:
            time.sleep(2)
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
                tally["terminated"] = tally.get("terminated", 0) + cursor.fetchone()[0]
        time.sleep(10)
    finally:
        load.stop()
    wait_terminal(ids, 180)
    return ids


RUNS: dict[str, Any] = {
    "callbacks": run_callbacks,
    "cancel-race": run_cancel_race,
    "worker-kills": run_worker_kills,
    "redis-outage": run_redis_outage,
    "sandbox-outage": run_sandbox_outage,
    "pg-terminate": run_pg_terminate,
}


# --- what it cost ---------------------------------------------------------------------------


def outcome(ids: list[str], tally: dict[str, int]) -> dict[str, Any]:
    from django.db.models import Count

    from billing.invariants import run_checks
    from billing.models import Hold, LedgerTransaction
    from tasks.models import Task

    rows = {str(t.pk): t for t in Task.objects.filter(pk__in=ids)}
    finished = [t for t in rows.values() if t.status in TERMINAL and t.finished_at]
    captures = dict(
        LedgerTransaction.objects.filter(
            kind=LedgerTransaction.Kind.CAPTURE, subject_type=SUBJECT, subject_id__in=ids
        )
        .values_list("subject_id")
        .annotate(n=Count("id"))
    )
    holds = {h.subject_id: h for h in Hold.objects.filter(subject_type=SUBJECT, subject_id__in=ids)}
    double_charges = sum(
        1
        for task_id, task in rows.items()
        if captures.get(task_id, 0) > 1 or task.charged_micro > task.price_micro
    )
    double_refunds = sum(
        1
        for task_id, task in rows.items()
        if task.status in TERMINAL
        and (
            task.charged_micro + task.refunded_micro != task.reserved_micro
            or (
                task_id in holds
                and holds[task_id].status == Hold.Status.RELEASED
                and holds[task_id].captured
            )
        )
    )
    stuck = sum(
        1
        for task_id, hold in holds.items()
        if hold.status == Hold.Status.OPEN and rows[task_id].status in TERMINAL
    )
    seconds = [(t.finished_at - t.created_at).total_seconds() for t in finished]
    breaches = run_checks()
    statuses: dict[str, int] = {}
    errors: dict[str, int] = {}
    for task in rows.values():
        statuses[task.status] = statuses.get(task.status, 0) + 1
        if task.error_code:
            errors[task.error_code] = errors.get(task.error_code, 0) + 1
    return {
        "submitted": len(ids),
        "terminal": len(finished),
        "statuses": statuses,
        "error_codes": errors,
        "to_terminal_p50_s": round(percentile(seconds, 50), 3) if seconds else None,
        "to_terminal_max_s": round(max(seconds), 3) if seconds else None,
        "double_charges": double_charges,
        "double_refunds": double_refunds,
        "lost_tasks": len(ids) - len(finished),
        "stuck_holds": stuck,
        "answers_5xx": tally.get("5xx", 0),
        "ledger_breaches": [f"{b.check}: {b.detail}" for b in breaches],
        "tally": tally,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", choices=sorted(RUNS), required=True)
    parser.add_argument("--small", action="store_true", help="the CI size: a few tasks")
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    args = parser.parse_args(argv)
    url = os.environ.get("DATABASE_URL")
    if not url:
        raise SystemExit("DATABASE_URL: the PostgreSQL server to use (only its server)")
    recreate_database(url, DATABASE)
    run_dir = ROOT / "var" / "chaos" / args.run
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        with Processes(run_dir, {k: os.environ[k] for k in INHERITED if k in os.environ}) as procs:
            broker = private_redis(procs)
            stack_redis = [p for p in procs.procs if p.name == "redis"]
            setup_django_on(url_with_db(url, DATABASE), broker)
            port = free_port()
            env = {
                **bench_env(url_with_db(url, DATABASE)),
                "CELERY_BROKER_URL": broker,
                "REDIS_URL": broker,
                "SANDBOX_WEBHOOK_SECRET": new_webhook_secret(),
                "CALLBACK_BASE_URL": f"http://127.0.0.1:{port}",
                "MEDIA_ROOT": str(run_dir / "media"),
                "TASK_RECONCILE_EVERY": "2",
                # One user submits every task of a run: the per-user limit (20 running) is not
                # what is under test.
                "TASK_MAX_RUNNING_PER_USER": "1000",
            }
            procs.env = env
            kill_dir = run_dir / "armed"
            kill_dir.mkdir(exist_ok=True)
            stack = start_stack(procs, env, {"FAULT_KILL_DIR": str(kill_dir)})
            stack.kill_dir = kill_dir
            stack.redis = stack_redis[0]
            stack.redis_url = broker
            tally: dict[str, int] = {}
            try:
                ids = RUNS[args.run](stack, args.small, tally)
            finally:  # before the processes are stopped: no restart may outlive the run
                stack.supervisor.stop()
            tally["worker_restarts"] = stack.supervisor.restarts
            result = outcome(ids, tally)
            # Jobs the provider created beyond one per task sent upstream (each would be paid
            # for upstream): the task's id is the idempotency key of its submit.
            from tasks.models import Task

            created = httpx.get(f"{stack.sandbox_url}/v1/stats", trust_env=False).json()
            sent = Task.objects.filter(pk__in=ids).exclude(upstream_id="").count()
            # Not measurable once the sandbox restarted: it forgot its jobs and its counts.
            result["duplicate_upstream_jobs"] = (
                None if args.run == "sandbox-outage" else created["jobs_created"] - sent
            )
    finally:
        from django.db import connections

        connections.close_all()
        if not args.keep:
            drop_database(url, DATABASE)
    result["run"] = args.run
    result["small"] = args.small
    result["seconds"] = round(time.monotonic() - started, 1)
    (ROOT / "var" / "chaos" / f"{args.run}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2), flush=True)
    bad = [
        name
        for name in (
            "double_charges",
            "double_refunds",
            "lost_tasks",
            "stuck_holds",
            "answers_5xx",
            "duplicate_upstream_jobs",
        )
        if result[name]  # None: not measured in this run
    ] + (["ledger_check"] if result["ledger_breaches"] else [])
    if tally.get("deliveries_stored", 0) != tally.get("deliveries_distinct", 0):
        bad.append("a delivery stored other than once")
    if tally.get("worker_killed") and not tally.get("worker_restarts"):
        bad.append("the killed worker was not started again")
    if tally.get("not_killed"):
        bad.append("a fault point was armed but never reached")
    if bad:
        print(f"FAILED: {', '.join(bad)}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
