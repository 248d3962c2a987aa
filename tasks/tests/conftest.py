"""Fixtures for the lifecycle tests. What would be queued to Celery (``queued``), the sandbox
process, the catalog, funded users and the ledger check are in the root conftest.py."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["one-statement", "step-by-step"])
def submit_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test once with submits accepted by the one statement (PostgreSQL's fast path)
    and once step by step with the ORM (the path every other database takes): the submit and
    settlement tests must hold on both."""
    from tasks.services import accept

    one_statement = request.param == "one-statement"
    monkeypatch.setattr(accept, "fast_path_available", lambda: one_statement)
    return request.param
