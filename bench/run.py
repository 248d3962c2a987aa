"""Rivya benchmarks: ``make bench`` (``make bench BENCH_ARGS="--quick"`` for a 2 s smoke).

Holds per second through ``billing.services`` on one hot account and on many accounts, next to
pgbench's TPC-B-like transactions per second at the same client count, measured in the same run
on the same server, printed as ratios. See ``bench/README.md``.

The database named in ``DATABASE_URL`` only locates the server: the holds run in a scratch
database ``rivya_bench`` (migrated here) and pgbench in ``rivya_pgbench``; both are dropped and
recreated at the start and dropped at the end (``--keep`` leaves them for inspection).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import scratch  # noqa: E402 - needs ROOT on sys.path

if TYPE_CHECKING:
    from bench.holds import Result

DEFAULT_URL = "postgres://postgres@127.0.0.1:5432/rivya"
HOLDS_DB = "rivya_bench"
PGBENCH_DB = "rivya_pgbench"
DEFAULT_SCENARIOS = "hot,many,hot+capture,many+capture"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8, help="client threads (1-50, default 8)")
    parser.add_argument("--seconds", type=int, default=10, help="per measurement (default 10)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 s per measurement")
    parser.add_argument("--scale", type=int, help="pgbench scale factor (default: --clients)")
    parser.add_argument(
        "--scenarios", default=DEFAULT_SCENARIOS, help=f"comma-separated ({DEFAULT_SCENARIOS})"
    )
    parser.add_argument("--pgbench", default="pgbench", help="the pgbench executable")
    parser.add_argument("--keep", action="store_true", help="keep the scratch databases")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds = 2
    if not 1 <= args.clients <= 50:
        parser.error("--clients must be between 1 and 50 (PostgreSQL allows 100 connections)")
    if not 1 <= args.seconds <= 600:
        parser.error("--seconds must be between 1 and 600")
    args.scale = args.scale or args.clients
    if args.scale < 1:
        parser.error("--scale must be positive")
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(args.scenarios) - set(DEFAULT_SCENARIOS.split(","))
    if unknown or not args.scenarios:
        parser.error(f"--scenarios: choose among {DEFAULT_SCENARIOS}")
    return args


def setup_django(url: str) -> None:
    """Point Django at the scratch database, then set it up and migrate it."""
    os.environ["DATABASE_URL"] = scratch.url_with_db(url, HOLDS_DB)
    os.environ["DEBUG"] = "0"  # DEBUG keeps every query in memory: not in a benchmark
    os.environ.setdefault("SECRET_KEY", "bench-secret-key")
    os.environ["DJANGO_SETTINGS_MODULE"] = "rivya.settings"

    import django
    from django.conf import settings
    from django.core.management import call_command

    django.setup()
    name = settings.DATABASES["default"]["NAME"]
    if name != HOLDS_DB:  # never benchmark into a real database
        raise SystemExit(f"Django points at {name!r}, not the scratch database {HOLDS_DB!r}")
    call_command("migrate", verbosity=0, interactive=False)


def server_version() -> str:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SHOW server_version")
        return str(cursor.fetchone()[0])


def print_table(results: list[Result], tps: float) -> None:
    header = ("scenario", "clients", "ops", "ops/s", "pgbench tps", "ratio", "client CPU")
    rows = [
        (
            r.scenario.name,
            str(r.clients),
            str(r.ops),
            f"{r.ops_per_second:.0f}",
            f"{tps:.0f}",
            f"{r.ops_per_second / tps:.3f}",
            f"{r.client_cores:.2f} cores",
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))])

    print(line(header))
    for row in rows:
        print(line(row))
    print(
        "ops = holds created (created and captured, for +capture); "
        "pgbench tps = mean of the runs before and after; ratio = ops/s / pgbench tps"
    )


def ledger_ok() -> bool:
    from billing.invariants import run_checks

    breaches = run_checks()
    for breach in breaches:
        print(f"ledger_check: BREACH {breach.check}: {breach.detail}")
    if breaches:
        return False
    print("ledger_check: ok")
    return True


def bench(args: argparse.Namespace, url: str) -> int:
    setup_django(url)

    from bench import holds

    print(
        f"Rivya bench {datetime.now(tz=UTC):%Y-%m-%d %H:%M} UTC: {os.cpu_count()} CPUs, "
        f"PostgreSQL {server_version()}, Python {platform.python_version()}, "
        f"{args.clients} clients, {args.seconds} s per measurement"
    )
    pgbench = scratch.Pgbench(url=url, database=PGBENCH_DB, executable=args.pgbench)
    pgbench.initialize(scale=args.scale)
    # pgbench runs before and after the holds and the ratios use the mean, so that a machine
    # whose speed drifts during the run (a shared VM) skews them less; both figures are shown.
    before = pgbench.tpcb_tps(clients=args.clients, seconds=args.seconds)
    print(f"pgbench before: TPC-B-like, scale {args.scale}: {before:.1f} tps")

    holds.system_accounts()
    results = []
    for name in args.scenarios:
        scenario = holds.SCENARIOS[name]
        result = holds.run_scenario(scenario, clients=args.clients, seconds=args.seconds)
        print(f"{name}: {result.ops} ops in {result.seconds:.2f} s ({scenario.description})")
        results.append(result)

    after = pgbench.tpcb_tps(clients=args.clients, seconds=args.seconds)
    tps = (before + after) / 2
    print(f"pgbench after: {after:.1f} tps; mean {tps:.1f} tps")
    print()
    print_table(results, tps)
    print()
    return 0 if ledger_ok() else 1


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    url = os.environ.get("DATABASE_URL") or DEFAULT_URL
    scratch.check_postgres_url(url)
    for name in (HOLDS_DB, PGBENCH_DB):
        scratch.recreate_database(url, name)
    try:
        return bench(args, url)
    finally:
        if "django" in sys.modules:
            from django.db import connections

            connections.close_all()
        if not args.keep:
            for name in (HOLDS_DB, PGBENCH_DB):
                scratch.drop_database(url, name)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
