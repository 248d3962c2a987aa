"""The Notifications Center: unread first, mark one or all read (htmx and plain posts), links to
tasks, results-expiring notices that say when, a bounded list and bounded queries."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from billing import services as billing
from notifications import selectors, services
from notifications.models import Notification

pytestmark = pytest.mark.django_db
HTMX = {"HX-Request": "true"}
C = 1_000_000


def logged_in(some_user: Any) -> Client:
    client = Client()
    client.force_login(some_user)
    return client


def notify(user: Any, title: str, *, read: bool = False, **fields: Any) -> Notification:
    fields.setdefault("kind", Notification.Kind.GENERATION_SUCCESS)
    note = services.notification_create(user=user, title=title, **fields)
    if read:
        services.notification_mark_read(user=user, notification_id=note.pk)
    return note


def shown_titles(html: str) -> list[str]:
    return re.findall(r"<h3>(?:<a [^>]*>)?([^<]+)", html)


def unread_ids(html: str) -> list[str]:
    return re.findall(r'<li id="note-([0-9a-f-]+)" class="unread"', html)


def test_the_center_needs_login() -> None:
    response = Client().get("/notifications/")

    assert response.status_code == 302
    assert response["Location"].startswith("/login/")


def test_unread_come_first_then_the_newest(user: Any) -> None:
    # given notifications made oldest first, some of them read
    notify(user, "oldest unread")
    notify(user, "old read", read=True)
    notify(user, "newer unread")
    notify(user, "newest read", read=True)

    html = logged_in(user).get("/notifications/").content.decode()

    assert shown_titles(html) == ["newer unread", "oldest unread", "newest read", "old read"]
    assert len(unread_ids(html)) == 2
    assert re.search(
        r'data-testid="unread-summary"[^>]*><strong class="ink">2</strong> unread', html
    )
    assert re.search(r'data-testid="unread-count">2<', html)  # the header's bell agrees


def test_each_notification_links_to_its_task(user: Any) -> None:
    note = notify(
        user,
        "Your image is ready",
        subject_type="tasks.task",
        subject_id="3b0f6f0e-0000-4000-8000-000000000001",
        link="/history/3b0f6f0e-0000-4000-8000-000000000001/",
    )
    plain = notify(user, "Credits added", kind=Notification.Kind.CREDITS)

    html = logged_in(user).get("/notifications/").content.decode()

    assert f'<a href="{note.link}" data-testid="notification-link">Your image is ready</a>' in html
    assert "<h3>Credits added" in html  # nothing to link to: no link
    assert plain.link == ""


def test_results_expiring_notice_says_when(user: Any, make_generation: Any, settings: Any) -> None:
    # given a finished generation whose results are deleted within the warning window
    from tasks.services import results_warn_expiring

    settings.TASK_EXPIRY_WARNING = 30 * 24 * 3600
    billing.grant(user=user, amount=5 * C, reason="funds")
    task = make_generation(user)
    assert results_warn_expiring() == 1

    html = logged_in(user).get("/notifications/").content.decode()

    assert "Results expiring soon" in html
    assert f"will be deleted at {task.expires_at:%Y-%m-%d %H:%M} UTC" in html
    assert f'href="/history/{task.pk}/"' in html


def test_mark_one_read_with_htmx_swaps_the_item_and_refreshes_the_header(user: Any) -> None:
    first, second = notify(user, "first"), notify(user, "second")
    client = logged_in(user)

    response = client.post(f"/notifications/{first.pk}/read/", headers=HTMX)

    assert response.status_code == 200
    assert json.loads(response["HX-Trigger"]) == {"rivya:changed": True}
    html = response.content.decode()
    assert f'<li id="note-{first.pk}" class=""' in html  # the item, read now
    assert "autofocus" in html  # keyboard focus stays on the item that was swapped in
    assert 'data-testid="mark-read"' not in html
    assert re.search(r'id="notes-bar"[^>]*hx-swap-oob="true"', html)
    assert '<strong class="ink">1</strong> unread' in html
    assert "Marked “first” as read." in html
    first.refresh_from_db()
    second.refresh_from_db()
    assert first.read_at is not None
    assert second.read_at is None


def test_mark_one_read_without_javascript_goes_back_to_the_center(user: Any) -> None:
    note = notify(user, "first")

    response = logged_in(user).post(f"/notifications/{note.pk}/read/")

    assert response.status_code == 302
    assert response["Location"] == "/notifications/"
    assert selectors.unread_count(user=user) == 0


def test_marking_a_read_notification_again_changes_nothing(user: Any) -> None:
    note = notify(user, "first", read=True)
    read_at = Notification.objects.get(pk=note.pk).read_at

    response = logged_in(user).post(f"/notifications/{note.pk}/read/", headers=HTMX)

    assert response.status_code == 200
    assert Notification.objects.get(pk=note.pk).read_at == read_at


def test_another_users_notification_is_not_found_and_stays_unread(make_user: Any) -> None:
    alice, bob = make_user(), make_user()
    bobs = notify(bob, "bob's")

    response = logged_in(alice).post(f"/notifications/{bobs.pk}/read/", headers=HTMX)

    assert response.status_code == 404
    bobs.refresh_from_db()
    assert bobs.read_at is None
    html = logged_in(alice).get("/notifications/").content.decode()
    assert "bob&#x27;s" not in html


def test_an_unknown_notification_is_not_found(user: Any) -> None:
    response = logged_in(user).post(
        "/notifications/3b0f6f0e-0000-4000-8000-000000000009/read/", headers=HTMX
    )

    assert response.status_code == 404


def test_marking_read_takes_a_post_with_csrf(user: Any) -> None:
    note = notify(user, "first")
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)

    get = client.get(f"/notifications/{note.pk}/read/")
    forged = client.post(f"/notifications/{note.pk}/read/", headers=HTMX)
    forged_all = client.post("/notifications/read-all/", headers=HTMX)

    assert get.status_code == 405
    assert forged.status_code == 403
    assert forged_all.status_code == 403
    assert selectors.unread_count(user=user) == 1


def test_the_page_carries_the_csrf_token_for_its_forms(user: Any) -> None:
    notify(user, "first")

    html = logged_in(user).get("/notifications/").content.decode()

    assert html.count('name="csrfmiddlewaretoken"') >= 3  # mark one, mark all, log out
    assert 'hx-headers=\'{"X-CSRFToken": "' in html


def test_mark_all_read_marks_only_the_users_own(make_user: Any) -> None:
    alice, bob = make_user(), make_user()
    for n in range(3):
        notify(alice, f"alice {n}")
    bobs = notify(bob, "bob's")

    response = logged_in(alice).post("/notifications/read-all/", headers=HTMX)

    assert response.status_code == 200
    assert json.loads(response["HX-Trigger"]) == {"rivya:changed": True}
    html = response.content.decode()
    assert "You are all caught up." in html
    assert 'data-testid="mark-all-read"' not in html
    assert unread_ids(html) == []
    assert len(shown_titles(html)) == 3
    assert "All notifications are marked as read." in html
    assert selectors.unread_count(user=alice) == 0
    assert selectors.unread_count(user=bob) == 1
    assert Notification.objects.get(pk=bobs.pk).read_at is None


def test_mark_all_read_without_javascript_goes_back_to_the_center(user: Any) -> None:
    notify(user, "first")

    response = logged_in(user).post("/notifications/read-all/")

    assert response.status_code == 302
    assert response["Location"] == "/notifications/"
    assert selectors.unread_count(user=user) == 0


def test_an_empty_center_says_what_will_appear(user: Any) -> None:
    html = logged_in(user).get("/notifications/").content.decode()

    assert "No notifications yet." in html
    assert "You are all caught up." in html


def test_the_center_shows_at_most_100_unread_first(user: Any) -> None:
    # given 30 read notifications, then 80 unread ones, then 5 read ones
    for n in range(30):
        notify(user, f"read old {n}", read=True)
    for n in range(80):
        notify(user, f"unread {n}")
    for n in range(5):
        notify(user, f"read new {n}", read=True)

    html = logged_in(user).get("/notifications/").content.decode()

    titles = shown_titles(html)
    assert len(titles) == 100
    assert titles[:80] == [f"unread {n}" for n in reversed(range(80))]
    assert titles[80:85] == [f"read new {n}" for n in reversed(range(5))]
    assert titles[85:] == [f"read old {n}" for n in reversed(range(15, 30))]
    assert "Older ones are not shown here." in html


def test_more_unread_than_the_cap_are_counted_in_full(user: Any) -> None:
    Notification.objects.bulk_create(
        [
            Notification(user=user, kind="credits", title=f"n{n}", created_at=timezone.now())
            for n in range(105)
        ]
    )

    html = logged_in(user).get("/notifications/").content.decode()

    assert len(unread_ids(html)) == 100
    assert '<strong class="ink">105</strong> unread' in html
    assert re.search(r'data-testid="unread-count">105<', html)


@pytest.mark.parametrize("size", [5, 150])
def test_the_center_queries_do_not_grow_with_notifications(
    user: Any, django_assert_num_queries: Any, size: int
) -> None:
    base = timezone.now() - timedelta(days=1)
    Notification.objects.bulk_create(
        [
            Notification(
                user=user,
                kind="credits",
                title=f"n{n}",
                read_at=base if n % 2 else None,
            )
            for n in range(size)
        ]
    )
    client = logged_in(user)

    # session, user, unread, read, credits (header)
    with django_assert_num_queries(5):
        response = client.get("/notifications/")

    assert response.status_code == 200


def test_marking_one_read_is_a_bounded_number_of_queries(
    user: Any, django_assert_max_num_queries: Any
) -> None:
    note = notify(user, "first")
    client = logged_in(user)

    # session, user, find, mark, reload, count
    with django_assert_max_num_queries(6):
        client.post(f"/notifications/{note.pk}/read/", headers=HTMX)


def test_the_header_status_shows_the_unread_count(user: Any) -> None:
    notify(user, "first")
    notify(user, "second")

    response = logged_in(user).get("/partials/header/")

    assert re.search(r'data-testid="unread-count">2<', response.content.decode())
