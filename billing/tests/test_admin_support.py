"""The ledger in the admin for support staff: amounts in credits, accounts by their user's name,
links to the task each entry pays for, search by username and email, and entries and holds that
nobody can add, change or delete (superusers included)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from billing import services
from billing.models import Account, Entry, Hold, LedgerTransaction
from billing.tests.helpers import assert_ledger_ok

pytestmark = pytest.mark.django_db
C = 1_000_000


def logged_in(some_user: Any) -> Client:
    client = Client()
    client.force_login(some_user)
    return client


@pytest.fixture
def submit_task(db: Any, monkeypatch: pytest.MonkeyPatch, settings: Any) -> Any:
    """``submit_task(user)``: a WAITING task with its hold (nothing queued)."""
    from tasks import services as task_services
    from tasks.catalog import seed_catalog
    from tasks.services import enqueue

    seed_catalog()
    settings.TASK_MAX_RUNNING_PER_USER = 1000
    monkeypatch.setattr(enqueue, "submit", lambda task_id: None)

    def submit(some_user: Any) -> Any:
        outcome = task_services.task_submit(
            user=some_user, model_slug="sandbox-image", prompt="a lighthouse"
        )
        assert outcome.accepted, outcome
        return outcome.task

    return submit


@pytest.fixture
def charged(make_user: Any, submit_task: Any) -> tuple[Any, Any, LedgerTransaction]:
    """alice, her task, and the capture that charged its hold (1 credit)."""
    alice = make_user("alice", email="alice@example.org")
    services.grant(user=alice, amount=10 * C + 500_000, reason="welcome")
    task = submit_task(alice)
    hold = Hold.objects.get(subject_type="tasks.task", subject_id=str(task.pk))
    services.hold_capture(hold=hold)
    return alice, task, LedgerTransaction.objects.get(hold=hold)


def task_url(task: Any) -> str:
    return f"/admin/tasks/task/{task.pk}/change/"


def test_account_list_shows_credits_and_the_username(staff: Any, make_user: Any) -> None:
    alice = make_user("alice")
    services.grant(user=alice, amount=12_500_000, reason="welcome")

    content = logged_in(staff).get("/admin/billing/account/").content.decode()

    assert 'title="12,500,000 micro-credits">12.5<' in content
    assert f'href="/admin/rivya/user/{alice.pk}/change/">alice<' in content
    assert "issuance" in content
    assert "user:" not in content
    assert "12500000" not in content


def test_account_page_shows_credits_and_micro_credits(staff: Any, make_user: Any) -> None:
    alice = make_user("alice")
    services.grant(user=alice, amount=12_500_000, reason="welcome")
    account = Account.objects.get(user=alice)

    content = logged_in(staff).get(f"/admin/billing/account/{account.pk}/change/").content

    assert b"12.5 credits (12,500,000 micro-credits)" in content
    assert b">alice<" in content


def test_ledger_lists_show_credits_and_usernames(staff: Any, charged: tuple) -> None:
    client = logged_in(staff)

    entries = client.get("/admin/billing/entry/").content.decode()
    holds = client.get("/admin/billing/hold/").content.decode()
    transactions = client.get("/admin/billing/ledgertransaction/").content.decode()

    assert 'title="10,500,000 micro-credits">10.5<' in entries
    assert 'title="-1,000,000 micro-credits">-1<' in entries
    assert 'title="1,000,000 micro-credits">1<' in holds  # amount and captured
    assert 'title="10,500,000 micro-credits">10.5<' in transactions  # the grant's total
    for content in (entries, holds, transactions):
        assert ">alice<" in content
        assert "user:" not in content
    assert ">revenue<" in entries
    assert ">issuance<" in transactions


def test_ledger_rows_link_to_their_task(staff: Any, charged: tuple) -> None:
    alice, task, capture = charged
    client = logged_in(staff)

    pages = {
        "entry list": client.get("/admin/billing/entry/?transaction__kind=capture"),
        "transaction list": client.get("/admin/billing/ledgertransaction/?kind=capture"),
        "transaction page": client.get(f"/admin/billing/ledgertransaction/{capture.pk}/change/"),
        "entry page": client.get(
            f"/admin/billing/entry/{capture.entries.get(account__user=alice).pk}/change/"
        ),
        "hold page": client.get(f"/admin/billing/hold/{capture.hold_id}/change/"),
    }

    for name, response in pages.items():
        assert response.status_code == 200, name
        assert f'href="{task_url(task)}"'.encode() in response.content, name
        assert f'href="/admin/rivya/user/{alice.pk}/change/"'.encode() in response.content, name


@pytest.mark.parametrize("query", ["alice", "alice@example.org"])
def test_transaction_search_by_username_or_email_finds_only_theirs(
    staff: Any, make_user: Any, charged: tuple, query: str
) -> None:
    alice, _, capture = charged
    bob = make_user("bob", email="bob@example.net")
    bobs = services.grant(user=bob, amount=3 * C, reason="bob's welcome")

    response = logged_in(staff).get("/admin/billing/ledgertransaction/", {"q": query})

    listed = set(response.context["cl"].result_list)
    assert listed == set(LedgerTransaction.objects.filter(entries__account__user=alice))
    assert capture in listed
    assert bobs not in listed
    assert len(response.context["cl"].result_list) == len(listed)  # each transaction once


@pytest.mark.parametrize("query", ["bob", "bob@example.net"])
def test_entry_and_hold_search_by_username_or_email(
    staff: Any, make_user: Any, submit_task: Any, charged: tuple, query: str
) -> None:
    bob = make_user("bob", email="bob@example.net")
    services.grant(user=bob, amount=3 * C, reason="bob's welcome")
    submit_task(bob)
    client = logged_in(staff)

    entries = client.get("/admin/billing/entry/", {"q": query}).context["cl"].result_list
    holds = client.get("/admin/billing/hold/", {"q": query}).context["cl"].result_list

    assert {e.account.user for e in entries} == {bob}
    assert [h.account.user for h in holds] == [bob]


def test_transaction_list_queries_do_not_grow_with_rows(
    staff: Any, make_user: Any, charged: tuple
) -> None:
    client = logged_in(staff)
    client.get("/admin/billing/ledgertransaction/")  # warm the session and content types

    with CaptureQueriesContext(connection) as few:
        client.get("/admin/billing/ledgertransaction/")
    for n in range(20):
        services.grant(user=make_user(), amount=C, reason=f"grant {n}")
    with CaptureQueriesContext(connection) as many:
        response = client.get("/admin/billing/ledgertransaction/")

    assert len(response.context["cl"].result_list) > 20
    assert len(many) == len(few)


@pytest.mark.parametrize("model", ["entry", "hold"])
def test_entries_and_holds_are_read_only_even_for_a_superuser(
    staff: Any, charged: tuple, model: str
) -> None:
    _, _, capture = charged
    obj = capture.entries.first() if model == "entry" else capture.hold
    before = {f.name: getattr(obj, f.attname) for f in obj._meta.concrete_fields}
    counts = (Entry.objects.count(), Hold.objects.count())
    client = logged_in(staff)
    base = f"/admin/billing/{model}/"

    page = client.get(f"{base}{obj.pk}/change/")
    posted = client.post(f"{base}{obj.pk}/change/", {"amount": "1", "status": "open"})
    deleted = client.post(f"{base}{obj.pk}/delete/", {"post": "yes"})
    added = client.get(f"{base}add/")
    bulk = client.post(base, {"action": "delete_selected", "_selected_action": [obj.pk]})

    assert page.status_code == 200
    assert b'name="_save"' not in page.content
    assert b'name="_continue"' not in page.content
    assert b"/delete/" not in page.content
    assert (posted.status_code, deleted.status_code, added.status_code) == (403, 403, 403)
    assert b"delete_selected" not in client.get(base).content
    assert bulk.status_code in (200, 302)
    obj.refresh_from_db()
    assert {f.name: getattr(obj, f.attname) for f in obj._meta.concrete_fields} == before
    assert (Entry.objects.count(), Hold.objects.count()) == counts
    assert_ledger_ok_but_tasks()


def assert_ledger_ok_but_tasks() -> None:
    """The billing invariants hold (the task's own check is not satisfied: its hold was captured
    directly, not by the task's lifecycle)."""
    from billing.invariants import run_checks

    breaches = [b for b in run_checks() if not b.check.startswith("4.")]
    assert breaches == [], breaches


def test_the_admin_says_rivya_support(staff: Any) -> None:
    content = logged_in(staff).get("/admin/").content.decode()

    assert "Rivya support" in re.search(r"<title>(.*?)</title>", content, re.S).group(1)
    assert "Rivya support" in content
    assert "Django administration" not in content


def test_adjust_credits_still_goes_through_the_ledger(staff: Any, make_user: Any) -> None:
    alice = make_user("alice")
    services.grant(user=alice, amount=10 * C, reason="welcome")
    account = Account.objects.get(user=alice)
    client = logged_in(staff)
    form = client.get(f"/admin/billing/account/{account.pk}/adjust/").content.decode()
    key = re.search(r'name="idempotency_key" value="([^"]+)"', form).group(1)

    response = client.post(
        f"/admin/billing/account/{account.pk}/adjust/",
        {"amount": "-2.5", "reason": "chargeback", "idempotency_key": key},
    )

    assert response.status_code == 302
    account.refresh_from_db()
    assert account.available == 7_500_000
    assert_ledger_ok()
