"""Rivya benchmarks: ``make bench`` (``make bench BENCH_ARGS="--quick"`` for a smoke run).

Every figure is printed next to a limit of the same machine measured in the same run, as a
ratio: absolute times on a shared VM drift, ratios within one run much less. Suites
(``--suite``, default all):

- ``holds``: holds/s through ``billing.services`` vs pgbench TPC-B-like tps, same client count;
- ``submit``: ``POST /api/v1/tasks/`` (and with an ``Idempotency-Key``) through gunicorn sync ×4
  and gthread 2×4 vs a bare WSGI app doing one pgbench transaction per request on the same
  server command line, and vs pgbench TPC-B-like tps, same clients (issue 18);
- ``callbacks``: signed callbacks taken in through gunicorn, and their finalization (SUCCESS,
  capture) by a Celery worker, each vs pgbench TPC-B-like tps at the same client count;
- ``latency``: submit → SUCCESS p50/p99 with a zero-latency sandbox, a Celery worker and beat,
  vs the round trip of a trivial authenticated GET on the same server;
- ``scale``: poll-cycle and history-page cost, and queries per request, at 10k vs 1M stored
  tasks (ratio 1M ÷ 10k; should be ~1);
- ``chat``: a streamed chat turn's time to first token and total time vs the sandbox's own
  stream; 200 streams of 30 s held at once, with the API's latency meanwhile vs idle and the
  PostgreSQL connections used; the API under ASGI with ``CONN_MAX_AGE=0`` vs the earlier WSGI
  gthread server with persistent connections. Not in the default run (``--suite chat``);
- ``single``: a synchronous translation (``POST /api/v1/single/translation/``, the sandbox as
  its provider) per second and p50/p99 vs the same request to a ``noop`` provider; the gate's
  admitted maximum under 200 clients at once (Redis and database backends) vs its limit; also
  vs pgbench TPC-B-like tps. Not in the default run (``--suite single``).

Each suite runs in a process of its own (``bench/suite.py``) on a scratch database of its own
(``rivya_bench_<suite>``; pgbench uses ``rivya_bench_pgbench``), dropped and recreated at the
start and dropped at the end (``--keep`` leaves them). ``DATABASE_URL`` only locates the server.
See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import scratch  # noqa: E402 - needs ROOT on sys.path
from bench.common import DB_PREFIX, Row, SuiteConfig, SuiteResult, machine_seconds  # noqa: E402
from bench.procs import reap_recorded  # noqa: E402

DEFAULT_URL = "postgres://postgres@127.0.0.1:5432/rivya"
PGBENCH_DB = f"{DB_PREFIX}pgbench"
ALL_SUITES = ("holds", "submit", "callbacks", "latency", "scale", "chat", "single", "webhooks")
DEFAULT_SUITES = ("holds", "submit", "callbacks", "latency", "scale", "webhooks")
DEFAULT_SCENARIOS = "hot,many,hot+capture,many+capture"
STOP_GRACE_S = 60


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--suite",
        default=",".join(DEFAULT_SUITES),
        help=f"comma-separated suites to run, among {','.join(ALL_SUITES)} "
        f"(default {','.join(DEFAULT_SUITES)})",
    )
    parser.add_argument("--clients", type=int, default=8, help="client threads (1-50, default 8)")
    parser.add_argument("--seconds", type=int, default=10, help="per measurement (default 10)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 2 s per measurement, 20 lifecycle tasks, 10k vs 100k tasks",
    )
    parser.add_argument("--scale", type=int, help="pgbench scale factor (default: --clients)")
    parser.add_argument(
        "--scenarios", default=DEFAULT_SCENARIOS, help=f"holds: ({DEFAULT_SCENARIOS})"
    )
    parser.add_argument(
        "--submit-keepalive",
        action="store_true",
        help="callbacks, chat, single: keep one connection per load client (default: one per "
        "request); the submit suite keeps them by default",
    )
    parser.add_argument(
        "--submit-close",
        action="store_true",
        help="submit: one connection per request instead of keep-alive",
    )
    parser.add_argument(
        "--submit-servers",
        help="submit: comma-separated gunicorn configurations among sync (-w 4), gthread "
        "(-w 2 --threads 4), asgi (make run's), wsgi (the earlier gthread 2x8) (default "
        "sync,gthread; --server asgi|wsgi alone means that one)",
    )
    parser.add_argument(
        "--latency-tasks", type=int, help="latency: tasks submitted one by one (default 100)"
    )
    parser.add_argument(
        "--finalize-tasks",
        type=int,
        help="callbacks: deliveries taken in and tasks finalized (default 1000; --quick 100)",
    )
    parser.add_argument(
        "--latency-pool",
        choices=("prefork", "threads"),
        default="prefork",
        help="latency: the Celery worker's pool: prefork, concurrency 2 (default, as make run) "
        "or threads, concurrency 8 (as the end-to-end tests)",
    )
    parser.add_argument(
        "--scale-rows",
        help="scale: stored tasks, small and large (default 10000,1000000; --quick 10000,100000)",
    )
    parser.add_argument(
        "--repeat", type=int, help="scale: interleaved rounds, 4 timings each (default 30)"
    )
    parser.add_argument(
        "--server",
        choices=("asgi", "wsgi"),
        help="callbacks, latency: the web server: asgi (default, as make run: uvicorn "
        "workers, CONN_MAX_AGE 0) or wsgi (the earlier gunicorn gthread 2x8, CONN_MAX_AGE 60); "
        "submit: measure that server only, against pgbench (as before issue 18)",
    )
    parser.add_argument(
        "--chat-streams",
        type=int,
        help="chat: streams held open at once (default 200; --quick 20); a first round holds "
        "a tenth of them",
    )
    parser.add_argument(
        "--chat-stream-seconds",
        type=int,
        help="chat: how long each stream lasts, 10 tokens a second (default 30; --quick 3)",
    )
    parser.add_argument(
        "--chat-turns",
        type=int,
        help="chat: sequential turns timed against the sandbox's own stream (default 30; "
        "--quick 10)",
    )
    parser.add_argument(
        "--chat-ramp",
        type=float,
        help="chat: seconds over which the streams are opened (default 5; --quick 1; 0: all "
        "at once)",
    )
    parser.add_argument("--pgbench", default="pgbench", help="the pgbench executable")
    parser.add_argument("--keep", action="store_true", help="keep the scratch databases")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds = 2
    submit_servers = ("sync", "gthread", "asgi", "wsgi")
    if args.submit_servers:
        args.submit_servers = [s.strip() for s in args.submit_servers.split(",") if s.strip()]
        if not args.submit_servers or set(args.submit_servers) - set(submit_servers):
            parser.error(f"--submit-servers: choose among {','.join(submit_servers)}")
    else:
        args.submit_servers = [args.server] if args.server else ["sync", "gthread"]
    args.server = args.server or "asgi"
    if not 1 <= args.clients <= 50:
        parser.error("--clients must be between 1 and 50 (PostgreSQL allows 100 connections)")
    if not 1 <= args.seconds <= 600:
        parser.error("--seconds must be between 1 and 600")
    args.scale = args.scale or args.clients
    if args.scale < 1:
        parser.error("--scale must be positive")
    args.suites = [s.strip() for s in args.suite.split(",") if s.strip()]
    if not args.suites or set(args.suites) - set(ALL_SUITES):
        parser.error(f"--suite: choose among {','.join(ALL_SUITES)}")
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if not args.scenarios or set(args.scenarios) - set(DEFAULT_SCENARIOS.split(",")):
        parser.error(f"--scenarios: choose among {DEFAULT_SCENARIOS}")
    args.latency_tasks = args.latency_tasks or (20 if args.quick else 100)
    args.finalize_tasks = args.finalize_tasks or (100 if args.quick else 1000)
    if not 1 <= args.finalize_tasks <= 100_000:
        parser.error("--finalize-tasks must be between 1 and 100000")
    if not 1 <= args.latency_tasks <= 10_000:
        parser.error("--latency-tasks must be between 1 and 10000")
    rows = args.scale_rows or ("10000,100000" if args.quick else "10000,1000000")
    try:
        args.scale_rows = [int(n) for n in rows.split(",")]
    except ValueError:
        parser.error("--scale-rows: two integers, e.g. 10000,1000000")
    if len(args.scale_rows) != 2 or not 1_000 <= args.scale_rows[0] < args.scale_rows[1]:
        parser.error("--scale-rows: small,large with 1000 <= small < large")
    if args.scale_rows[1] > 20_000_000:
        parser.error("--scale-rows: at most 20,000,000 tasks")
    args.repeat = args.repeat or (10 if args.quick else 30)
    if not 1 <= args.repeat <= 1_000:
        parser.error("--repeat must be between 1 and 1000")
    args.chat_streams = args.chat_streams or (20 if args.quick else 200)
    if not 1 <= args.chat_streams <= 5_000:
        parser.error("--chat-streams must be between 1 and 5000")
    args.chat_stream_seconds = args.chat_stream_seconds or (3 if args.quick else 30)
    if not 1 <= args.chat_stream_seconds <= 500:
        parser.error("--chat-stream-seconds must be between 1 and 500 (the turn limit is 600 s)")
    args.chat_turns = args.chat_turns or (10 if args.quick else 30)
    if not 1 <= args.chat_turns <= 10_000:
        parser.error("--chat-turns must be between 1 and 10000")
    if args.chat_ramp is None:
        args.chat_ramp = 1.0 if args.quick else 5.0
    if not 0 <= args.chat_ramp <= 600:
        parser.error("--chat-ramp must be between 0 and 600")
    return args


def suite_timeout(args: argparse.Namespace, suite: str) -> float:
    """A bound on each suite process (it is stopped, and the run fails, past it)."""
    if suite == "holds":
        return 300 + args.seconds * (len(args.scenarios) + 2) * 2
    if suite == "submit":
        # pgbench twice; per configuration 3 warm-ups and windows, 2 starts, the dispatch wait.
        return 300 + args.seconds * 2 + len(args.submit_servers) * ((args.seconds + 2) * 3 + 90)
    if suite == "callbacks":
        return 300 + args.seconds * 4 * 2 + args.finalize_tasks
    if suite == "latency":
        return 300 + args.latency_tasks * 30
    if suite == "webhooks":
        # pgbench twice, two stacks started, 2,000 deliveries, 100 tasks, with margins.
        return 600 + args.seconds * 4
    if suite == "chat":
        # Two rounds of streams, the timed turns, six load windows and pgbench, with margins.
        rounds = 2 * (args.chat_ramp + args.chat_stream_seconds * 3 + 180)
        return 600 + rounds + args.chat_turns * 5 + args.seconds * 10
    if suite == "single":
        # Warm-ups and 3 pairs of rounds, 4 bursts, pgbench, with margins.
        return 420 + args.seconds * 10
    return 600 + args.scale_rows[1] / 10_000 * 5  # a million tasks: about 2 min of loading


def run_suite(args: argparse.Namespace, url: str, suite: str, run_dir: Path) -> SuiteResult | None:
    """Run one suite process; its rows, or None if it could not run (its output says why)."""
    config = SuiteConfig(
        suite=suite,
        url=url,
        database=f"{DB_PREFIX}{suite}",
        pgbench_database=PGBENCH_DB,
        pgbench_executable=args.pgbench,
        clients=args.clients,
        seconds=args.seconds,
        quick=args.quick,
        run_dir=str(run_dir / suite),
        scenarios=args.scenarios,
        submit_keepalive=args.submit_keepalive,
        submit_close=args.submit_close,
        submit_servers=args.submit_servers,
        latency_tasks=args.latency_tasks,
        finalize_tasks=args.finalize_tasks,
        latency_pool=args.latency_pool,
        scale_rows=args.scale_rows,
        repeat=args.repeat,
        large_database=f"{DB_PREFIX}{suite}_large" if suite == "scale" else "",
        server=args.server,
        chat_streams=args.chat_streams,
        chat_stream_seconds=args.chat_stream_seconds,
        chat_turns=args.chat_turns,
        chat_ramp=args.chat_ramp,
    )
    Path(config.run_dir).mkdir(parents=True, exist_ok=True)
    config_path = run_dir / f"{suite}.json"
    out_path = run_dir / f"{suite}-result.json"
    config.dump(config_path)
    print(f"[{suite}]", flush=True)
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "suite.py"), str(config_path), str(out_path)],
        cwd=ROOT,
    )
    try:
        proc.wait(timeout=suite_timeout(args, suite))
    except subprocess.TimeoutExpired:
        print(f"[{suite}] did not finish in time; stopping it", flush=True)
    finally:
        if proc.poll() is None:
            proc.terminate()  # the suite stops its servers on SIGTERM
            try:
                proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        reap_recorded(Path(config.run_dir))
    print(f"[{suite}] {time.monotonic() - started:.0f} s, exit {proc.returncode}", flush=True)
    if proc.returncode not in (0, 1) or not out_path.exists():
        return None
    result = SuiteResult.load(out_path)
    result.ok = result.ok and proc.returncode == 0
    return result


def print_table(rows: list[Row]) -> None:
    header = ("suite", "measurement", "value", "reference (same run)", "ratio", "notes")
    cells = [
        (
            r.suite,
            r.measurement,
            r.value,
            r.reference,
            "" if r.ratio is None else f"{r.ratio:.3f}",
            r.notes,
        )
        for r in rows
    ]
    widths = [max(len(c[i]) for c in [header, *cells]) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        left = (0, 1, 5)  # text columns; the figures are right-aligned
        return "  ".join(
            cell.ljust(w) if i in left else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()

    print(line(header))
    for row in cells:
        print(line(row))


def server_version(url: str) -> str:
    import psycopg2

    conn = psycopg2.connect(scratch.url_with_db(url, scratch.MAINTENANCE_DB))
    try:
        with conn.cursor() as cursor:
            cursor.execute("SHOW server_version")
            row = cursor.fetchone()
            return str(row[0]) if row else "?"
    finally:
        conn.close()


def background_load(seconds: float = 3.0) -> float:
    """Cores the machine keeps busy while the bench does nothing (other processes)."""
    before = machine_seconds()
    time.sleep(seconds)
    after = machine_seconds()
    idle = sum(after[k] - before[k] for k in ("idle", "iowait"))
    total = sum(after[k] - before[k] for k in after)
    return (total - idle) / total * (os.cpu_count() or 1) if total else 0.0


def _note_background(when: str) -> None:
    busy = background_load()
    warning = "  WARNING: the machine is not quiet; figures will be low" if busy > 0.3 else ""
    print(f"background load {when}: {busy:.2f} cores busy{warning}", flush=True)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(f"stopped by signal {signum}")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    url = os.environ.get("DATABASE_URL") or DEFAULT_URL
    scratch.check_postgres_url(url)
    signal.signal(signal.SIGTERM, _terminate)
    databases = [f"{DB_PREFIX}{suite}" for suite in args.suites]
    if "scale" in args.suites:
        databases.append(f"{DB_PREFIX}scale_large")
    needs_pgbench = bool(
        {"holds", "submit", "callbacks", "chat", "single", "webhooks"} & set(args.suites)
    )
    if needs_pgbench:
        databases.append(PGBENCH_DB)
    run_dir = Path(tempfile.mkdtemp(prefix="rivya-bench-"))
    print(
        f"Rivya bench {datetime.now(tz=UTC):%Y-%m-%d %H:%M} UTC: {os.cpu_count()} CPUs, "
        f"PostgreSQL {server_version(url)}, Python {platform.python_version()}, "
        f"suites {','.join(args.suites)}, {args.clients} clients, "
        f"{args.seconds} s per measurement",
        flush=True,
    )
    rows: list[Row] = []
    failed: list[str] = []
    notices: list[str] = []
    _note_background("before the run")
    try:
        for name in databases:
            scratch.recreate_database(url, name)
        if needs_pgbench:
            pgbench = scratch.Pgbench(url=url, database=PGBENCH_DB, executable=args.pgbench)
            pgbench.initialize(scale=args.scale)
            print(f"pgbench: initialized at scale {args.scale}", flush=True)
        for suite in args.suites:
            result = run_suite(args, url, suite, run_dir)
            if result is None:
                failed.append(f"{suite}: did not run to the end (see its output above)")
                continue
            rows.extend(result.rows)
            notices.extend(f"{suite}: {notice}" for notice in result.notices)
            failed.extend(f"{suite}: {problem}" for problem in result.problems)
            if not result.ok and not result.problems:
                failed.append(f"{suite}: failed")
    finally:
        for suite in args.suites:
            reap_recorded(run_dir / suite)
        if not args.keep:
            for name in databases:
                scratch.drop_database(url, name)
        if failed or args.keep:
            print(f"logs of the servers: {run_dir}", flush=True)
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
    _note_background("after the run")
    print()
    print_table(rows)
    print(
        "ratio = value / reference: holds, submit and callbacks against pgbench TPC-B-like tps "
        "at the same client count (mean of the runs before and after), submit also against the "
        "bare WSGI app on the same gunicorn configuration; latency against the round "
        "trip of GET /api/v1/credits/ on the same server; scale and queries: at the large "
        "count / at the small one (~1 = does not grow with history); chat: Rivya / the sandbox "
        "direct, during the streams / idle, ASGI (CONN_MAX_AGE 0) / WSGI gthread (60); single: "
        "the sandbox translation / the noop provider, the gate's most in flight / its limit."
    )
    if notices:
        print("targets (printed, not checked: the exit status is about correctness):")
        for notice in notices:
            print(f"  {notice}")
    for problem in failed:
        print(f"FAILED {problem}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
