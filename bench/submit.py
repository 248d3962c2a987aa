"""Submit throughput (issue 18): ``POST /api/v1/tasks/`` served by gunicorn, against a bare WSGI
app doing one pgbench TPC-B-like transaction per request (``bench/bare_wsgi.py``) served by the
same gunicorn command line and driven by the same load client, and against pgbench itself.

For each server configuration (``--submit-servers``, default ``sync,gthread``: gunicorn
``-k sync -w 4`` and ``-k gthread -w 2 --threads 4``, ``bench.procs.WSGI_SERVERS``), three
windows, each after a warm-up of its own, all with keep-alive clients (``--submit-close``: one
connection per request; gunicorn's sync worker closes every connection anyway):

(a) the bare WSGI app (``bench.bare_wsgi:application`` on ``rivya_bench_pgbench``);
(b) ``POST /api/v1/tasks/`` on ``rivya.wsgi:application``;
(c) the same submit with a unique ``Idempotency-Key`` per request.

pgbench's TPC-B-like tps at the same client count is measured before the first window and after
the last one. Printed per configuration: submit ÷ bare WSGI (target ≥ 0.5, aim 0.6), submit ÷
pgbench, idempotent submit ÷ bare WSGI (target ≥ 0.35). A missed target is printed (BELOW
TARGET) and listed under the summary table; it does not fail the suite, whose checks are about
correctness: every answer 202 (200 from the bare app), the database holds exactly the accepted
tasks (warm-ups included) and one idempotency record per accepted keyed submit, ``ledger_check``
clean.

Rivya's environment is only ``SECRET_KEY``, ``DATABASE_URL`` and ``REDIS_URL``, plus
``CELERY_BROKER_URL`` (the bench Redis, db 9, flushed before and after) and the capacity limits
``TASK_MAX_RUNNING_PER_USER`` / ``TASK_MAX_RUNNING`` set far above what a run can submit: no
Celery worker runs, so the tasks never finish (the capacity checks still run, they never refuse).

The outbox dispatcher (``python manage.py dispatch_submits``, which hands committed tasks to
Celery) does not run during the measured windows, as no worker does: it is the first step of
the task's way upstream, not of the request. After each configuration's windows it is started
with the same environment and timed while it empties the outbox ("dispatched N in S s = R/s,
X ms CPU per task"); the suite fails if any task is left in the outbox after
``DISPATCH_WAIT_S``. The messages in the broker's ``celery`` list must equal the tasks stored.

``--server asgi`` / ``--server wsgi`` (or ``--submit-servers asgi``) still measure the earlier
servers (``make run``'s ASGI; gthread 2 × 8): submits only, against pgbench.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    BENCH_REDIS_URL,
    INHERITED,
    ROOT,
    SECRET_KEY,
    Row,
    SuiteConfig,
    SuiteResult,
    api_key,
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
from bench.procs import WSGI_SERVERS, Proc, Processes
from bench.scratch import Pgbench, url_with_db

NO_LIMIT = str(10**9)
WARMUP_SECONDS = 2
NOT_QUIET_CORES = 0.3  # other processes busier than this during a window: said in its notes
DISPATCH_WAIT_S = 30.0
TARGET_SUBMIT = 0.5  # submit ÷ bare WSGI
AIM_SUBMIT = 0.6
TARGET_IDEMPOTENT = 0.35  # submit with Idempotency-Key ÷ bare WSGI
SERVER_LABELS = {
    "sync": "sync -w 4",
    "gthread": "gthread -w 2 --threads 4",
    "asgi": "ASGI (make run)",
    "wsgi": "gthread 2x8 (earlier)",
}
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
    ``requests``; ``keepalive`` defaults to ``--submit-keepalive``) and sample CPU of gunicorn,
    PostgreSQL, Redis, the load process and ``extra`` over the window it reports (between its
    START and END lines)."""
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


