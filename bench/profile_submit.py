"""The profile of one ``POST /api/v1/tasks/`` (issue 18): its database round trips and the CPU
per request of the gunicorn workers.

    make install   # once; then, PostgreSQL's URL in DATABASE_URL (only its server is used):
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/rivya_bench \\
        .venv/bin/python bench/profile_submit.py [--app PATH] [--server sync|gthread]
        [--seconds S] [--clients N] [--close]

``--app`` profiles another checkout of the project (default: this one), e.g. a ``git worktree``
of an earlier commit: its code is what gunicorn, the set-up and the dispatcher run (this
script's own helpers come from this checkout). Everything runs against a scratch database,
``rivya_bench_profile``, dropped and created again at the start and dropped at the end
(``--keep`` leaves it), with Rivya's environment as in the submit suite (``bench/submit.py``:
``SECRET_KEY``, ``DATABASE_URL``, ``REDIS_URL``, ``CELERY_BROKER_URL`` on the bench Redis db 9,
flushed before and after, and the capacity limits far out of the way).

1. **Round trips.** gunicorn (``-k sync -w 1``) reaches PostgreSQL through a small proxy in this
   process that reads the client's side of the protocol and records every message that waits
   for the server: each simple-protocol query (``Q``: psycopg2 sends everything this way,
   ``BEGIN``, ``COMMIT``, ``SAVEPOINT`` and the connection health check ``SELECT 1`` included)
   and each extended-protocol ``Sync``. After warm-up requests (connection opened, caches
   filled) JSON submits are sent one at a time, without and then with a unique
   ``Idempotency-Key``; the statements between a request and its answer (plus a short grace)
   are its round trips. If the checkout has ``manage.py dispatch_submits`` it runs on a proxy
   of its own, and its statements over the same requests are reported apart.
2. **CPU per request.** gunicorn with the submit suite's command line (``--server``, default
   ``sync``: ``-w 4``; ``gthread``: ``-w 2 --threads 4``), straight to PostgreSQL, under
   ``bench/load.py`` (``--clients`` threads, keep-alive unless ``--close``): a 2 s warm-up then
   ``--seconds`` measured; gunicorn's CPU seconds (arbiter and workers) ÷ answered requests,
   without and with a unique ``Idempotency-Key`` per request. PostgreSQL's CPU is printed per
   request too. The dispatcher does not run in this phase (as no worker does): the submit
   suite times it apart.

Prints ``round trips: N (list)`` and ``CPU per request: X ms`` for each kind of request.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import scratch  # noqa: E402 - needs ROOT on sys.path
from bench.common import (  # noqa: E402
    BENCH_REDIS_URL,
    DB_PREFIX,
    INHERITED,
    SECRET_KEY,
    SuiteConfig,
    flush_bench_redis,
)
from bench.pg_proxy import PgProxy  # noqa: E402
from bench.procs import WSGI_SERVERS, Processes  # noqa: E402
from bench.run import background_load  # noqa: E402
from bench.submit import BODY, NO_LIMIT, Window, check_load, run_load  # noqa: E402

DATABASE = f"{DB_PREFIX}profile"
DEFAULT_URL = "postgres://postgres@127.0.0.1:5432/rivya"
WARMUP_REQUESTS = 5  # per kind, before the recorded ones
RECORDED_REQUESTS = 3  # per kind
GRACE_S = 0.2  # after an answer, for statements sent after the response (there should be none)

SETUP = """
import json, os, sys
import django
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "rivya.settings")
django.setup()
from django.core.management import call_command
call_command("migrate", verbosity=0, interactive=False)
from django.contrib.auth import get_user_model
from billing import services as billing
from rivya.services import api_key_create
from tasks.catalog import seed_catalog
import tasks
seed_catalog()
keys = []
for n in range(int(sys.argv[1])):
    user = get_user_model().objects.create_user(username=f"bench-profile-{n}")
    billing.grant(user=user, amount=10**12, reason="bench funding")
    keys.append(str(api_key_create(user=user, name="bench").raw))
