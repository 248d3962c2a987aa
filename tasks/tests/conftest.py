"""Fixtures for the lifecycle tests: a record of what would be queued to Celery (the services
are called directly here; tests/ runs the real worker). The sandbox process, the catalog, funded
users and the ledger check are in the root conftest.py."""

from __future__ import annotations

from typing import Any

import pytest


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


@pytest.fixture(params=["one-statement", "step-by-step"])
def submit_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test once with submits accepted by the one statement (PostgreSQL's fast path)
    and once step by step with the ORM (the path every other database takes): the submit and
    settlement tests must hold on both."""
    from tasks.services import accept

    one_statement = request.param == "one-statement"
    monkeypatch.setattr(accept, "fast_path_available", lambda: one_statement)
    return request.param
