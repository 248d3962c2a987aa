"""Fixtures for the lifecycle tests: the real sandbox process, settings pointing at it, funded
users, and a record of what would be queued to Celery (the services are called directly here;
tests/ runs the real worker)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from billing import services as billing
from billing.invariants import run_checks
from tasks.catalog import seed_catalog
from tasks.tests.sandbox_process import SandboxProcess, sandbox_process  # noqa: F401

C = 1_000_000


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
def queued(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Any]]:
    """What the services hand to Celery after commit, instead of sending it."""
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
def funded(make_user: Any) -> Any:
    def make(credits: int = 100) -> Any:
        user = make_user()
        if credits:
            billing.grant(user=user, amount=credits * C, reason="test funds")
        return user

    return make


@pytest.fixture
def ledger_ok() -> Iterator[None]:
    yield
    breaches = run_checks()
    assert breaches == [], breaches