@dataclass
class Window:
    """One measured window: its answers, rate and CPU."""

    what: str
    result: LoadResult
    expect: str

    @property
    def ok_count(self) -> int:
        return self.result.statuses.get(self.expect, 0)

    @property
    def rate(self) -> float:
        return self.ok_count / self.result.seconds if self.result.seconds > 0 else 0.0

    def cores(self, group: str) -> float:
        return (self.result.cores or {}).get(group, 0.0)

    def cpu_ms(self, group: str = "gunicorn") -> float:
        """CPU milliseconds of ``group`` per answered request."""
        return self.cores(group) / self.rate * 1000 if self.rate else 0.0

    def notes(self, extra: str = "") -> str:
        lat = self.result.latencies
        p50, p99 = (percentile(lat, 50), percentile(lat, 99)) if lat else (0.0, 0.0)
        parts = [
            f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms",
            f"gunicorn {self.cores('gunicorn'):.2f} cores = {self.cpu_ms():.1f} ms/req",
            f"postgres {self.cores('postgres'):.2f}",
        ]
        if "dispatcher" in (self.result.cores or {}):
            parts.append(
                f"dispatcher {self.cores('dispatcher'):.2f} = "
                f"{self.cpu_ms('dispatcher'):.1f} ms/req"
            )
        parts.append(f"load {self.cores('load client'):.2f}")
        if self.cores("other processes") > NOT_QUIET_CORES:
            parts.append(f"NOT QUIET: other processes {self.cores('other processes'):.2f}")
        return "; ".join(([extra] if extra else []) + parts)


@dataclass
class ServerRun:
    server: str
    bare: Window | None = None
    submit: Window | None = None
    idempotent: Window | None = None
    accepted: int = 0  # 202s of submits, warm-ups included
    accepted_keyed: int = 0  # of which with an Idempotency-Key
    dispatch: str = ""
    problems: list[str] = field(default_factory=list)


def rivya_env(config: SuiteConfig) -> dict[str, str]:
    """Rivya's environment: the process basics (``PATH``, ``HOME``, locale) and only the
    settings the issue allows."""
    return {
        **{name: os.environ[name] for name in INHERITED if name in os.environ},
        "SECRET_KEY": SECRET_KEY,
        "DATABASE_URL": url_with_db(config.url, config.database),
        "REDIS_URL": BENCH_REDIS_URL,
        "CELERY_BROKER_URL": BENCH_REDIS_URL,
        "TASK_MAX_RUNNING_PER_USER": NO_LIMIT,
        "TASK_MAX_RUNNING": NO_LIMIT,
    }


def bare_env(config: SuiteConfig) -> dict[str, str]:
    return {
        **{name: os.environ[name] for name in INHERITED if name in os.environ},
        "BARE_DATABASE_URL": url_with_db(config.url, config.pgbench_database),
    }


def _window(
    config: SuiteConfig,
    url: str,
    spec: dict[str, Any],
    gunicorn: Proc,
    tag: str,
    what: str,
    expect: str,
    extra: dict[str, Callable[[], list[int]]] | None,
    problems: list[str],
) -> tuple[LoadResult, Window]:
    """A warm-up, then the measured window, of the same load."""
    warm = run_load(
        config,
        url,
        spec | {"idempotency_prefix": f"{tag}-w"},
        WARMUP_SECONDS,
        gunicorn.pid,
        f"{tag}-warmup",
        extra,
    )
    problems += check_load(warm, f"{what} warm-up", expect)
    result = run_load(
        config, url, spec | {"idempotency_prefix": tag}, config.seconds, gunicorn.pid, tag, extra
    )
    problems += check_load(result, what, expect)
    window = Window(what=what, result=result, expect=expect)
    print(
        f"  {what}: {window.ok_count} in {result.seconds:.2f} s = {window.rate:.1f}/s; "
        f"{window.notes()}",
        flush=True,
    )
    if result.cpu_line:
        print(f"    {result.cpu_line}", flush=True)
    return warm, window


def _unqueued() -> int:
    """Tasks still in the outbox (not handed to Celery yet)."""
    from tasks.models import SubmitOutbox

    return SubmitOutbox.objects.count()


def _broker_messages() -> int:
    import redis

    return int(redis.Redis.from_url(BENCH_REDIS_URL).llen("celery"))


