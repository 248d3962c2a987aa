"""A user's admin page for support: credits, recent tasks and ledger entries with links, in a
number of queries that does not grow with the user's history; the admin's branding."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from billing import services as billing
from billing.models import Entry

pytestmark = pytest.mark.django_db
C = 1_000_000


def logged_in(some_user: Any) -> Client:
    client = Client()
    client.force_login(some_user)
    return client


def user_url(some_user: Any) -> str:
    return f"/admin/rivya/user/{some_user.pk}/change/"


@pytest.fixture
def customer(make_user: Any, studio_queued: Any, seeded_catalog: None, settings: Any) -> Any:
    """``customer(tasks=3)``: a user granted 100 credits with that many WAITING tasks (1 credit
    held each; nothing queued)."""
    from tasks import services as task_services

    settings.TASK_MAX_RUNNING_PER_USER = 1000

    def make(tasks: int = 3) -> tuple[Any, list[Any]]:
        some_user = make_user()
        billing.grant(user=some_user, amount=100 * C, reason="welcome")
        submitted = [
            task_services.task_submit(user=some_user, model_slug="sandbox-image", prompt=f"p{n}")
            for n in range(tasks)
        ]
        assert all(s.accepted for s in submitted)
        return some_user, [s.task for s in submitted]

    return make


def test_user_page_shows_balance_held_and_available(staff: Any, customer: Any) -> None:
    alice, _ = customer(tasks=3)
    customer(tasks=1)  # someone else's hold and entries
    client = logged_in(staff)

    content = client.get(user_url(alice)).content.decode()

    assert 'title="100000000 micro-credits">100<' in content  # balance
    assert 'title="3000000 micro-credits">3<' in content  # held
    assert 'title="97000000 micro-credits">97<' in content  # available
    assert "/admin/billing/account/" in content
    assert "Adjust credits" in content
    account = alice.credit_account
    holds = client.get(f"/admin/billing/hold/?account__id__exact={account.pk}")
    entries = client.get(f"/admin/billing/entry/?account__id__exact={account.pk}")
    assert f"/admin/billing/hold/?account__id__exact={account.pk}" in content
    assert {h.account_id for h in holds.context["cl"].result_list} == {account.pk}
    assert len(holds.context["cl"].result_list) == 3
    assert {e.account_id for e in entries.context["cl"].result_list} == {account.pk}


def test_user_page_lists_recent_tasks_and_entries_with_links(staff: Any, customer: Any) -> None:
    alice, tasks = customer(tasks=3)
    grant_entry = Entry.objects.get(account__user=alice)

    content = logged_in(staff).get(user_url(alice)).content.decode()

    for task in tasks:
        assert f'href="/admin/tasks/task/{task.pk}/change/"' in content
    assert "sandbox-image" in content
    assert "Waiting" in content
    assert f'href="/admin/billing/entry/{grant_entry.pk}/change/"' in content
    assert f'href="/admin/billing/ledgertransaction/{grant_entry.transaction_id}/change/"' in (
        content
    )
    assert "welcome" in content


def test_user_page_shows_only_this_users_tasks(staff: Any, customer: Any) -> None:
    alice, _ = customer(tasks=1)
    _, bobs_tasks = customer(tasks=1)

    content = logged_in(staff).get(user_url(alice)).content.decode()

    assert str(bobs_tasks[0].pk) not in content


def test_user_page_of_a_user_without_an_account(staff: Any, make_user: Any) -> None:
    response = logged_in(staff).get(user_url(make_user()))

    assert response.status_code == 200
    assert b"No credit account yet" in response.content
    assert b"No tasks." in response.content


def test_user_page_queries_do_not_grow_with_tasks(
    staff: Any, customer: Any, django_assert_max_num_queries: Any
) -> None:
    few, _ = customer(tasks=3)
    many, many_tasks = customer(tasks=30)
    client = logged_in(staff)
    client.get(user_url(few))  # warm the session and content types

    with CaptureQueriesContext(connection) as few_queries:
        client.get(user_url(few))
    with django_assert_max_num_queries(15), CaptureQueriesContext(connection) as many_queries:
        response = client.get(user_url(many))

    assert len(many_queries) == len(few_queries)
    content = response.content.decode()
    newest_first = sorted(many_tasks, key=lambda t: (t.created_at, t.pk), reverse=True)
    assert all(f"/admin/tasks/task/{t.pk}/change/" in content for t in newest_first[:20])
    assert not any(f"/admin/tasks/task/{t.pk}/change/" in content for t in newest_first[20:])


def test_user_list_shows_available_credits(staff: Any, customer: Any) -> None:
    alice, _ = customer(tasks=2)

    content = logged_in(staff).get("/admin/rivya/user/").content.decode()

    assert 'title="98,000,000 micro-credits">98<' in content


def test_the_admin_header_says_rivya_support(staff: Any) -> None:
    content = logged_in(staff).get(user_url(staff)).content.decode()

    assert "Rivya support" in content
    assert "Django administration" not in content
