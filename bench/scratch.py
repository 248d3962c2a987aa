"""Scratch PostgreSQL databases and pgbench, for ``bench/run.py``.

Nothing here imports Django: it runs before ``django.setup()``, which must already see the scratch
database in ``DATABASE_URL``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit, urlunsplit

import psycopg2
from psycopg2 import sql

MAINTENANCE_DB = "postgres"


def url_with_db(url: str, name: str) -> str:
    """``url`` pointing at database ``name`` instead (scheme, credentials and host unchanged)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


def check_postgres_url(url: str) -> None:
    if urlsplit(url).scheme not in ("postgres", "postgresql", "pgsql"):
        raise SystemExit(f"bench needs a PostgreSQL DATABASE_URL, not {url!r}")


def _execute(url: str, statement: sql.Composable) -> None:
    conn = psycopg2.connect(url_with_db(url, MAINTENANCE_DB))
    try:
        conn.autocommit = True  # CREATE/DROP DATABASE cannot run inside a transaction
        with conn.cursor() as cursor:
            cursor.execute(statement)
    finally:
        conn.close()


def drop_database(url: str, name: str) -> None:
    """Drop ``name`` if it exists, ending any session still connected to it."""
    _execute(url, sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def recreate_database(url: str, name: str) -> None:
    drop_database(url, name)
    _execute(url, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


@dataclass(frozen=True)
class Pgbench:
    """pgbench pointed at one database of the server in ``url``."""

    url: str
    database: str
    executable: str = "pgbench"

    def _command(self, *args: str) -> list[str]:
        parts = urlsplit(self.url)
        command = [shutil.which(self.executable) or self.executable, *args]
        command += ["-h", parts.hostname or "127.0.0.1", "-p", str(parts.port or 5432)]
        if parts.username:
            command += ["-U", unquote(parts.username)]
        return [*command, self.database]

    def _run(self, *args: str, timeout: float) -> str:
        env = dict(os.environ)
        password = urlsplit(self.url).password
        if password:
            env["PGPASSWORD"] = unquote(password)
        done = subprocess.run(
            self._command(*args),
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"pgbench {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
        return done.stdout + done.stderr

    def initialize(self, *, scale: int) -> None:
        """``pgbench -i -s scale``: scale x 100,000 accounts, scale tellers x 10, scale branches."""
        self._run("-i", "-s", str(scale), "-q", timeout=600)

    def tpcb_tps(self, *, clients: int, seconds: int) -> float:
        """Transactions per second of the built-in TPC-B-like script with ``clients`` clients."""
        output = self._run(
            "-c",
            str(clients),
            "-j",
            str(clients),
            "-T",
            str(seconds),
            "-b",
            "tpcb-like",
            "-n",  # no vacuum before the run: the tables were just created and vacuumed
            timeout=seconds + 120,
        )
        match = re.search(r"^tps = ([0-9.]+)", output, re.MULTILINE)
        if match is None:
            raise RuntimeError(f"no 'tps = ' line in pgbench output:\n{output}")
        return float(match.group(1))
