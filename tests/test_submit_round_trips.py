"""The database round trips of a submit, counted on the wire.

A JSON ``POST /api/v1/tasks/`` served by ``rivya.wsgi`` under gunicorn (as the submit benchmark
serves it), with the process's connection and catalog warm, sends exactly these statements to
PostgreSQL and no others; a change that brings back a query fails here, where it is cheap to
see, rather than as a slower benchmark.
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from billing.models import IdempotencyRecord
from rivya.services import api_key_create
from tasks.catalog import seed_catalog
from tasks.models import Task

pytestmark = pytest.mark.usefixtures("transactional_db")
BODY = {"model": "sandbox-image", "prompt": "a lighthouse", "params": {"width": 512}}
# Each statement of one submit, in order, as a pattern of its text.
JSON_SUBMIT = [
    # tasks.services.accept, prepared on the connection at its first use (the warm-up below), a
    # transaction by itself. The API key comes from the worker's copy (rivya.key_cache): the
    # statement checks it is still unrevoked and its user active. It is the request's first
    # statement, so it is the connection's health check too (no SELECT 1).
    ("the accept statement", r"EXECUTE rivya_accept_[0-9a-f]{16}\(.*\)"),
]


@pytest.mark.parametrize("keyed", [False, True], ids=["plain", "with-idempotency-key"])
def test_a_json_submit_is_one_round_trip(
    proxied_wsgi: tuple[str, Any], funded: Any, keyed: bool
) -> None:
    # With an Idempotency-Key too: its record is written by the accept statement.
    base_url, proxy = proxied_wsgi
    seed_catalog()
    user = funded(100)
    key = str(api_key_create(user=user, name="round trips").raw)
    headers = {"Authorization": f"Bearer {key}"}
    keys = iter(f"round-trip-{n}" for n in range(10))

    def submit() -> httpx.Response:
        extra = {"Idempotency-Key": next(keys)} if keyed else {}
        return client.post("/api/v1/tasks/", json=BODY, headers=extra)

    with httpx.Client(base_url=base_url, headers=headers, trust_env=False) as client:
        for _ in range(2):  # the worker's connection opens, its catalog and key copies fill
            assert submit().status_code == 202
        mark = proxy.recorder.mark()

        response = submit()

    statements = proxy.recorder.since(mark)
    assert response.status_code == 202
    assert Task.objects.filter(pk=response.json()["id"], status="WAITING").exists()
    if keyed:
        assert IdempotencyRecord.objects.get(user=user, key="round-trip-2").response_status == 202
    shown = "\n".join(s[:160] for s in statements)
    assert len(statements) == len(JSON_SUBMIT) <= 8, shown
    for statement, (what, pattern) in zip(statements, JSON_SUBMIT, strict=True):
        assert re.fullmatch(pattern, statement.strip(), re.DOTALL), f"{what}:\n{shown}"