def measure_server(
    config: SuiteConfig, server: str, keys: list[str], keepalive: bool, run_dir: Path
) -> ServerRun:
    from tasks.models import Task

    out = ServerRun(server=server)
    label = SERVER_LABELS[server]
    base = {"keys": keys, "body": BODY, "keepalive": keepalive}
    if server in WSGI_SERVERS:
        with Processes(run_dir, bare_env(config)) as procs:
            url, gunicorn = procs.gunicorn_wsgi(
                "bench.bare_wsgi:application",
                server,
                name=f"bare-{server}",
                ready_path="/",
            )
            spec = {**base, "path": "/bare/", "expect": 200}
            _, out.bare = _window(
                config,
                url,
                spec,
                gunicorn,
                f"bare-{server}",
                f"bare WSGI, {label}",
                "200",
                None,
                out.problems,
            )
    with Processes(run_dir, rivya_env(config)) as procs:
        extra: dict[str, Callable[[], list[int]]] = {}
        if server in WSGI_SERVERS:
            url, gunicorn = procs.gunicorn_wsgi(
                "rivya.wsgi:application",
                server,
                name=f"rivya-{server}",
                ready_path="/api/v1/models/",
            )
        else:
            url, gunicorn = procs.gunicorn(server=server)
        spec = {**base, "path": "/api/v1/tasks/", "expect": 202}
        tasks_before = Task.objects.count()
        warm, out.submit = _window(
            config,
            url,
            spec,
            gunicorn,
            f"submit-{server}",
            f"submit, {label}",
            "202",
            extra,
            out.problems,
        )
        out.accepted += warm.statuses.get("202", 0) + out.submit.ok_count
        spec = {**spec, "idempotency": True}
        warm, out.idempotent = _window(
            config,
            url,
            spec,
            gunicorn,
            f"idem-{server}",
            f"submit + Idempotency-Key, {label}",
            "202",
            extra,
            out.problems,
        )
        keyed = warm.statuses.get("202", 0) + out.idempotent.ok_count
        out.accepted += keyed
        out.accepted_keyed = keyed
        out.dispatch = time_dispatcher(procs, server, Task.objects.count() - tasks_before)
        print(f"  {out.dispatch}", flush=True)
    return out


def time_dispatcher(procs: Processes, server: str, submitted: int) -> str:
    """Start the dispatcher and wait (bounded) until the outbox is empty: 'dispatched N in S s
    = R/s, X ms CPU per task' (its process's CPU over that time)."""
    pending = _unqueued()
    dispatcher = procs.dispatcher(f"dispatcher-{server}")
    groups = {"dispatcher": lambda: tree_pids(dispatcher.pid)}
    before, started = cpu_sample(groups), time.monotonic()
    left = pending
    while left and time.monotonic() - started < DISPATCH_WAIT_S and dispatcher.alive():
        time.sleep(0.05)
        left = _unqueued()
    after, waited = cpu_sample(groups), time.monotonic() - started
    cpu = cpu_cores(before, after, waited)["dispatcher"] * waited
    done = pending - left
    line = (
        f"dispatched {done} of {pending} in {waited:.2f} s = {done / waited:.0f}/s, "
        f"{1000 * cpu / max(done, 1):.2f} ms CPU per task ({submitted} submitted here; "
        "the dispatcher started after the load, as a worker would)"
    )
    if left:
        line += f"; {left} still in the outbox after {DISPATCH_WAIT_S:.0f} s"
        if not dispatcher.alive():
            line += f"; the dispatcher exited:\n{dispatcher.tail()}"
    return line


def _verdict(ratio: float, target: float, aim: float | None = None) -> str:
    goal = f"target >= {target:.2f}" + (f" (aim {aim:.2f})" if aim else "")
    if ratio < target:
        return f"BELOW TARGET ({goal})"
    if aim is not None and ratio < aim:
        return f"meets target, below aim ({goal})"
    return f"meets target ({goal})"


