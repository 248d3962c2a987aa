"""Chat streaming: what a streamed turn costs over the provider's own stream, how many long
streams the server holds at once, and what ``make run``'s serving costs the rest of the API.

Runs in a suite process whose Django points at the scratch database ``rivya_bench_chat``.
Started here, all on 127.0.0.1: the sandbox provider process and gunicorn as ``make run``
serves Rivya (``rivya.asgi:application`` under ``uvicorn_worker.UvicornWorker``, 2 workers:
chat turns through Django's ASGI handler, everything else through Django's WSGI handler on a
pool of ``WEB_THREADS`` threads with persistent connections). No Celery process: a chat turn
needs none. Users are funded with a million credits each (nothing is clamped or refused) and talk to
``sandbox-chat``; each turn has a fresh session of its own, so every upstream request is the
same size.

1. **Overhead.** ``--chat-turns`` sequential turns of a fixed reply (200 tokens, 2 ms apart,
   no latency) streamed through Rivya (``POST /api/v1/chat/sessions/<id>/messages/``,
   ``Accept: text/event-stream``: ``message``, ``delta``…, ``settlement``), interleaved with the
   same request sent straight to the sandbox's ``POST /v1/chat/completions`` (the same
   messages, ``max_tokens`` and knobs Rivya sends upstream), by one client (httpx, keep-alive).
   Time to first token (the first ``delta`` / the first content chunk) and total time (the end
   of the body: after ``settlement`` / ``[DONE]``), p50 and p95, as ratios Rivya ÷ sandbox.
2. **Concurrency.** Two rounds: ``--chat-streams`` ÷ 10, then ``--chat-streams`` streams, each
   lasting ``--chat-stream-seconds`` (``sandbox_reply_tokens`` = 10 per second,
   ``sandbox_token_delay_ms`` 100), opened over ``--chat-ramp`` seconds by a separate process
   (``bench/chat_streams.py``, one ``httpx.AsyncClient``). Meanwhile this process samples: the
   round trip of ``GET /api/v1/credits/`` (one new connection per request, every 20 ms), the
   PostgreSQL connections to the scratch database (``pg_stat_activity``, every 50 ms), the
   sandbox's open streams (``/v1/chat/stats``) and CPU by process group. The API latency
   counted is the one while every stream is open (the last first token → the first end); the
   reference is the same sampler on the idle server just before, same run. Checks: every
   stream answered 201, read every token and ended with a ``settlement`` of a COMPLETE message
   billed for every token; every assistant message in the database COMPLETE; the sandbox saw
   no disconnect; ``ledger_check`` clean; the API answered every sample.
3. **What ``make run``'s serving costs the rest of the API.** ``bench/load.py``
   with ``--clients`` threads for ``--seconds`` (one connection per request, as the submit
   suite) on ``GET /api/v1/credits/`` and on ``POST /api/v1/chat/sessions/`` (a write), against
   (a) the ``make run`` server above, (b) the earlier ``make run`` server, gunicorn gthread
   2 × 8 with ``CONN_MAX_AGE=60``, and (c) the same gthread server with ``CONN_MAX_AGE=0`` (which
   separates the cost of a new connection per request from the cost of the server model);
   then pgbench TPC-B-like tps at the same client count, the machine reference of the other
   suites.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg2

from bench.common import (
    ROOT,
    CpuSample,
    Row,
    SuiteConfig,
    SuiteResult,
    api_key,
    bench_env,
    cpu_cores,
    cpu_report,
    cpu_sample,
    funded_user,
    percentile,
    pids_named,
    postmaster_pid,
    reaped_children_cpu_seconds,
    tree_pids,
)
from bench.procs import Processes, new_webhook_secret
from bench.scratch import Pgbench, url_with_db
from bench.submit import LoadResult, check_load, run_load

MODEL = "sandbox-chat"
OVERHEAD_TOKENS = 200
OVERHEAD_DELAY_MS = 2
OVERHEAD_WARMUP = 3
STREAM_DELAY_MS = 100  # 10 tokens per second: a stream of S seconds has 10 × S tokens
API_EVERY_S = 0.02
PG_EVERY_S = 0.05
SANDBOX_EVERY_S = 0.25
CPU_EVERY_S = 1.0
LOAD_WARMUP_S = 2
CONTENT = "Tell me about the sea, for the chat benchmark."
PG_LIMIT = 100  # PostgreSQL's max_connections on the target machine


# --- helpers ---------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 0.1 else f"{seconds * 1000:.0f} ms"


def _p(values: list[float], p: float) -> float:
    return percentile(values, p) if values else float("nan")


def _ratio(value: float, reference: float) -> float | None:
    return value / reference if reference and reference == reference else None


def _knobs(tokens: int, delay_ms: int) -> dict[str, int]:
    return {
        "sandbox_reply_tokens": tokens,
        "sandbox_token_delay_ms": delay_ms,
        "sandbox_latency_ms": 0,
    }


def _turn_body(tokens: int, delay_ms: int) -> dict[str, Any]:
    return {"content": CONTENT, "max_tokens": tokens, "params": _knobs(tokens, delay_ms)}


# --- 1. overhead -----------------------------------------------------------------------------


@dataclass
class Timing:
    first: float  # seconds to the first token
    total: float  # seconds to the end of the body
    tokens: int
    settled: dict[str, Any] | None = None


def rivya_turn(client: httpx.Client, session: str, body: dict[str, Any]) -> Timing:
    """One streamed turn through Rivya, read to the end of its body."""
    first = 0.0
    deltas = 0
    settled: dict[str, Any] | None = None
    started = time.perf_counter()
    with client.stream(
        "POST",
        f"/api/v1/chat/sessions/{session}/messages/",
        json=body,
        headers={"Accept": "text/event-stream"},
    ) as response:
        if response.status_code != 201:
            response.read()
            raise RuntimeError(f"turn answered {response.status_code}: {response.text[:300]}")
        event = ""
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                if event == "delta":
                    deltas += 1
                    first = first or time.perf_counter()
                elif event == "settlement":
                    settled = json.loads(line[6:])
    ended = time.perf_counter()
    if not first:
        raise RuntimeError("a turn streamed no delta")
    return Timing(first - started, ended - started, deltas, settled)


def sandbox_turn(client: httpx.Client, body: dict[str, Any]) -> Timing:
    """The same reply straight from the sandbox's ``POST /v1/chat/completions``."""
    first = 0.0
    tokens = 0
    started = time.perf_counter()
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            response.read()
            raise RuntimeError(f"sandbox answered {response.status_code}: {response.text[:300]}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            if choices[0].get("delta", {}).get("content"):
                tokens += 1
                first = first or time.perf_counter()
    ended = time.perf_counter()
    if not first:
        raise RuntimeError("the sandbox streamed no token")
    return Timing(first - started, ended - started, tokens)


@dataclass
class Overhead:
    rivya: list[Timing]
    sandbox: list[Timing]
    problems: list[str]


def measure_overhead(
    url: str, sandbox_url: str, key: str, sessions: list[str], turns: int
) -> Overhead:
    body = _turn_body(OVERHEAD_TOKENS, OVERHEAD_DELAY_MS)
    upstream = {
        "model": "sandbox/chat-v1",  # sandbox-chat's upstream_model; any name would do
        "messages": [{"role": "user", "content": CONTENT}],
        "max_tokens": OVERHEAD_TOKENS,
        "stream": True,
        "params": _knobs(OVERHEAD_TOKENS, OVERHEAD_DELAY_MS),
    }
    rivya: list[Timing] = []
    direct: list[Timing] = []
    problems: list[str] = []
    with (
        httpx.Client(
            base_url=url,
            headers={"Authorization": f"Bearer {key}"},
            timeout=60.0,
            trust_env=False,
        ) as client,
        httpx.Client(base_url=sandbox_url, timeout=60.0, trust_env=False) as sandbox,
    ):
        for n, session in enumerate(sessions):
            # Alternate which goes first, so that neither always follows the other.
            if n % 2:
                r = rivya_turn(client, session, body)
                d = sandbox_turn(sandbox, upstream)
            else:
                d = sandbox_turn(sandbox, upstream)
                r = rivya_turn(client, session, body)
            if n < OVERHEAD_WARMUP:
                continue
            rivya.append(r)
            direct.append(d)
            settled = r.settled or {}
            output = (settled.get("usage") or {}).get("output_tokens")
            if settled.get("status") != "COMPLETE" or output != OVERHEAD_TOKENS:
                problems.append(
                    f"overhead turn {n}: settled {settled.get('status')!r} for {output} tokens"
                )
            if r.tokens != OVERHEAD_TOKENS or d.tokens != OVERHEAD_TOKENS:
                problems.append(f"overhead turn {n}: {r.tokens} deltas, sandbox {d.tokens}")
    if len(rivya) != turns:
        problems.append(f"overhead: {len(rivya)} turns measured of {turns}")
    return Overhead(rivya, direct, problems)


# --- samplers --------------------------------------------------------------------------------


@dataclass
class Samples:
    api: list[tuple[float, float, int]] = field(default_factory=list)  # (start, seconds, status)
    pg: list[tuple[float, int, int]] = field(default_factory=list)  # (time, connections, active)
    sandbox_open: list[tuple[float, int]] = field(default_factory=list)
    cpu: list[tuple[float, CpuSample]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class Sampler:
    """Background samplers (PostgreSQL connections, the sandbox's open streams, CPU) for as
    long as the ``with`` block lasts; the API sampler runs in the caller's thread
    (``api_until``)."""

    def __init__(
        self,
        *,
        dsn: str,
        database: str,
        url: str,
        key: str,
        sandbox_url: str = "",
        cpu_groups: dict[str, Callable[[], list[int]]] | None = None,
    ) -> None:
        self.dsn, self.database, self.url, self.key = dsn, database, url, key
        self.sandbox_url = sandbox_url
        self.cpu_groups = cpu_groups
        self.samples = Samples()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> Sampler:
        targets: list[Callable[[], None]] = [self._pg]
        if self.sandbox_url or self.cpu_groups:
            targets.append(self._slow)
        for target in targets:
            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)

    def _pg(self) -> None:
        try:
            conn = psycopg2.connect(self.dsn)
        except psycopg2.Error as exc:
            self.samples.errors.append(f"pg sampler: {exc}")
            return
        conn.autocommit = True
        try:
            with conn.cursor() as cursor:
                while not self._stop.is_set():
                    cursor.execute(
                        "SELECT count(*), count(*) FILTER (WHERE state <> 'idle') "
                        "FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                        (self.database,),
                    )
                    row = cursor.fetchone()
                    if row is not None:
                        self.samples.pg.append((time.time(), int(row[0]), int(row[1])))
                    self._stop.wait(PG_EVERY_S)
        except psycopg2.Error as exc:
            self.samples.errors.append(f"pg sampler: {exc}")
        finally:
            conn.close()

    def _slow(self) -> None:
        next_cpu = 0.0
        with httpx.Client(base_url=self.sandbox_url or "http://127.0.0.1", trust_env=False) as c:
            while not self._stop.is_set():
                now = time.time()
                if self.cpu_groups and now >= next_cpu:
                    self.samples.cpu.append((now, cpu_sample(self.cpu_groups)))
                    next_cpu = now + CPU_EVERY_S
                if self.sandbox_url:
                    try:
                        stats = c.get("/v1/chat/stats", timeout=5.0).json()
                        self.samples.sandbox_open.append((now, int(stats["chat_streams_open"])))
                    except (httpx.HTTPError, ValueError, KeyError) as exc:
                        self.samples.errors.append(f"sandbox stats: {exc}")
                self._stop.wait(SANDBOX_EVERY_S)
        if self.cpu_groups:
            self.samples.cpu.append((time.time(), cpu_sample(self.cpu_groups)))

    def api_once(self) -> None:
        host, port = self.url.removeprefix("http://").split(":")
        started_at, started = time.time(), time.perf_counter()
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            conn.request(
                "GET",
                "/api/v1/credits/",
                headers={"Authorization": f"Bearer {self.key}", "Connection": "close"},
            )
            response = conn.getresponse()
            response.read()
            status = response.status
        except OSError as exc:
            status = 0
            if len(self.samples.errors) < 5:
                self.samples.errors.append(f"GET /api/v1/credits/: {exc}")
        finally:
            conn.close()
        self.samples.api.append((started_at, time.perf_counter() - started, status))

    def api_until(self, done: Callable[[], bool]) -> None:
        while not done():  # bounded by the caller's condition (a deadline or a process)
            tick = time.perf_counter()
            self.api_once()
            time.sleep(max(0.0, tick + API_EVERY_S - time.perf_counter()))


def _cpu_between(samples: Samples, start: float, end: float) -> tuple[str, dict[str, float]]:
    """CPU by group between the samples nearest ``start`` and ``end``."""
    if len(samples.cpu) < 2:
        return "", {}
    first = min(samples.cpu, key=lambda s: abs(s[0] - start))
    last = min(samples.cpu, key=lambda s: abs(s[0] - end))
    if last[0] - first[0] < 0.5:
        first, last = samples.cpu[0], samples.cpu[-1]
    wall = last[0] - first[0]
    return cpu_report(first[1], last[1], wall), cpu_cores(first[1], last[1], wall)


# --- 2. concurrency --------------------------------------------------------------------------


@dataclass
class Round:
    streams: int
    results: list[dict[str, Any]]
    samples: Samples
    window: tuple[float, float]  # every stream open: the last first token → the first end
    window_kind: str
    client_cpu: float
    cpu_line: str
    cores: dict[str, float]
    api_window: list[float]  # seconds of the API samples that started inside the window
    api_failed: int
    pg_max: int
    pg_max_active: int
    pg_max_window: int
    pg_max_opening: int  # while the streams were being opened (before all were open)
    pg_max_closing: int  # from the first end on (the settlements)
    sandbox_open_max: int
    problems: list[str]


def run_round(
    config: SuiteConfig,
    *,
    url: str,
    sandbox_url: str,
    api_key_: str,
    streams: list[dict[str, str]],
    tokens: int,
    ramp: float,
    cpu_groups: dict[str, Callable[[], list[int]]],
    tag: str,
) -> Round:
    run_dir = Path(config.run_dir)
    spec_path, out_path = run_dir / f"streams-{tag}.json", run_dir / f"streams-{tag}-out.json"
    spec_path.write_text(
        json.dumps(
            {
                "url": url,
                "streams": streams,
                "body": _turn_body(tokens, STREAM_DELAY_MS),
                "ramp_s": ramp,
            }
        )
    )
    seconds = tokens * STREAM_DELAY_MS / 1000
    give_up = time.monotonic() + ramp + seconds * 3 + 120
    sampler = Sampler(
        dsn=url_with_db(config.url, config.database),
        database=config.database,
        url=url,
        key=api_key_,
        sandbox_url=sandbox_url,
        cpu_groups=cpu_groups,
    )
    with open(run_dir / f"streams-{tag}.log", "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "bench" / "chat_streams.py"),
                str(spec_path),
                str(out_path),
            ],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    cpu_groups = {**cpu_groups, "stream client": lambda: [proc.pid]}
    sampler.cpu_groups = cpu_groups
    try:
        with sampler:
            sampler.api_until(lambda: proc.poll() is not None or time.monotonic() > give_up)
            time.sleep(0.5)  # the last settlements' connections closing
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
    if proc.returncode != 0 or not out_path.exists():
        raise RuntimeError(f"the stream client failed (exit {proc.returncode}), see {tag} log")
    out = json.loads(out_path.read_text())
    results: list[dict[str, Any]] = out["results"]
    samples = sampler.samples
    problems = [f"{tag}: {e}" for e in samples.errors]

    firsts = [r["first_delta"] for r in results if r["first_delta"]]
    ends = [r["ended"] for r in results if r["ended"]]
    window_kind = "all open"
    if len(firsts) == len(results) and ends and max(firsts) < min(ends):
        window = (max(firsts), min(ends))
    else:  # never all open at once: the whole time any was open
        window_kind = "some open"
        window = (min(firsts or [0.0]), max(ends or [0.0]))
    api_window = [s for t, s, status in samples.api if window[0] <= t <= window[1] and status]
    api_failed = sum(1 for _t, _s, status in samples.api if status != 200)
    pg_window = [n for t, n, _a in samples.pg if window[0] <= t <= window[1]]
    pg_opening = [n for t, n, _a in samples.pg if t < window[0]]
    pg_closing = [n for t, n, _a in samples.pg if t > window[1]]
    cpu_line, cores = _cpu_between(samples, *window)

    bad = [r for r in results if r["status"] != 201 or r["error"]]
    unsettled = [r for r in results if r["settled_status"] != "COMPLETE"]
    short = [r for r in results if r["deltas"] != tokens or r["output_tokens"] != tokens]
    if bad:
        problems.append(f"{tag}: {len(bad)} streams failed, e.g. {bad[0]['error'][:200]}")
    if unsettled:
        problems.append(f"{tag}: {len(unsettled)} streams without a COMPLETE settlement")
    if short:
        problems.append(
            f"{tag}: {len(short)} streams not {tokens} tokens (e.g. {short[0]['deltas']} "
            f"deltas, billed {short[0]['output_tokens']})"
        )
    if api_failed:
        problems.append(f"{tag}: {api_failed} of {len(samples.api)} API samples failed")
    if window_kind != "all open":
        problems.append(f"{tag}: the streams were never all open at once")
    return Round(
        streams=len(results),
        results=results,
        samples=samples,
        window=window,
        window_kind=window_kind,
        client_cpu=float(out["cpu_seconds"]),
        cpu_line=cpu_line,
        cores=cores,
        api_window=api_window,
        api_failed=api_failed,
        pg_max=max((n for _t, n, _a in samples.pg), default=0),
        pg_max_active=max((a for _t, _n, a in samples.pg), default=0),
        pg_max_window=max(pg_window, default=0),
        pg_max_opening=max(pg_opening, default=0),
        pg_max_closing=max(pg_closing, default=0),
        sandbox_open_max=max((n for _t, n in samples.sandbox_open), default=0),
        problems=problems,
    )


def idle_baseline(
    config: SuiteConfig, url: str, key: str, seconds: float
) -> tuple[list[float], int]:
    """``GET /api/v1/credits/`` round trips on the idle server, and the most PostgreSQL
    connections seen meanwhile."""
    sampler = Sampler(
        dsn=url_with_db(config.url, config.database), database=config.database, url=url, key=key
    )
    deadline = time.monotonic() + seconds
    with sampler:
        sampler.api_until(lambda: time.monotonic() > deadline)
    failed = [s for s in sampler.samples.api if s[2] != 200]
    if failed:
        raise RuntimeError(f"idle GET /api/v1/credits/ failed {len(failed)} times")
    return [s for _t, s, _st in sampler.samples.api], max(
        (n for _t, n, _a in sampler.samples.pg), default=0
    )


def settled_in_db(session_ids: list[str], tokens: int) -> list[str]:
    """Every assistant message of these sessions COMPLETE, billed for ``tokens``."""
    from chat.models import ChatMessage

    assistant = ChatMessage.objects.filter(
        session_id__in=session_ids, role=ChatMessage.Role.ASSISTANT
    )
    problems = []
    count = assistant.count()
    if count != len(session_ids):
        problems.append(f"{count} assistant messages for {len(session_ids)} streams")
    wrong = assistant.exclude(status=ChatMessage.Status.COMPLETE).count()
    if wrong:
        problems.append(f"{wrong} assistant messages not COMPLETE")
    off = assistant.exclude(output_tokens=tokens).count()
    if off:
        problems.append(f"{off} assistant messages not billed {tokens} output tokens")
    return problems


# --- 3. ASGI vs WSGI ---------------------------------------------------------------------------


@dataclass
class ServerLoad:
    label: str
    read: LoadResult
    write: LoadResult
    pg_max: int
    read_exited: float  # cores of PostgreSQL backends that exited meanwhile (per connection)
    write_exited: float


def _exited_backends(
    measure: Callable[[], LoadResult],
) -> tuple[LoadResult, float]:
    """``measure()`` and the cores that PostgreSQL backends which exited meanwhile used (the
    postmaster's reaped children: a connection per request shows there, and nowhere else)."""
    postmaster = postmaster_pid()
    before = reaped_children_cpu_seconds(postmaster) if postmaster else 0.0
    started = time.perf_counter()
    got = measure()
    wall = time.perf_counter() - started
    after = reaped_children_cpu_seconds(postmaster) if postmaster else 0.0
    return got, (after - before) / wall if postmaster and wall > 0 else float("nan")


def load_server(
    config: SuiteConfig, url: str, gunicorn_pid: int, keys: list[str], label: str
) -> tuple[ServerLoad, list[str]]:
    read = {"path": "/api/v1/credits/", "method": "GET", "keys": keys, "expect": 200}
    write = {
        "path": "/api/v1/chat/sessions/",
        "keys": keys,
        "body": {"model": MODEL},
        "expect": 201,
    }
    problems: list[str] = []
    tag = label.lower().replace(" ", "").replace("(", "-").replace(")", "")  # asgi-0, wsgi-60
    warm = run_load(config, url, read, LOAD_WARMUP_S, gunicorn_pid, f"{tag}-warmup")
    problems += check_load(warm, f"{label} warm-up", "200")
    sampler = Sampler(
        dsn=url_with_db(config.url, config.database), database=config.database, url=url, key=""
    )
    with sampler:
        got_read, read_exited = _exited_backends(
            lambda: run_load(config, url, read, config.seconds, gunicorn_pid, f"{tag}-read")
        )
        got_write, write_exited = _exited_backends(
            lambda: run_load(config, url, write, config.seconds, gunicorn_pid, f"{tag}-write")
        )
    problems += check_load(got_read, f"{label} GET /api/v1/credits/", "200")
    problems += check_load(got_write, f"{label} POST /api/v1/chat/sessions/", "201")
    pg_max = max((n for _t, n, _a in sampler.samples.pg), default=0)
    measured = (("GET /api/v1/credits/", got_read), ("POST /api/v1/chat/sessions/", got_write))
    for (what, got), exited in zip(measured, (read_exited, write_exited), strict=True):
        lat = got.latencies
        print(
            f"  {label}: {what} {len(lat) / got.seconds:.0f}/s, p50 {_ms(_p(lat, 50))}, "
            f"p95 {_ms(_p(lat, 95))}; {got.cpu_line}; PostgreSQL backends that exited "
            f"meanwhile {exited:.2f} cores",
            flush=True,
        )
    print(f"  {label}: at most {pg_max} PostgreSQL connections", flush=True)
    return ServerLoad(label, got_read, got_write, pg_max, read_exited, write_exited), problems


# --- the suite --------------------------------------------------------------------------------


def run(config: SuiteConfig) -> SuiteResult:
    from django.db import connections

    from billing.invariants import run_checks
    from chat import services
    from tasks.catalog import seed_catalog

    seed_catalog()
    streams_n = config.chat_streams
    small_n = max(1, streams_n // 10)
    stream_tokens = max(1, round(config.chat_stream_seconds * 1000 / STREAM_DELAY_MS))
    users = [funded_user(f"bench-chat-{n}") for n in range(max(streams_n, config.clients))]
    keys = [api_key(user) for user in users]
    print(f"  {len(users)} funded users with API keys", flush=True)

    def sessions(count: int) -> list[str]:
        return [
            str(services.create_session(user=users[n % len(users)], model_slug=MODEL).pk)
            for n in range(count)
        ]

    overhead_sessions = [
        str(services.create_session(user=users[0], model_slug=MODEL).pk)
        for _ in range(config.chat_turns + OVERHEAD_WARMUP)
    ]
    rounds_spec = [(small_n, sessions(small_n)), (streams_n, sessions(streams_n))]
    connections.close_all()  # this process holds no connection while it samples

    secret = new_webhook_secret()
    env = {
        **bench_env(url_with_db(config.url, config.database)),
        "SANDBOX_WEBHOOK_SECRET": secret,
        "MEDIA_ROOT": str(Path(config.run_dir) / "media"),
    }
    problems: list[str] = []
    rounds: list[Round] = []
    loads: list[ServerLoad] = []
    with Processes(Path(config.run_dir), env) as procs:
        sandbox_url, sandbox = procs.sandbox(secret)
        procs.env["SANDBOX_URL"] = sandbox_url
        url, gunicorn = procs.gunicorn()  # as make run: uvicorn workers, rivya.asgi
        cpu_groups: dict[str, Callable[[], list[int]]] = {
            "gunicorn": lambda: tree_pids(gunicorn.pid),
            "postgres": lambda: pids_named("postgres"),
            "sandbox": lambda: [sandbox.pid],
        }

        # 1. Overhead.
        overhead = measure_overhead(url, sandbox_url, keys[0], overhead_sessions, config.chat_turns)
        problems += overhead.problems
        print(
            f"  overhead: {len(overhead.rivya)} turns of {OVERHEAD_TOKENS} tokens "
            f"{OVERHEAD_DELAY_MS} ms apart; first token p50 Rivya "
            f"{_ms(_p([t.first for t in overhead.rivya], 50))}, sandbox "
            f"{_ms(_p([t.first for t in overhead.sandbox], 50))}; total p50 Rivya "
            f"{_ms(_p([t.total for t in overhead.rivya], 50))}, sandbox "
            f"{_ms(_p([t.total for t in overhead.sandbox], 50))}",
            flush=True,
        )

        # 2. Concurrency, after the idle baseline.
        idle, idle_pg = idle_baseline(config, url, keys[0], config.seconds)
        print(
            f"  idle: GET /api/v1/credits/ x{len(idle)} p50 {_ms(_p(idle, 50))}, "
            f"p95 {_ms(_p(idle, 95))}; at most {idle_pg} PostgreSQL connections",
            flush=True,
        )
        before = httpx.get(f"{sandbox_url}/v1/chat/stats", trust_env=False).json()
        for (count, ids), tag in zip(rounds_spec, ("small", "full"), strict=True):
            streams = [
                {"key": keys[n % len(keys)], "session": session} for n, session in enumerate(ids)
            ]
            ramp = config.chat_ramp * count / streams_n
            got = run_round(
                config,
                url=url,
                sandbox_url=sandbox_url,
                api_key_=keys[0],
                streams=streams,
                tokens=stream_tokens,
                ramp=ramp,
                cpu_groups=cpu_groups,
                tag=tag,
            )
            problems += got.problems
            problems += [f"{tag}: {p}" for p in settled_in_db(ids, stream_tokens)]
            connections.close_all()
            rounds.append(got)
            settled = sum(r["settled_status"] == "COMPLETE" for r in got.results)
            print(
                f"  {count} streams of {stream_tokens} tokens ({config.chat_stream_seconds} s), "
                f"opened over {ramp:.1f} s: {settled} settled COMPLETE; {got.window_kind} for "
                f"{got.window[1] - got.window[0]:.1f} s; sandbox held at most "
                f"{got.sandbox_open_max} at once; GET /api/v1/credits/ meanwhile "
                f"x{len(got.api_window)} p50 {_ms(_p(got.api_window, 50))}, p95 "
                f"{_ms(_p(got.api_window, 95))}, max {_ms(max(got.api_window, default=0))}; "
                f"PostgreSQL connections at most {got.pg_max} ({got.pg_max_active} active; "
                f"{got.pg_max_opening} while opening, {got.pg_max_window} while all open, "
                f"{got.pg_max_closing} while settling); stream client "
                f"{got.client_cpu:.1f} CPU s",
                flush=True,
            )
            if got.cpu_line:
                print(f"    while all open: {got.cpu_line}", flush=True)
        after = httpx.get(f"{sandbox_url}/v1/chat/stats", trust_env=False).json()
        disconnects = after["chat_disconnects"] - before["chat_disconnects"]
        if disconnects:
            problems.append(f"the sandbox counted {disconnects} streams left before their end")

        # 3. The rest of the API: make run's server vs the earlier WSGI server.
        load_keys = keys[: config.clients]
        got_load, found = load_server(config, url, gunicorn.pid, load_keys, "make run")
        loads.append(got_load)
        problems += found
        procs.stop(gunicorn)
        for label, extra in (("WSGI (60)", {}), ("WSGI (0)", {"DB_CONN_MAX_AGE": "0"})):
            wsgi_url, wsgi = procs.gunicorn(server="wsgi", **extra)
            got_load, found = load_server(config, wsgi_url, wsgi.pid, load_keys, label)
            loads.append(got_load)
            problems += found
            procs.stop(wsgi)
    pgbench = Pgbench(
        url=config.url, database=config.pgbench_database, executable=config.pgbench_executable
    )
    tps = pgbench.tpcb_tps(clients=config.clients, seconds=config.seconds)
    print(f"  pgbench: {tps:.1f} tps at {config.clients} clients", flush=True)

    breaches = run_checks()
    problems += [f"ledger_check: {b.check}: {b.detail}" for b in breaches]
    print(f"  ledger_check: {'ok' if not breaches else 'BREACH'}", flush=True)
    rows = _rows(config, overhead, idle, idle_pg, rounds, loads, tps, stream_tokens)
    return SuiteResult(rows=rows, ok=not problems, problems=problems)


def _rows(
    config: SuiteConfig,
    overhead: Overhead,
    idle: list[float],
    idle_pg: int,
    rounds: list[Round],
    loads: list[ServerLoad],
    tps: float,
    stream_tokens: int,
) -> list[Row]:
    rows: list[Row] = []
    turns = f"{len(overhead.rivya)} turns × {OVERHEAD_TOKENS} tokens"
    for what, attr in (("first token", "first"), ("total", "total")):
        for p in (50, 95):
            mine = _p([getattr(t, attr) for t in overhead.rivya], p)
            theirs = _p([getattr(t, attr) for t in overhead.sandbox], p)
            rows.append(
                Row(
                    suite="chat",
                    measurement=f"streamed turn, {what} p{p}",
                    value=_ms(mine),
                    reference=f"sandbox direct {_ms(theirs)}",
                    ratio=_ratio(mine, theirs),
                    notes=f"{turns}, {OVERHEAD_DELAY_MS} ms apart; +{_ms(mine - theirs)}",
                )
            )
    i50, i95 = _p(idle, 50), _p(idle, 95)
    for got in rounds:
        settled = sum(r["settled_status"] == "COMPLETE" for r in got.results)
        seconds = stream_tokens * STREAM_DELAY_MS / 1000
        rows.append(
            Row(
                suite="chat",
                measurement=f"{got.streams} streams × {seconds:.0f} s held at once",
                value=f"{settled} settled",
                reference=f"{got.streams} opened",
                ratio=settled / got.streams if got.streams else None,
                notes=f"sandbox held {got.sandbox_open_max} at once; {got.window_kind} "
                f"{got.window[1] - got.window[0]:.1f} s",
            )
        )
        for p, ref in ((50, i50), (95, i95)):
            value = _p(got.api_window, p)
            rows.append(
                Row(
                    suite="chat",
                    measurement=f"GET /credits/ p{p}, {got.streams} streams open",
                    value=_ms(value),
                    reference=f"idle {_ms(ref)}",
                    ratio=_ratio(value, ref),
                    notes=f"{len(got.api_window)} samples, {got.api_failed} failed"
                    if p == 50
                    else f"max {_ms(max(got.api_window, default=0))}",
                )
            )
    if len(rounds) == 2:
        small, full = rounds
        rows.append(
            Row(
                suite="chat",
                measurement=f"PostgreSQL connections, max, {full.streams} streams",
                value=str(full.pg_max),
                reference=f"{small.pg_max} at {small.streams} streams",
                ratio=_ratio(full.pg_max, small.pg_max),
                notes=f"limit {PG_LIMIT}; idle {idle_pg}; {full.pg_max_opening} while opening, "
                f"{full.pg_max_window} while all open, {full.pg_max_closing} while settling; "
                f"{full.pg_max_active} active at most",
            )
        )
        if full.cores:
            rows[-1].notes += (
                f"; cores while open: gunicorn {full.cores.get('gunicorn', 0):.2f}, postgres "
                f"{full.cores.get('postgres', 0):.2f}, sandbox {full.cores.get('sandbox', 0):.2f}, "
                f"client {full.cores.get('stream client', 0):.2f}"
            )
    by_label = {load.label: load for load in loads}
    asgi, wsgi = by_label.get("make run"), by_label.get("WSGI (60)")
    wsgi0 = by_label.get("WSGI (0)")
    if asgi and wsgi:
        for what, attr in (("GET /credits/", "read"), ("POST /chat/sessions/", "write")):
            a, w = getattr(asgi, attr), getattr(wsgi, attr)
            z = getattr(wsgi0, attr) if wsgi0 else None
            rows.extend(
                Row(
                    suite="chat",
                    measurement=f"{what} p{p}, {config.clients} clients, make run",
                    value=_ms(_p(a.latencies, p)),
                    reference=f"WSGI age 60 {_ms(_p(w.latencies, p))}",
                    ratio=_ratio(_p(a.latencies, p), _p(w.latencies, p)),
                    notes=f"WSGI age 0 {_ms(_p(z.latencies, p))}" if z is not None else "",
                )
                for p in (50, 95)
            )
            ra, rw = len(a.latencies) / a.seconds, len(w.latencies) / w.seconds
            ea, ew = getattr(asgi, f"{attr}_exited"), getattr(wsgi, f"{attr}_exited")
            notes = f"cores: ASGI gunicorn {(a.cores or {}).get('gunicorn', 0):.2f} postgres "
            notes += f"{(a.cores or {}).get('postgres', 0):.2f} + exited backends {ea:.2f}; "
            notes += f"WSGI gunicorn {(w.cores or {}).get('gunicorn', 0):.2f} postgres "
            notes += f"{(w.cores or {}).get('postgres', 0):.2f} + exited {ew:.2f}"
            if z is not None:
                notes += f"; WSGI age 0 {len(z.latencies) / z.seconds:.0f}/s"
            rows.append(
                Row(
                    suite="chat",
                    measurement=f"{what} rate, {config.clients} clients, make run",
                    value=f"{ra:.0f}/s",
                    reference=f"WSGI age 60 {rw:.0f}/s",
                    ratio=_ratio(ra, rw),
                    notes=notes,
                )
            )
        rows.append(
            Row(
                suite="chat",
                measurement=f"PostgreSQL connections, max, {config.clients} clients, make run",
                value=str(asgi.pg_max),
                reference=f"WSGI age 60 {wsgi.pg_max}",
                ratio=_ratio(asgi.pg_max, wsgi.pg_max),
                notes=f"WSGI age 0 {wsgi0.pg_max}" if wsgi0 else "",
            )
        )
        rate = len(asgi.read.latencies) / asgi.read.seconds
        rows.append(
            Row(
                suite="chat",
                measurement=f"GET /credits/ rate, {config.clients} clients, make run",
                value=f"{rate:.0f}/s",
                reference=f"pgbench {tps:.0f} tps",
                ratio=_ratio(rate, tps),
                notes="the machine reference of the other suites",
            )
        )
    return rows
