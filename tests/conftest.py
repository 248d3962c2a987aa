"""Fixtures of the cross-app and end-to-end tests (the harness lives in ``tests/e2e.py``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from django.db import connection

from bench.pg_proxy import PgProxy
from tasks.tests.sandbox_process import stop_sandbox
from tests.asgi_process import start_wsgi
from tests.e2e import e2e, stack  # noqa: F401 (pytest fixtures)


@pytest.fixture(scope="session")
def proxied_wsgi(django_db_setup: Any, django_db_blocker: Any) -> Iterator[tuple[str, PgProxy]]:
    """Rivya's WSGI server (gunicorn, one sync worker, as the submit benchmark serves it) on
    the test database through a recording PostgreSQL relay: ``(base_url, proxy)``. No worker
    or dispatcher runs; tests using it need ``transactional_db``."""
    with django_db_blocker.unblock():
        db = dict(connection.settings_dict)
    auth = db["USER"] + (f":{quote(str(db['PASSWORD']), safe='')}" if db.get("PASSWORD") else "")
    proxy = PgProxy(db["HOST"] or "127.0.0.1", int(db["PORT"] or 5432))
    env = dict(
        os.environ,
        DATABASE_URL=f"postgres://{auth}@127.0.0.1:{proxy.port}/{db['NAME']}?sslmode=disable",
        DEBUG="0",
    )
    base_url, process = start_wsgi(env, log=Path(__file__).parent / "var" / "wsgi.log")
    try:
        yield base_url, proxy
    finally:
        stop_sandbox(process)
        proxy.close()
