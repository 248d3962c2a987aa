"""Single tasks served as ``make run`` serves them: ``rivya.asgi`` under uvicorn, real processes
on loopback, PostgreSQL, Redis and the sandbox. The gate across two server processes (60
concurrent requests against a limit of 50), and a server killed mid-request whose task the
reconciler refunds (issue 17)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from django.conf import settings
from django.db import connection

from billing import selectors as billing_selectors
from notifications.models import Notification
from rivya import services as rivya_services
from tasks.catalog import seed_catalog
from tasks.models import Task
from tasks.single import services as single
from tasks.single.gate import REDIS_KEY, SINGLE_GATE, single_gate
from tasks.tests.sandbox_process import stop_sandbox
from tests.asgi_process import start_asgi

C = 1_000_000
LOG = Path(__file__).resolve().parents[2] / "var"


@pytest.fixture
def servers(asgi_env: dict[str, str], sandbox: Any, transactional_db: Any) -> Any:
    """Start ``n`` Rivya servers with extra environment; all are stopped after the test."""
    seed_catalog()
    started: list[Any] = []

    def start(n: int, **extra: str) -> list[tuple[str, Any]]:
        env = {**asgi_env, "SANDBOX_URL": sandbox.base_url, **extra}
        for i in range(n):
            started.append(start_asgi(env, log=LOG / f"single-{len(started)}-{i}.log"))
        return started[-n:]

    yield start
    for _, process in started:
        stop_sandbox(process)
    # A killed server's slots would stay taken until their leases end (a minute): give them
    # back, so that later tests see the whole gate.
    redis.Redis.from_url(settings.REDIS_URL).delete(REDIS_KEY.format(name=SINGLE_GATE))


def bearer(user: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {rivya_services.api_key_create(user=user).raw}"}


def recorded(user: Any) -> bool:
    """Whether the user's task is recorded (from a thread of its own: the test's event loop
    waits meanwhile), closing the thread's connection so none outlives the test."""
    try:
        return Task.objects.filter(user=user, status="GENERATING").exists()
    finally:
        connection.close()


def sandbox_single_stats(sandbox: Any) -> dict[str, int]:
    return httpx.get(f"{sandbox.base_url}/v1/single/stats", trust_env=False).json()


def test_sixty_requests_against_a_limit_of_fifty_across_two_processes(
    servers: Any, sandbox: Any, funded: Any
) -> None:
    (first, _), (second, _) = servers(2, SINGLE_MAX_CONCURRENT="50", SINGLE_GATE_WAIT_S="1.0")
    user = funded(10)
    headers = bearer(user)
    httpx.post(f"{sandbox.base_url}/v1/_reset", trust_env=False).raise_for_status()
    body = {
        "text": "hello",
        "source_language": "en",
        "target_language": "fr",
        # Each admitted request holds its slot for 4 s: longer than any refused one waits.
        "params": {"sandbox_latency_ms": 4000},
    }

    async def one(n: int, client: httpx.AsyncClient) -> httpx.Response:
        base = first if n % 2 else second
        return await client.post(f"{base}/api/v1/single/translation/", json=body, headers=headers)

    async def race() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(timeout=60, trust_env=False, limits=limits) as client:
            return await asyncio.gather(*(one(n, client) for n in range(60)))

    responses = asyncio.run(race())
    codes = Counter(r.status_code for r in responses)
    assert codes == {200: 50, 429: 10}, [(r.status_code, r.text[:200]) for r in responses]
    for refused in (r for r in responses if r.status_code == 429):
        assert int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["error"]["code"] == "system_busy"
    # The provider saw exactly the limit at once, never more.
    assert sandbox_single_stats(sandbox)["max_in_flight"] == 50
    assert Task.objects.filter(user=user).count() == 50
    assert set(Task.objects.filter(user=user).values_list("status", flat=True)) == {"SUCCESS"}
    assert asyncio.run(single_gate().held()) == 0


def test_a_server_killed_mid_request_leaves_a_task_the_reconciler_refunds(
    servers: Any, funded: Any, ledger_ok: None
) -> None:
    ((base, process),) = servers(1, SINGLE_TASK_TIMEOUT_S="5", SINGLE_DEADLINE_MARGIN_S="3")
    user = funded(10)
    headers = bearer(user)
    body = {
        "text": "hello",
        "source_language": "en",
        "target_language": "de",
        "params": {"sandbox_latency_ms": 4000},
    }

    async def send_then_kill() -> None:
        async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
            request = asyncio.ensure_future(
                client.post(f"{base}/api/v1/single/translation/", json=body, headers=headers)
            )
            deadline = time.monotonic() + 10
            while not await asyncio.to_thread(recorded, user):
                assert time.monotonic() < deadline, "the task was never recorded"
                await asyncio.sleep(0.05)
            os.killpg(process.pid, signal.SIGKILL)
            with pytest.raises(httpx.HTTPError):
                await request

    asyncio.run(send_then_kill())
    task = Task.objects.get(user=user)
    assert task.status == "GENERATING"
    assert billing_selectors.balance_for_user(user=user).available < 10 * C  # still held
    # The stated time: the budget (5 s) + the margin (3 s) after the start; then the beat's
    # next run (every SINGLE_RECONCILE_EVERY s) refunds it.
    assert task.sync_deadline_at - task.started_at == timedelta(seconds=8)
    assert single.single_settle_interrupted(now=task.sync_deadline_at - timedelta(seconds=1)) == 0
    while Task.objects.filter(pk=task.pk, status="GENERATING").exists():
        if single.single_settle_interrupted():
            break
        time.sleep(0.5)
    task.refresh_from_db()
    assert (task.status, task.error_code, task.refunded_micro) == (
        "FAILED",
        "interrupted",
        task.reserved_micro,
    )
    assert billing_selectors.balance_for_user(user=user).available == 10 * C
    assert Notification.objects.filter(subject_id=str(task.pk)).exists()
