"""Shared fixtures. Tests run on PostgreSQL and Redis (``make test`` sets the URLs)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone
from rest_framework.test import APIClient

from billing import services as billing
from billing.invariants import run_checks
from notifications import webhooks
from notifications.models import WebhookMessage
from notifications.tests.receiver import Receiver, start_receiver, stop_receiver
from rivya import services as rivya_services
from tasks.catalog import seed_catalog
from tasks.tests.sandbox_process import SandboxProcess, sandbox_process  # noqa: F401

C = 1_000_000


def pytest_configure(config: pytest.Config) -> None:
    """Test users' passwords are hashed with a fast hasher: the production one (PBKDF2, a
    million rounds) costs about half a second of CPU per user, and the suite makes hundreds.
    Logging in works the same way; only the stored hash differs."""
    from django.conf import settings

    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    # (Servers the tests start as processes of their own accept these hashes too:
    # tests/browser/asgi_settings.py.)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests that run on the end-to-end stack (``tests/e2e.py``: a Celery worker, beat and
    the dispatcher on the test database, started once for the session and running until it
    ends) go last, after every other test, whatever order pytest-django and pytest-randomly
    chose. Otherwise a test that leaves work behind (a WAITING task) could have the live stack
    writing it while the test's database flush truncates the tables: a deadlock (seen in CI,
    after ``test_submit_round_trips``)."""
    on_stack = [item for item in items if "stack" in getattr(item, "fixturenames", ())]
    if on_stack:
        others = [item for item in items if "stack" not in getattr(item, "fixturenames", ())]
        items[:] = others + on_stack


_counter = itertools.count()


@pytest.fixture
def make_user(db: Any) -> Any:
    def make(username: str | None = None, **extra: Any) -> Any:
        name = username or f"user{next(_counter)}"
        extra.setdefault("email", f"{name}@example.com")
        return get_user_model().objects.create_user(
            username=name, password="pw-Secret-123", **extra
        )

    return make


@pytest.fixture
def user(make_user: Any) -> Any:
    return make_user()


@pytest.fixture
def staff(make_user: Any) -> Any:
    return make_user(is_staff=True, is_superuser=True)


@pytest.fixture
def api(user: Any) -> APIClient:
    """An API client authenticated with a real API key of ``user``."""
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {rivya_services.api_key_create(user=user).raw}")
    return client


@pytest.fixture
def api_for() -> Any:
    def make(some_user: Any) -> APIClient:
        client = APIClient()
        raw = rivya_services.api_key_create(user=some_user).raw
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
        return client

    return make


@pytest.fixture
def sandbox(sandbox_process: SandboxProcess, settings: Any, tmp_path: Any) -> SandboxProcess:  # noqa: F811
    settings.SANDBOX_URL = sandbox_process.base_url
    settings.SANDBOX_WEBHOOK_SECRET = sandbox_process.secret
    settings.MEDIA_ROOT = str(tmp_path / "media")
    settings.CALLBACK_BASE_URL = "http://127.0.0.1:9"  # nobody listens: callbacks fail quietly
    return sandbox_process


@pytest.fixture
def catalog(db: Any) -> None:
    seed_catalog()


@pytest.fixture
def funded(make_user: Any) -> Any:
    def make(credits: int = 100) -> Any:
        user = make_user()
        if credits:
            billing.grant(user=user, amount=credits * C, reason="test funds")
        return user

    return make


@pytest.fixture
def queued(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Any]]:
    """What the services hand to Celery after commit, instead of sending it (the services are
    called directly in these tests; tests/ runs the real worker)."""
    from tasks.services import enqueue

    calls: dict[str, list[Any]] = {"submit": [], "callback": [], "cancel": [], "cancel_jobs": []}
    monkeypatch.setattr(enqueue, "submit", lambda i: calls["submit"].append(str(i)))
    monkeypatch.setattr(enqueue, "callback", lambda i: calls["callback"].append(i))

    def cancel(task_id: Any, upstream_id: str | None = None) -> None:
        calls["cancel"].append(str(task_id))
        calls["cancel_jobs"].append(upstream_id)

    monkeypatch.setattr(enqueue, "cancel_upstream", cancel)
    return calls