def run(config: SuiteConfig) -> SuiteResult:
    from billing.invariants import run_checks
    from billing.models import IdempotencyRecord
    from tasks.catalog import seed_catalog
    from tasks.models import Task

    seed_catalog()
    keys = [api_key(funded_user(f"bench-submit-{n}")) for n in range(config.clients)]
    pgbench = Pgbench(
        url=config.url, database=config.pgbench_database, executable=config.pgbench_executable
    )
    servers = config.submit_servers or ["sync", "gthread"]
    keepalive = not config.submit_close
    print(
        f"  servers: {', '.join(SERVER_LABELS[s] for s in servers)}; "
        f"{'keep-alive' if keepalive else 'one connection per request'}; the dispatcher "
        "runs after each server's windows",
        flush=True,
    )
    flush_bench_redis()
    runs: list[ServerRun] = []
    problems: list[str] = []
    try:
        before = pgbench.tpcb_tps(clients=config.clients, seconds=config.seconds)
        print(f"  pgbench before: {before:.1f} tps", flush=True)
        for server in servers:
            runs.append(measure_server(config, server, keys, keepalive, Path(config.run_dir)))
            problems += runs[-1].problems
        after = pgbench.tpcb_tps(clients=config.clients, seconds=config.seconds)
        print(f"  pgbench after: {after:.1f} tps", flush=True)
        broker = _broker_messages()
    finally:
        flush_bench_redis()
    tps = (before + after) / 2

    stored = Task.objects.count()
    expected = sum(r.accepted for r in runs)
    if stored != expected:
        problems.append(f"counted {expected} accepted submits, the database has {stored} tasks")
    records = IdempotencyRecord.objects.filter(status=IdempotencyRecord.Status.COMPLETED).count()
    keyed = sum(r.accepted_keyed for r in runs)
    if records != keyed:
        problems.append(f"counted {keyed} accepted keyed submits, {records} idempotency records")
    unqueued = _unqueued()
    if unqueued:
        problems.append(f"{unqueued} of {stored} tasks were never dispatched (still in the outbox)")
    if broker != stored:
        problems.append(f"{stored} tasks stored, {broker} submit messages in the broker")
    breaches = run_checks()
    problems += [f"ledger_check: {b.check}: {b.detail}" for b in breaches]
    print(
        f"  tasks stored: {stored} (accepted {expected}); idempotency records {records} "
        f"(keyed {keyed}); messages in the broker's celery list: {broker}; "
        f"ledger_check: {'ok' if not breaches else 'BREACH'}",
        flush=True,
    )

    rows: list[Row] = []
    notices: list[str] = []
    ref_pgbench = f"pgbench {tps:.0f} tps"
    for r in runs:
        label = SERVER_LABELS[r.server]
        # gunicorn's sync worker closes every connection after its answer (keep-alive or not).
        conn = "conn/request" if not keepalive or r.server == "sync" else "keep-alive"
        assert r.submit is not None
        assert r.idempotent is not None
        if r.bare is not None:
            bare_ref = f"bare WSGI {r.bare.rate:.0f}/s"
            rows.append(
                Row(
                    "submit",
                    f"bare WSGI (pgbench txn), {label}",
                    f"{r.bare.rate:.0f} req/s",
                    ref_pgbench,
                    r.bare.rate / tps if tps else None,
                    r.bare.notes(conn),
                )
            )
            ratio = r.submit.rate / r.bare.rate if r.bare.rate else 0.0
            verdict = _verdict(ratio, TARGET_SUBMIT, AIM_SUBMIT)
            rows.append(
                Row(
                    "submit",
                    f"POST /api/v1/tasks/, {label}",
                    f"{r.submit.rate:.0f} submits/s",
                    bare_ref,
                    ratio,
                    verdict,
                )
            )
            notices.append(f"{label}: submit / bare WSGI = {ratio:.3f}: {verdict}")
        rows.append(
            Row(
                "submit",
                f"POST /api/v1/tasks/, {label}",
                f"{r.submit.rate:.0f} submits/s",
                ref_pgbench,
                r.submit.rate / tps if tps else None,
                r.submit.notes(r.dispatch.split(" (")[0] if r.dispatch else ""),
            )
        )
        if r.bare is not None:
            ratio = r.idempotent.rate / r.bare.rate if r.bare.rate else 0.0
            verdict = _verdict(ratio, TARGET_IDEMPOTENT)
            rows.append(
                Row(
                    "submit",
                    f"+ Idempotency-Key, {label}",
                    f"{r.idempotent.rate:.0f} submits/s",
                    f"bare WSGI {r.bare.rate:.0f}/s",
                    ratio,
                    f"{verdict}; {r.idempotent.notes()}",
                )
            )
            notices.append(f"{label}: idempotent submit / bare WSGI = {ratio:.3f}: {verdict}")
        else:
            rows.append(
                Row(
                    "submit",
                    f"+ Idempotency-Key, {label}",
                    f"{r.idempotent.rate:.0f} submits/s",
                    ref_pgbench,
                    r.idempotent.rate / tps if tps else None,
                    r.idempotent.notes(),
                )
            )
    for notice in notices:
        print(f"  {notice}", flush=True)
    return SuiteResult(rows=rows, ok=not problems, problems=problems, notices=notices)
