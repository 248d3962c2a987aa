"""A database connection lost in the middle of the work (PostgreSQL terminates the backend, as
in a restart, a failover or the ``pg-terminate`` fault run of docs/reliability.md): what the
failed work had taken (the output lease, an idempotency claim) is given back on a working
connection, so the next attempt runs at once instead of waiting for it to time out; and a
request that loses its connection is answered 503 ``database_unavailable`` with
``Retry-After``, never a bare 500, keeps nothing, and the next request works. Against the real
sandbox process and PostgreSQL, whose backend is really terminated."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from django.db import close_old_connections, connection
from django.db.utils import Error as DatabaseError

from billing import selectors as billing_selectors
from billing import services as billing
from billing.models import IdempotencyRecord, LedgerTransaction
from tasks import services
from tasks.models import Task
from tasks.services import refresh
from tasks.tests.lifecycle import C, submit

S = Task.Status
pytestmark = [
    pytest.mark.usefixtures("sandbox", "catalog", "queued", "ledger_ok"),
    # The backend is terminated for real: no test transaction may be wrapped around it.
    pytest.mark.django_db(transaction=True),
]


def after_the_worker_task() -> None:
    """What the worker does once a Celery task ended (rivya.celery): a broken connection is
    closed, so the next task starts on a new one."""
    close_old_connections()


@pytest.mark.parametrize("where", ["right after the claim", "while storing the outputs"])
def test_a_connection_lost_while_storing_outputs_gives_the_output_lease_back(
    where: str, funded: Any, terminate_backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a task whose job finished upstream
    user = funded(10)
    task = submit(user)
    services.task_send_upstream(task_id=task.pk)

    # When the connection is lost after the output lease was taken: right after the claim's
    # commit (the first statement after it fails), or once the outputs are downloaded
    if where == "right after the claim":
        claim = refresh._claim_outputs

        def claim_then_lose_the_connection(task: Task) -> bool:
            taken = claim(task)
            terminate_backend()
            return taken

        monkeypatch.setattr(refresh, "_claim_outputs", claim_then_lose_the_connection)
    else:
        inspect = refresh.inspect_media

        def inspect_then_lose_the_connection(data: bytes, **kwargs: Any) -> Any:
            terminate_backend()
            return inspect(data, **kwargs)

        monkeypatch.setattr(refresh, "inspect_media", inspect_then_lose_the_connection)
    with pytest.raises(DatabaseError):
        services.task_refresh(task_id=task.pk)
    after_the_worker_task()
    monkeypatch.undo()

    # Then the attempt is counted but its lease is given back
    task.refresh_from_db()
    assert (task.status, task.output_attempts, task.output_lease_until) == (
        S.GENERATING,
        1,
        None,
    )

    # And the next check stores the outputs at once and charges once
    services.task_refresh(task_id=task.pk)
    task.refresh_from_db()
    assert (task.status, len(task.results), task.charged_micro) == (S.SUCCESS, 1, C)
    captures = LedgerTransaction.objects.filter(
        kind=LedgerTransaction.Kind.CAPTURE, subject_id=str(task.pk)
    )
    assert captures.count() == 1
    assert billing_selectors.balance_for_user(user=user).available == 9 * C


def test_an_idempotency_claim_of_work_that_lost_its_connection_is_dropped(
    make_user: Any, terminate_backend: Any
) -> None:
    # Given a request that claimed its idempotency key
    user = make_user()
    claim = billing.idempotency_claim(user=user, key="key-1", fingerprint="f")
    assert claim.record is not None

    # When its work loses the database connection, and the request drops its claim
    terminate_backend()
    with pytest.raises(DatabaseError):
        IdempotencyRecord.objects.count()
    billing.idempotency_abandon(record=claim.record)

    # Then the claim is gone, and a retry with the key runs anew at once
    assert not IdempotencyRecord.objects.filter(user=user, key="key-1").exists()
    again = billing.idempotency_claim(user=user, key="key-1", fingerprint="f")
    assert again.record is not None
    assert again.record.pk != claim.record.pk


def test_inside_a_transaction_a_lost_connection_is_left_to_the_transaction(
    make_user: Any, terminate_backend: Any
) -> None:
    # A transaction lost with its connection must fail as a whole: nothing reconnects under
    # it, so no later statement of the block can commit on a new connection.
    from django.db import transaction

    from rivya.db import reconnect_if_broken

    user = make_user()
    reconnected_under_the_transaction = []

    def claim_then_lose_the_connection() -> None:
        with transaction.atomic():
            billing.idempotency_claim(user=user, key="key-2", fingerprint="f")
            terminate_backend()
            with contextlib.suppress(DatabaseError):
                IdempotencyRecord.objects.count()
            reconnect_if_broken()
            reconnected_under_the_transaction.append(connection.closed_in_transaction)
            IdempotencyRecord.objects.count()  # still the lost connection: fails

    with pytest.raises(DatabaseError):
        claim_then_lose_the_connection()
    assert reconnected_under_the_transaction == [False]
    after_the_worker_task()
    assert not IdempotencyRecord.objects.filter(user=user, key="key-2").exists()


# --- requests ---------------------------------------------------------------------------------


@contextmanager
def connection_lost_at_statement(n: int, terminate: Callable[[], int]) -> Iterator[None]:
    """The database backend is terminated just before the request's ``n``-th statement."""
    seen = 0

    def wrapper(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        nonlocal seen
        seen += 1
        if seen == n:
            terminate()
        return execute(sql, params, many, context)

    with connection.execute_wrapper(wrapper):
        yield
    assert seen >= n, f"the request ran {seen} statements, fewer than {n}"


def after_the_request() -> None:
    """What the server does when a request ends (the test client leaves it out): a broken
    connection is closed, so the next request opens a new one."""
    close_old_connections()


@pytest.mark.parametrize("statement", [2, 4])
def test_a_submit_that_loses_its_connection_is_answered_503_and_a_retry_goes_through(
    statement: int, funded: Any, api_for: Any, terminate_backend: Any
) -> None:
    user = funded(10)
    client = api_for(user)
    body = {"model": "sandbox-image", "prompt": "a lighthouse", "params": {"width": 64}}

    with connection_lost_at_statement(statement, terminate_backend):
        answer = client.post("/api/v1/tasks/", body, format="json")
    after_the_request()

    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "database_unavailable"
    assert answer.json()["error"]["kind"] == "infra"
    assert answer["Retry-After"] == "2"
    assert Task.objects.filter(user=user).count() == 0
    assert billing_selectors.balance_for_user(user=user).available == 10 * C

    again = client.post("/api/v1/tasks/", body, format="json")
    assert again.status_code == 202
    assert Task.objects.filter(user=user).count() == 1
    assert billing_selectors.balance_for_user(user=user).held == C


def test_a_page_that_loses_its_connection_says_so_with_a_503(
    client: Any, user: Any, terminate_backend: Any
) -> None:
    client.force_login(user)

    with connection_lost_at_statement(2, terminate_backend):
        answer = client.get("/history/")
    after_the_request()

    assert answer.status_code == 503
    assert answer["Retry-After"] == "2"
    assert b"could not reach its database" in answer.content
    assert client.get("/history/").status_code == 200


@pytest.mark.parametrize(
    ("sql", "says"),
    [
        # PostgreSQL raises these itself, with their SQLSTATE
        ("DO $$ BEGIN RAISE EXCEPTION 'deadlock' USING ERRCODE = '40P01'; END $$", "conflict"),
        ("DO $$ BEGIN RAISE EXCEPTION 'serial' USING ERRCODE = '40001'; END $$", "conflict"),
        ("SET LOCAL statement_timeout = 1; SELECT pg_sleep(0.5)", None),
    ],
)
def test_only_a_lost_connection_or_a_conflict_is_answered_503(sql: str, says: str | None) -> None:
    # A query cancelled by its timeout is ours to fix: it stays a 500, with its traceback.
    from django.db import OperationalError, transaction

    from rivya.middleware import database_trouble

    with pytest.raises(OperationalError) as raised, transaction.atomic():
        connection.cursor().execute(sql)
    expected = {"conflict": "database_conflict", None: None}[says]
    assert database_trouble(raised.value) == expected
