"""The anchor of the submit suite: a bare WSGI app doing one pgbench TPC-B-like transaction per
request, served by the same gunicorn command lines as Rivya (``bench.bare_wsgi:application``).

Standard library and psycopg2 only. ``BARE_DATABASE_URL`` is the pgbench database
(``pgbench -i -s K``); each worker thread keeps one connection for its whole life. A ``POST``
(any path) reads its body, then runs what pgbench's built-in ``tpcb-like`` script runs, one
statement per round trip (BEGIN; UPDATE pgbench_accounts; SELECT abalance; UPDATE
pgbench_tellers; UPDATE pgbench_branches; INSERT INTO pgbench_history; COMMIT) with a random
account, teller, branch and delta drawn as pgbench draws them, and answers 200 with a small JSON
body. A ``GET`` answers 200 without touching the database (the readiness check).
"""

from __future__ import annotations

import json
import os
import random
import threading
from collections.abc import Callable, Iterable
from typing import Any

import psycopg2

_local = threading.local()
_scale: list[int] = []  # the pgbench scale, read once per process


def _connection() -> Any:
    conn = getattr(_local, "conn", None)
    if conn is None or conn.closed:
        conn = psycopg2.connect(os.environ["BARE_DATABASE_URL"])
        _local.conn = conn
        if not _scale:
            with conn.cursor() as cursor:
                cursor.execute("SELECT count(*) FROM pgbench_branches")
                _scale.append(int(cursor.fetchone()[0]))
            conn.commit()
    return conn


def _transaction() -> dict[str, int]:
    conn = _connection()
    scale = _scale[0]
    aid = random.randint(1, 100_000 * scale)
    bid = random.randint(1, scale)
    tid = random.randint(1, 10 * scale)
    delta = random.randint(-5000, 5000)
    try:
        with conn.cursor() as cur:  # psycopg2 sends BEGIN before the first statement
            cur.execute(
                "UPDATE pgbench_accounts SET abalance = abalance + %s WHERE aid = %s", (delta, aid)
            )
            cur.execute("SELECT abalance FROM pgbench_accounts WHERE aid = %s", (aid,))
            balance = int(cur.fetchone()[0])
            cur.execute(
                "UPDATE pgbench_tellers SET tbalance = tbalance + %s WHERE tid = %s", (delta, tid)
            )
            cur.execute(
                "UPDATE pgbench_branches SET bbalance = bbalance + %s WHERE bid = %s", (delta, bid)
            )
            cur.execute(
                "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) "
                "VALUES (%s, %s, %s, %s, CURRENT_TIMESTAMP)",
                (tid, bid, aid, delta),
            )
        conn.commit()
    except BaseException:
        _local.conn = None
        conn.close()
        raise
    return {"aid": aid, "abalance": balance}


def application(
    environ: dict[str, Any], start_response: Callable[[str, list[tuple[str, str]]], Any]
) -> Iterable[bytes]:
    if environ["REQUEST_METHOD"] == "POST":
        length = int(environ.get("CONTENT_LENGTH") or 0)
        if length:
            environ["wsgi.input"].read(length)
        body = json.dumps(_transaction()).encode()
        status = "200 OK"
    else:
        body, status = b'{"ok": true}', "200 OK"
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    )
    return [body]
