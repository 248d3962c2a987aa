"""Single (synchronous) tasks: what the dispatcher costs a real translation, and whether the gate
admits exactly its limit under a burst (docs/single.md).

Runs in a suite process whose Django points at the scratch database ``rivya_bench_single``.
Started here, all on 127.0.0.1: the sandbox provider process and gunicorn as ``make run`` serves
Rivya (``rivya.asgi:application`` under ``uvicorn_worker.UvicornWorker``, 2 workers: single tasks
through Django's ASGI handler, their database phases on ``SINGLE_DB_THREADS`` threads). No
Celery process: a single task answered in the request needs none. Every user is funded with a
million credits (nothing is refused for credits).

1. **Throughput.** ``POST /api/v1/single/translation/`` with the same body (a 47-character
   English sentence into Hindi) against two models that differ only in their provider:
   ``sandbox-translate`` (the sandbox process, over HTTP) and ``bench-translate-noop``, seeded
   here as a copy of it with provider ``noop`` (answers with its input at once: the request's
   cost without a provider). ``bench/load.py`` drives ``--clients`` threads (at least
   ``MIN_CLIENTS``; one connection per request, as the submit suite) for ``--seconds``, after a
   warm-up of each; the two alternate in ``ROUNDS`` pairs (A B, B A, A B: the shared machine
   drifts), and each figure is the median of its rounds (latency: p50/p99 of every request of
   its rounds). ``SINGLE_MAX_CONCURRENT`` is far above the clients (no 429); the gate is Redis
   (``REDIS_URL`` db 9, as the other suites' servers). Target: translation ÷ noop ≥
   ``TARGET_RATIO`` in requests per second. Checks: every answer 200; the database holds exactly
   as many SUCCESS tasks of each model; the sandbox counted exactly the translation requests.
   The machine reference is pgbench TPC-B-like tps at ``--clients`` clients (the other suites').
2. **The gate under a burst.** A gunicorn (2 workers) with ``SINGLE_MAX_CONCURRENT`` =
   ``GATE_LIMIT``, for each backend: Redis (``REDIS_URL`` = ``GATE_REDIS_URL``, db 14) and the
   database (``SINGLE_GATE_BACKEND=db``). The sandbox's counters are reset (``POST
   /v1/_reset``), then ``BURST`` clients (one connection each, released together) each send one
   translation held ``HOLD_MS`` by the sandbox (``params.sandbox_latency_ms``). The sandbox's
   ``max_in_flight`` must EQUAL the limit; every answer must be 200 or 429, every 429
   ``system_busy`` with a ``Retry-After`` of whole seconds; the database must hold one SUCCESS
   task per 200 and nothing for a 429; no slot may stay held afterwards.
3. ``ledger_check`` at the end.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    Row,
    SuiteConfig,
    SuiteResult,
    api_key,
    bench_env,
    flush_bench_redis,
    funded_user,
    median,
    percentile,
    tree_pids,
)
from bench.procs import Processes, new_webhook_secret
from bench.scratch import Pgbench, url_with_db
from bench.submit import LoadResult, check_load, run_load

SANDBOX_MODEL = "sandbox-translate"
NOOP_MODEL = "bench-translate-noop"
PATH = "/api/v1/single/translation/"
TEXT = "Thank you for the water, my friend is not here."  # 47 characters
MIN_CLIENTS = 16
ROUNDS = 3  # pairs; --quick 1
WARMUP_S = 2
TARGET_RATIO = 0.7
NO_LIMIT = "100000"

GATE_LIMIT = 50
BURST = 200
HOLD_MS = 1500
GATE_REDIS_URL = "redis://127.0.0.1:6379/14"
GATE_KEY = "rivya:gate:single"  # tasks.single.gate.REDIS_KEY for the single gate
GATE_BURSTS = 2  # per backend; --quick 1
BURST_TIMEOUT_S = 60.0


def _body(model: str, **params: Any) -> dict[str, Any]:
    return {
        "model": model,
        "text": TEXT,
        "source_language": "en",
        "target_language": "hi",
        "params": params,
    }


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 0.1 else f"{seconds * 1000:.0f} ms"


def seed_noop_model() -> Any:
    """``bench-translate-noop``: ``sandbox-translate`` with provider ``noop`` (every other field
    the same: params_schema, price, billing, timeout)."""
    from tasks.models import AIModel

    source = AIModel.objects.get(slug=SANDBOX_MODEL)
    skip = {"id", "slug", "name", "provider", "created_at", "updated_at"}
    values = {
        f.name: getattr(source, f.name)
        for f in AIModel._meta.concrete_fields
        if f.name not in skip and not f.primary_key
    }
    model, _ = AIModel.objects.update_or_create(
        slug=NOOP_MODEL,
        defaults={**values, "name": "Bench Translate (noop)", "provider": "noop"},
    )
    return model


# --- 1. throughput ---------------------------------------------------------------------------


@dataclass
class Measured:
    model: str
    round: int
    result: LoadResult

    @property
    def ok(self) -> int:
        return self.result.statuses.get("200", 0)

    @property
    def rps(self) -> float:
        return self.ok / self.result.seconds if self.result.seconds > 0 else 0.0


def _cpu_ms_per_request(m: Measured, group: str) -> float:
    cores = (m.result.cores or {}).get(group, 0.0)
    return cores / m.rps * 1000 if m.rps else float("nan")


def measure_throughput(
    config: SuiteConfig,
    url: str,
    gunicorn_pid: int,
    keys: list[str],
    extra: dict[str, Callable[[], list[int]]],
    rounds: int,
) -> tuple[list[Measured], list[str], dict[str, int]]:
    problems: list[str] = []
    sent = {SANDBOX_MODEL: 0, NOOP_MODEL: 0}

    def spec(model: str) -> dict[str, Any]:
        return {"path": PATH, "keys": keys, "body": _body(model), "expect": 200}

    for model in (SANDBOX_MODEL, NOOP_MODEL):
        tag = "noop" if model == NOOP_MODEL else "sandbox"
        warm = run_load(config, url, spec(model), WARMUP_S, gunicorn_pid, f"warmup-{tag}", extra)
        problems += check_load(warm, f"warm-up {model}", "200")
        sent[model] += sum(warm.statuses.values())
    measured: list[Measured] = []
    for n in range(rounds):
        order = (SANDBOX_MODEL, NOOP_MODEL) if n % 2 == 0 else (NOOP_MODEL, SANDBOX_MODEL)
        for model in order:
            tag = f"{'noop' if model == NOOP_MODEL else 'sandbox'}-{n}"
            got = run_load(config, url, spec(model), config.seconds, gunicorn_pid, tag, extra)
            problems += check_load(got, f"round {n + 1} {model}", "200")
            sent[model] += sum(got.statuses.values())
            m = Measured(model, n, got)
            measured.append(m)
            lat = got.latencies
            print(
                f"  round {n + 1} {model}: {m.ok} x 200 in {got.seconds:.2f} s = {m.rps:.1f}/s, "
                f"p50 {_ms(percentile(lat, 50))}, p99 {_ms(percentile(lat, 99))}; "
                f"gunicorn {_cpu_ms_per_request(m, 'gunicorn'):.2f} CPU ms/request, postgres "
                f"{_cpu_ms_per_request(m, 'postgres'):.2f}, sandbox "
                f"{_cpu_ms_per_request(m, 'sandbox'):.2f}",
                flush=True,
            )
            print(f"    {got.cpu_line}", flush=True)
    return measured, problems, sent


# --- 2. the gate -----------------------------------------------------------------------------


@dataclass
class Burst:
    backend: str
    n: int
    statuses: dict[int, int]
    retry_after_missing: int
    retry_after_values: dict[str, int]
    not_busy: int  # 429s whose error code is not system_busy
    errors: list[str]
    max_in_flight: int
    sampled_in_flight_max: int
    requests_upstream: int
    p50_200: float
    max_200: float
    wall: float

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def busy(self) -> int:
        return self.statuses.get(429, 0)


async def _burst(url: str, sandbox_url: str, keys: list[str], n: int, hold_ms: int) -> Burst:
    body = json.dumps(_body(SANDBOX_MODEL, sandbox_latency_ms=hold_ms)).encode()
    start = asyncio.Event()
    results: list[tuple[int, float, str | None, str]] = []
    errors: list[str] = []
    sampled: list[int] = []
    stop = asyncio.Event()

    async def client(i: int) -> None:
        # A client of its own: its own connection, as 200 separate callers would have.
        async with httpx.AsyncClient(base_url=url, timeout=BURST_TIMEOUT_S, trust_env=False) as c:
            await start.wait()
            t0 = time.perf_counter()
            try:
                r = await c.post(
                    PATH,
                    content=body,
                    headers={
                        "Authorization": f"Bearer {keys[i % len(keys)]}",
                        "Content-Type": "application/json",
                    },
                )
            except httpx.HTTPError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                return
            code = ""
            if r.status_code != 200:
                try:
                    code = str((r.json().get("error") or {}).get("code", ""))
                except ValueError:
                    code = r.text[:100]
            results.append(
                (r.status_code, time.perf_counter() - t0, r.headers.get("Retry-After"), code)
            )

    async def sample() -> None:
        async with httpx.AsyncClient(base_url=sandbox_url, timeout=5, trust_env=False) as c:
            while not stop.is_set():
                try:
                    sampled.append(int((await c.get("/v1/single/stats")).json()["in_flight"]))
                except (httpx.HTTPError, ValueError, KeyError) as exc:
                    errors.append(f"sandbox stats: {exc}")
                await asyncio.sleep(0.05)

    tasks = [asyncio.ensure_future(client(i)) for i in range(n)]
    sampler = asyncio.ensure_future(sample())
    await asyncio.sleep(0.5)  # every client waiting on the event
    t0 = time.perf_counter()
    start.set()
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    stop.set()
    await sampler
    async with httpx.AsyncClient(base_url=sandbox_url, timeout=5, trust_env=False) as c:
        stats = (await c.get("/v1/single/stats")).json()
    statuses: dict[int, int] = {}
    for status, _s, _ra, _code in results:
        statuses[status] = statuses.get(status, 0) + 1
    busy = [(ra, code) for status, _s, ra, code in results if status == 429]
    values: dict[str, int] = {}
    for ra, _code in busy:
        values[str(ra)] = values.get(str(ra), 0) + 1
    admitted = sorted(s for status, s, _ra, _code in results if status == 200)
    return Burst(
        backend="",
        n=n,
        statuses=statuses,
        retry_after_missing=sum(1 for ra, _c in busy if not (ra or "").isdigit() or int(ra) < 1),
        retry_after_values=values,
        not_busy=sum(1 for _ra, code in busy if code != "system_busy"),
        errors=errors,
        max_in_flight=int(stats["max_in_flight"]),
        sampled_in_flight_max=max(sampled, default=0),
        requests_upstream=int(stats["requests"]),
        p50_200=percentile(admitted, 50) if admitted else float("nan"),
        max_200=admitted[-1] if admitted else float("nan"),
        wall=wall,
    )


def _slots_held(backend: str) -> int:
    """Slots still held after a burst (leases not ended), read from the backend."""
    if backend == "redis":
        import redis

        client = redis.Redis.from_url(GATE_REDIS_URL)
        now_s, now_us = client.time()
        return int(client.zcount(GATE_KEY, now_s * 1000 + now_us // 1000, "+inf"))
    from django.db.models import Q
    from django.db.models.functions import Now

    from tasks.models import GateSlot

    return GateSlot.objects.filter(~Q(holder=""), lease_until__gte=Now(), gate="single").count()


def _clear_gate_redis() -> None:
    import redis

    redis.Redis.from_url(GATE_REDIS_URL).delete(GATE_KEY)


def measure_gate(
    procs: Processes, sandbox_url: str, keys: list[str], backend: str, bursts: int
) -> tuple[list[Burst], list[str]]:
    from tasks.models import Task

    problems: list[str] = []
    env = {"SINGLE_MAX_CONCURRENT": str(GATE_LIMIT), "SINGLE_GATE_BACKEND": backend}
    if backend == "redis":
        env["REDIS_URL"] = GATE_REDIS_URL
        _clear_gate_redis()
    url, gunicorn = procs.gunicorn(**env)
    got: list[Burst] = []
    try:
        # Warm both workers: 20 zero-latency requests at once (they spread over the workers).
        warm = asyncio.run(_burst(url, sandbox_url, keys, 20, 0))
        if warm.ok != 20:
            problems.append(f"gate {backend}: warm-up answered {warm.statuses} {warm.errors[:2]}")
        for n in range(bursts):
            before = Task.objects.filter(model_slug=SANDBOX_MODEL).count()
            httpx.post(f"{sandbox_url}/v1/_reset", trust_env=False).raise_for_status()
            burst = asyncio.run(_burst(url, sandbox_url, keys, BURST, HOLD_MS))
            burst.backend = backend
            got.append(burst)
            tag = f"gate {backend} burst {n + 1}"
            problems += [f"{tag}: {e}" for e in burst.errors[:3]]
            others = {s: c for s, c in burst.statuses.items() if s not in (200, 429)}
            if others:
                problems.append(f"{tag}: answers other than 200/429: {others}")
            if burst.ok + burst.busy != BURST:
                problems.append(f"{tag}: {burst.ok + burst.busy} answers of {BURST}")
            if burst.max_in_flight != GATE_LIMIT:
                problems.append(
                    f"{tag}: the sandbox held at most {burst.max_in_flight} at once, "
                    f"the limit is {GATE_LIMIT}"
                )
            if burst.retry_after_missing:
                problems.append(f"{tag}: {burst.retry_after_missing} 429s without Retry-After")
            if burst.not_busy:
                problems.append(f"{tag}: {burst.not_busy} 429s not system_busy")
            if burst.requests_upstream != burst.ok:
                problems.append(
                    f"{tag}: the sandbox took {burst.requests_upstream} requests, {burst.ok} 200s"
                )
            after = Task.objects.filter(model_slug=SANDBOX_MODEL)
            created = after.count() - before
            if created != burst.ok:
                problems.append(f"{tag}: {created} tasks recorded for {burst.ok} answers 200")
            held = _slots_held(backend)
            if held:
                problems.append(f"{tag}: {held} gate slots still held after the burst")
            verdict = "PASS" if burst.max_in_flight == GATE_LIMIT else "FAIL"
            print(
                f"  {tag}: {BURST} clients, limit {GATE_LIMIT}, held {HOLD_MS} ms: sandbox "
                f"max_in_flight {burst.max_in_flight} (sampled max {burst.sampled_in_flight_max}) "
                f"{verdict}; {burst.ok} x 200, {burst.busy} x 429 (Retry-After "
                f"{dict(sorted(burst.retry_after_values.items()))}, {burst.retry_after_missing} "
                f"without); 200 p50 {_ms(burst.p50_200)}, max {_ms(burst.max_200)}; burst "
                f"{burst.wall:.2f} s; slots held after {held}",
                flush=True,
            )
    finally:
        procs.stop(gunicorn)
        if backend == "redis":
            _clear_gate_redis()
    return got, problems


# --- the suite --------------------------------------------------------------------------------


def run(config: SuiteConfig) -> SuiteResult:
    from django.db import connections

    from billing.invariants import run_checks
    from tasks.catalog import seed_catalog
    from tasks.models import Task

    seed_catalog()
    seed_noop_model()
    clients = max(config.clients, MIN_CLIENTS)
    load_config = dataclasses.replace(config, clients=clients)
    rounds = 1 if config.quick else ROUNDS
    bursts = 1 if config.quick else GATE_BURSTS
    users = [funded_user(f"bench-single-{n}") for n in range(max(clients, 20))]
    keys = [api_key(user) for user in users]
    print(f"  {len(users)} funded users with API keys; {clients} load clients", flush=True)
    connections.close_all()

    secret = new_webhook_secret()
    env = {
        **bench_env(url_with_db(config.url, config.database)),
        "SANDBOX_WEBHOOK_SECRET": secret,
        "MEDIA_ROOT": str(Path(config.run_dir) / "media"),
    }
    problems: list[str] = []
    flush_bench_redis()
    try:
        with Processes(Path(config.run_dir), env) as procs:
            sandbox_url, sandbox = procs.sandbox(secret)
            procs.env["SANDBOX_URL"] = sandbox_url
            extra = {"sandbox": lambda: tree_pids(sandbox.pid)}

            # 1. Throughput: the sandbox vs noop, alternating.
            url, gunicorn = procs.gunicorn(SINGLE_MAX_CONCURRENT=NO_LIMIT)
            httpx.post(f"{sandbox_url}/v1/_reset", trust_env=False).raise_for_status()
            measured, found, sent = measure_throughput(
                load_config, url, gunicorn.pid, keys[:clients], extra, rounds
            )
            problems += found
            stats = httpx.get(f"{sandbox_url}/v1/single/stats", trust_env=False).json()
            procs.stop(gunicorn)
            if stats["by_service"].get("translate") != sent[SANDBOX_MODEL]:
                problems.append(
                    f"the sandbox counted {stats['by_service'].get('translate')} translations, "
                    f"{sent[SANDBOX_MODEL]} were sent"
                )
            for model in (SANDBOX_MODEL, NOOP_MODEL):
                stored = Task.objects.filter(model_slug=model, status=Task.Status.SUCCESS).count()
                if stored != sent[model]:
                    problems.append(f"{model}: {stored} SUCCESS tasks for {sent[model]} requests")
            connections.close_all()

            # 2. The gate under a burst, on each backend.
            gate: list[Burst] = []
            for backend in ("redis", "db"):
                got, found = measure_gate(procs, sandbox_url, keys, backend, bursts)
                gate += got
                problems += found
                connections.close_all()
    finally:
        flush_bench_redis()

    pgbench = Pgbench(
        url=config.url, database=config.pgbench_database, executable=config.pgbench_executable
    )
    tps = pgbench.tpcb_tps(clients=config.clients, seconds=config.seconds)
    print(f"  pgbench: {tps:.1f} tps at {config.clients} clients", flush=True)

    breaches = run_checks()
    problems += [f"ledger_check: {b.check}: {b.detail}" for b in breaches]
    print(f"  ledger_check: {'ok' if not breaches else 'BREACH'}", flush=True)

    rows, ratio = _rows(config, clients, measured, gate, tps)
    verdict = "PASS" if ratio >= TARGET_RATIO else "FAIL"
    print(f"  translation / noop rps {ratio:.3f}: {verdict} (target >= {TARGET_RATIO})", flush=True)
    if ratio < TARGET_RATIO:
        problems.append(f"translation / noop rps {ratio:.3f} is below the target {TARGET_RATIO}")
    return SuiteResult(rows=rows, ok=not problems, problems=problems)


def _rows(
    config: SuiteConfig,
    clients: int,
    measured: list[Measured],
    gate: list[Burst],
    tps: float,
) -> tuple[list[Row], float]:
    rows: list[Row] = []
    by_model = {m: [x for x in measured if x.model == m] for m in (SANDBOX_MODEL, NOOP_MODEL)}
    rps = {m: median([x.rps for x in xs]) for m, xs in by_model.items()}
    lat = {m: [s for x in xs for s in x.result.latencies] for m, xs in by_model.items()}
    rounds = len(by_model[SANDBOX_MODEL])
    ratio = rps[SANDBOX_MODEL] / rps[NOOP_MODEL] if rps[NOOP_MODEL] else 0.0

    def cpu(model: str, group: str) -> float:
        return median([_cpu_ms_per_request(x, group) for x in by_model[model]])

    per_round = ", ".join(f"{x.rps:.0f}" for x in by_model[SANDBOX_MODEL])
    per_round_noop = ", ".join(f"{x.rps:.0f}" for x in by_model[NOOP_MODEL])
    rows.append(
        Row(
            suite="single",
            measurement=f"translation rate, {clients} clients",
            value=f"{rps[SANDBOX_MODEL]:.0f}/s",
            reference=f"noop {rps[NOOP_MODEL]:.0f}/s",
            ratio=ratio,
            notes=f"{'PASS' if ratio >= TARGET_RATIO else 'FAIL'} (>= {TARGET_RATIO}); median "
            f"of {rounds} rounds: {per_round} vs {per_round_noop}",
        )
    )
    for p in (50, 99):
        mine, theirs = percentile(lat[SANDBOX_MODEL], p), percentile(lat[NOOP_MODEL], p)
        rows.append(
            Row(
                suite="single",
                measurement=f"translation p{p}, {clients} clients",
                value=_ms(mine),
                reference=f"noop {_ms(theirs)}",
                ratio=mine / theirs if theirs else None,
                notes=f"{len(lat[SANDBOX_MODEL])} and {len(lat[NOOP_MODEL])} requests"
                if p == 50
                else f"+{_ms(mine - theirs)}",
            )
        )
    rows.append(
        Row(
            suite="single",
            measurement="CPU ms per request, gunicorn",
            value=f"{cpu(SANDBOX_MODEL, 'gunicorn'):.2f} ms",
            reference=f"noop {cpu(NOOP_MODEL, 'gunicorn'):.2f} ms",
            ratio=cpu(SANDBOX_MODEL, "gunicorn") / cpu(NOOP_MODEL, "gunicorn"),
            notes=f"postgres {cpu(SANDBOX_MODEL, 'postgres'):.2f} vs "
            f"{cpu(NOOP_MODEL, 'postgres'):.2f}; sandbox {cpu(SANDBOX_MODEL, 'sandbox'):.2f}; "
            f"load client {cpu(SANDBOX_MODEL, 'load client'):.2f} vs "
            f"{cpu(NOOP_MODEL, 'load client'):.2f}",
        )
    )
    rows.append(
        Row(
            suite="single",
            measurement=f"translation rate, {clients} clients",
            value=f"{rps[SANDBOX_MODEL]:.0f}/s",
            reference=f"pgbench {tps:.0f} tps",
            ratio=rps[SANDBOX_MODEL] / tps if tps else None,
            notes=f"pgbench at {config.clients} clients, the other suites' machine reference",
        )
    )
    rows.extend(
        Row(
            suite="single",
            measurement=f"gate {burst.backend}, {burst.n} clients at once, most in flight",
            value=str(burst.max_in_flight),
            reference=f"limit {GATE_LIMIT}",
            ratio=burst.max_in_flight / GATE_LIMIT,
            notes=f"{'PASS' if burst.max_in_flight == GATE_LIMIT else 'FAIL'}; "
            f"{burst.ok} x 200, {burst.busy} x 429, "
            f"{burst.busy - burst.retry_after_missing} of them with Retry-After; held "
            f"{HOLD_MS} ms",
        )
        for burst in gate
    )
    return rows, ratio