print(json.dumps({"keys": keys, "code": os.path.dirname(os.path.dirname(tasks.__file__))}))
"""


def label(sql: str) -> str:
    """A short name for a statement: its verb and first table, e.g. 'UPDATE billing_account'."""
    text = " ".join(sql.split())
    verb = text.split(" ", 1)[0].upper() if text else "?"
    if verb in ("BEGIN", "COMMIT") or text.upper() in ("SELECT 1", "ROLLBACK"):
        return text
    if verb in ("SAVEPOINT", "RELEASE", "ROLLBACK"):
        return re.sub(r'\s+"?[A-Za-z0-9_]+"?$', "", text)  # without the savepoint's name
    if verb == "SET":
        return text[:40]
    match = re.search(r'\b(?:FROM|INTO|UPDATE)\s+"?([A-Za-z0-9_]+)"?', text, re.IGNORECASE)
    if verb == "WITH":  # one statement doing several writes: name each
        writes = re.findall(
            r'\b(INSERT\s+INTO|UPDATE|DELETE\s+FROM)\s+"?([A-Za-z0-9_]+)"?', text, re.IGNORECASE
        )
        found = ", ".join(  # not ON CONFLICT's "DO UPDATE SET"
            f"{w.split()[0].upper()} {table}" for w, table in writes if table.upper() != "SET"
        )
        return f"WITH ({found or 'SELECT'})"
    return f"{verb} {match.group(1)}" if match else text[:40]


# --- the runs ---------------------------------------------------------------------------------


def rivya_env(database_url: str) -> dict[str, str]:
    return {
        **{name: os.environ[name] for name in INHERITED if name in os.environ},
        "SECRET_KEY": SECRET_KEY,
        "DATABASE_URL": database_url,
        "REDIS_URL": BENCH_REDIS_URL,
        "CELERY_BROKER_URL": BENCH_REDIS_URL,
        "TASK_MAX_RUNNING_PER_USER": NO_LIMIT,
        "TASK_MAX_RUNNING": NO_LIMIT,
    }


def via(url: str, port: int) -> str:
    """``url`` through the proxy on ``port`` (no TLS: the proxy reads the protocol)."""
    parts = urlsplit(url)
    auth = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    query = "sslmode=disable" + (f"&{parts.query}" if parts.query else "")
    return urlunsplit((parts.scheme, f"{auth}127.0.0.1:{port}", parts.path, query, ""))


def post(port: int, key: str, idempotency: str | None) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    if idempotency:
        headers["Idempotency-Key"] = idempotency
    try:
        conn.request("POST", "/api/v1/tasks/", body=json.dumps(BODY).encode(), headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def round_trips(
    args: argparse.Namespace, run_dir: Path, db_url: str, key: str
) -> dict[str, list[list[str]]]:
    """Statements of each recorded request, by kind ('plain', 'idempotent'), and the
    dispatcher's ('dispatcher …')."""
    parts = urlsplit(db_url)
    app_proxy = PgProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    dispatcher_proxy = PgProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    found: dict[str, list[list[str]]] = {}
    try:
        with Processes(run_dir, rivya_env(via(db_url, app_proxy.port)), cwd=args.app) as procs:
            if (args.app / DISPATCHER).exists():
                procs.start(
                    "dispatcher-proxied",
                    [sys.executable, "manage.py", "dispatch_submits"],
                    DATABASE_URL=via(db_url, dispatcher_proxy.port),
                )
            url, _ = procs.gunicorn_wsgi(
                "rivya.wsgi:application",
                "sync1",
                name="gunicorn-proxied",
                ready_path="/api/v1/models/",
            )
            port = int(urlsplit(url).port or 80)
            for kind in ("plain", "idempotent"):
                for n in range(WARMUP_REQUESTS + RECORDED_REQUESTS):
                    idem = f"profile-{kind}-{n}-{time.time_ns()}" if kind == "idempotent" else None
                    mark = app_proxy.recorder.mark()
                    dmark = dispatcher_proxy.recorder.mark()
                    status = post(port, key, idem)
                    if status != 202:
                        raise SystemExit(f"POST /api/v1/tasks/ answered {status}, not 202")
                    time.sleep(GRACE_S)
                    if n >= WARMUP_REQUESTS:
                        found.setdefault(kind, []).append(app_proxy.recorder.since(mark))
                        found.setdefault(f"dispatcher {kind}", []).append(
                            dispatcher_proxy.recorder.since(dmark)
                        )
    finally:
        app_proxy.close()
        dispatcher_proxy.close()
    return found


def cpu_per_request(
    args: argparse.Namespace, run_dir: Path, db_url: str, keys: list[str]
) -> dict[str, Window]:
    config = SuiteConfig(
        suite="profile",
        url=db_url,
        database=DATABASE,
        pgbench_database="",
        pgbench_executable="",
        clients=args.clients,
        seconds=args.seconds,
        quick=False,
        run_dir=str(run_dir),
    )
    windows: dict[str, Window] = {}
    with Processes(run_dir, rivya_env(db_url), cwd=args.app) as procs:
        # No dispatcher here (as no worker): the CPU is the request's, as in the submit suite.
        extra: dict[str, Any] = {}
        url, gunicorn = procs.gunicorn_wsgi(
            "rivya.wsgi:application", args.server, name="gunicorn", ready_path="/api/v1/models/"
        )
        for kind in ("plain", "idempotent"):
            spec = {
                "path": "/api/v1/tasks/",
                "keys": keys,
                "body": BODY,
                "expect": 202,
                "keepalive": not args.close,
                "idempotency": kind == "idempotent",
            }
            warm = run_load(
                config,
                url,
                spec | {"idempotency_prefix": f"{kind}-w"},
                2,
                gunicorn.pid,
                f"{kind}-warmup",
                extra,
            )
            problems = check_load(warm, "warm-up")
            result = run_load(
                config,
                url,
                spec | {"idempotency_prefix": kind},
                args.seconds,
                gunicorn.pid,
                kind,
                extra,
            )
            problems += check_load(result, kind)
            if problems:
                raise SystemExit("; ".join(problems))
            windows[kind] = Window(what=kind, result=result, expect="202")
    return windows