@pytest.fixture
def ledger_ok() -> Iterator[None]:
    yield
    breaches = run_checks()
    assert breaches == [], breaches


@pytest.fixture
def terminate_backend() -> Any:
    """``terminate()``: PostgreSQL terminates the backend of this process's default connection,
    as a server restart, a failover or a network cut would; from another connection, as an
    operator's ``pg_terminate_backend``. Returns the terminated backend's pid."""
    import psycopg2
    from django.db import connection

    def terminate() -> int:
        connection.ensure_connection()
        pid = connection.connection.get_backend_pid()
        killer = psycopg2.connect(**connection.get_connection_params())
        try:
            with killer, killer.cursor() as cursor:
                cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
                assert cursor.fetchone() == (True,)
        finally:
            killer.close()
        return pid

    return terminate


def database_url() -> str:
    """The URL of the database this test run uses (the test database, once it exists)."""
    from urllib.parse import quote

    from django.db import connection

    db = connection.settings_dict
    auth = db["USER"] + (f":{quote(str(db['PASSWORD']), safe='')}" if db.get("PASSWORD") else "")
    port = f":{db['PORT']}" if db.get("PORT") else ""
    return f"postgres://{auth}@{db['HOST']}{port}/{db['NAME']}"


@pytest.fixture(scope="session")
def asgi_env(
    django_db_setup: Any,
    django_db_blocker: Any,
    sandbox_process: SandboxProcess,  # noqa: F811
) -> dict[str, str]:
    """The environment of a Rivya server process on the test database and the sandbox."""
    import os

    with django_db_blocker.unblock():
        url = database_url()
    return dict(
        os.environ,
        DATABASE_URL=url,
        SANDBOX_URL=sandbox_process.base_url,
        SANDBOX_WEBHOOK_SECRET=sandbox_process.secret,
        CALLBACK_BASE_URL="http://127.0.0.1:9",
    )


@pytest.fixture(scope="session")
def asgi_process(asgi_env: dict[str, str]) -> Iterator[str]:
    """Rivya under uvicorn (``rivya.asgi``) on the test database and the sandbox: its URL.
    Tests using it need ``transactional_db`` (the server sees only committed rows)."""
    from pathlib import Path

    from tasks.tests.sandbox_process import stop_sandbox
    from tests.asgi_process import start_asgi

    base_url, process = start_asgi(asgi_env, log=Path(__file__).parent / "var" / "asgi.log")
    try:
        yield base_url
    finally:
        stop_sandbox(process)


@pytest.fixture
def asgi_server(asgi_process: str, sandbox: SandboxProcess, transactional_db: Any) -> str:
    """Per test: the ASGI server's URL; the catalog seeded and committed where it can see it."""
    seed_catalog()
    return asgi_process


@pytest.fixture(scope="session")
def webhook_receiver_process() -> Iterator[Receiver]:
    """The webhook receiver (notifications/tests/receiver.py), one process for the session."""
    receiver = start_receiver()
    yield receiver
    stop_receiver(receiver)


@pytest.fixture
def webhook_receiver(webhook_receiver_process: Receiver, settings: Any) -> Receiver:
    """The receiver, emptied, and the settings that let deliveries reach it (loopback, http)."""
    webhook_receiver_process.reset()
    settings.WEBHOOK_ALLOW_PRIVATE = True
    settings.WEBHOOK_ALLOW_HTTP = True
    return webhook_receiver_process


@pytest.fixture
def deliver_due() -> Any:
    """Outbound webhooks: one delivery attempt for every message due now, through the function
    the Celery task runs (after moving retries to now with ``later=True``, as if their delay had
    passed); returns the statuses by message id. (tests/test_e2e_webhooks.py runs the worker.)"""

    def run(*, later: bool = False) -> dict[str, str]:
        if later:
            WebhookMessage.objects.filter(status=WebhookMessage.Status.PENDING).update(
                next_attempt_at=timezone.now() - timedelta(seconds=1)
            )
        due = webhooks.webhooks_due(grace=timedelta(0))
        return {i: webhooks.webhook_deliver(message_id=i) for i in due}

    return run