DISPATCHER = Path("tasks/management/commands/dispatch_submits.py")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--app", type=Path, default=ROOT, help="the checkout to profile")
    parser.add_argument("--server", choices=("sync", "gthread"), default="sync")
    parser.add_argument("--seconds", type=int, default=10, help="CPU window (default 10)")
    parser.add_argument("--clients", type=int, default=8, help="load threads (default 8)")
    parser.add_argument("--close", action="store_true", help="one connection per request")
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    args = parser.parse_args(argv)
    args.app = args.app.resolve()
    url = os.environ.get("DATABASE_URL") or DEFAULT_URL
    scratch.check_postgres_url(url)
    db_url = scratch.url_with_db(url, DATABASE)
    commit = subprocess.run(
        ["git", "-C", str(args.app), "log", "-1", "--format=%h %s"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    dirty = subprocess.run(
        [
            "git",
            "-C",
            str(args.app),
            "status",
            "--porcelain",
            "--untracked-files=no",
            "--",
            ".",
            ":!bench",
        ],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    print(f"profile of POST /api/v1/tasks/: {args.app} at {commit[:70]}", flush=True)
    if dirty:
        print(f"  (uncommitted changes outside bench/: {len(dirty.splitlines())} files)")
    busy = background_load()
    print(
        f"  background load: {busy:.2f} cores busy"
        + ("  WARNING: the machine is not quiet; CPU per request reads high" if busy > 0.3 else ""),
        flush=True,
    )
    run_dir = Path(tempfile.mkdtemp(prefix="rivya-profile-"))
    scratch.recreate_database(url, DATABASE)
    flush_bench_redis()
    try:
        setup = subprocess.run(
            [sys.executable, "-c", SETUP, str(args.clients)],
            cwd=args.app,
            env={**rivya_env(db_url), "PYTHONPATH": str(args.app)},
            capture_output=True,
            text=True,
            check=False,
        )
        if setup.returncode != 0:
            raise SystemExit(f"set-up failed:\n{setup.stdout}{setup.stderr}")
        info = json.loads(setup.stdout.strip().splitlines()[-1])
        if Path(info["code"]).resolve() != args.app:
            raise SystemExit(f"the set-up imported the project from {info['code']}, not {args.app}")
        keys = info["keys"]
        found = round_trips(args, run_dir, db_url, keys[0])
        windows = cpu_per_request(args, run_dir, db_url, keys)
    finally:
        flush_bench_redis()
        if not args.keep:
            scratch.drop_database(url, DATABASE)
    print()
    names = {"plain": "without Idempotency-Key", "idempotent": "with Idempotency-Key"}
    for kind in ("plain", "idempotent"):
        recorded = found[kind]
        counts = sorted({len(r) for r in recorded})
        same = "" if len(counts) == 1 else f" (recorded requests differ: {counts})"
        statements = recorded[-1]
        print(
            f"{names[kind]}: round trips: {len(statements)} "
            f"({'; '.join(label(s) for s in statements)}){same}"
        )
        dispatched = found.get(f"dispatcher {kind}", [])
        if (args.app / DISPATCHER).exists():
            total = sum(len(r) for r in dispatched)
            print(
                f"  dispatcher: {total} round trips over the {len(dispatched)} recorded requests "
                f"(statements it sent while each request and its {GRACE_S:.1f} s grace ran)"
            )
    for kind in ("plain", "idempotent"):
        window = windows[kind]
        extra = ""
        connections = (
            "one connection per request"
            if args.close or args.server == "sync"  # the sync worker closes every connection
            else "keep-alive"
        )
        if "dispatcher" in (window.result.cores or {}):
            extra = f", dispatcher {window.cpu_ms('dispatcher'):.2f} ms"
        print(
            f"{names[kind]}: CPU per request: {window.cpu_ms():.1f} ms (gunicorn "
            f"{WSGI_SERVERS[args.server][1]} {' '.join(WSGI_SERVERS[args.server][2:])}, "
            f"{args.clients} clients, {connections}, {window.ok_count} submits in "
            f"{window.result.seconds:.1f} s = {window.rate:.0f}/s; "
            f"postgres {window.cpu_ms('postgres'):.1f} ms{extra})"
        )
        print(f"  {window.notes()}")
    print()
    for kind in ("plain", "idempotent"):
        print(f"statements {names[kind]}:")
        for n, statement in enumerate(found[kind][-1], start=1):
            text = " ".join(statement.split())
            print(f"  {n:2}. {text[:160]}{'…' if len(text) > 160 else ''}")
    if not args.keep:
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
