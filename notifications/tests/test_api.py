"""The notifications API: the caller's own notifications, newest first, unread filter, marking
read (one, all) and the unread badge count; and the one-per-(user, kind, subject) rule."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from rest_framework.test import APIClient

from notifications.models import Notification
from notifications.services import notification_create, notification_mark_read
from tasks import services as task_services
from tasks.catalog import seed_catalog

pytestmark = pytest.mark.django_db

LIST = "/api/v1/notifications/"
READ_ALL = "/api/v1/notifications/read-all/"
UNREAD_COUNT = "/api/v1/notifications/unread-count/"
K = Notification.Kind


def read_url(notification_id: Any) -> str:
    return f"/api/v1/notifications/{notification_id}/read/"


def notify(user: Any, n: int = 0, kind: str = K.GENERATION_SUCCESS, **extra: Any) -> Notification:
    extra.setdefault("subject_type", "tasks.task")
    extra.setdefault("subject_id", str(uuid.uuid4()))
    notification = notification_create(user=user, kind=kind, title=f"note {n}", body="b", **extra)
    assert notification is not None
    return notification


def ids(response: Any) -> list[str]:
    assert response.status_code == 200
    return [n["id"] for n in response.json()["results"]]


def assert_not_found(response: Any) -> None:
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_list_is_newest_first_and_only_mine(make_user: Any, api_for: Any) -> None:
    alice, bob = make_user(), make_user()
    mine = [notify(alice, n) for n in range(3)]
    theirs = notify(bob)

    response = api_for(alice).get(LIST)

    assert ids(response) == [str(n.pk) for n in reversed(mine)]
    assert str(theirs.pk) not in ids(response)
    first = response.json()["results"][0]
    assert first["kind"] == "generation_success"
    assert first["title"] == "note 2"
    assert first["task_id"] == mine[2].subject_id
    assert (first["read"], first["read_at"]) == (False, None)
    assert set(response.json()) == {"next", "previous", "results"}


def test_task_id_is_only_given_for_task_subjects(make_user: Any, api_for: Any) -> None:
    user = make_user()
    notify(user, kind=K.CREDITS, subject_type="billing.grant", subject_id="42")

    body = api_for(user).get(LIST).json()["results"][0]

    assert body["task_id"] is None


def test_unread_filter(make_user: Any, api_for: Any) -> None:
    user = make_user()
    old, new = notify(user, 0), notify(user, 1)
    notification_mark_read(user=user, notification_id=old.pk)
    client = api_for(user)

    assert ids(client.get(LIST, {"unread": "true"})) == [str(new.pk)]
    assert ids(client.get(LIST)) == [str(new.pk), str(old.pk)]
    assert ids(client.get(LIST, {"unread": "false"})) == [str(new.pk), str(old.pk)]


def test_mark_one_read(make_user: Any, api_for: Any) -> None:
    user = make_user()
    target, other = notify(user, 0), notify(user, 1)
    client = api_for(user)

    response = client.post(read_url(target.pk))

    assert response.status_code == 200
    body = response.json()
    assert (body["id"], body["read"]) == (str(target.pk), True)
    assert body["read_at"] is not None
    target.refresh_from_db()
    other.refresh_from_db()
    assert target.read_at is not None
    assert other.read_at is None
    assert client.get(UNREAD_COUNT).json() == {"unread": 1}

    again = client.post(read_url(target.pk))

    assert again.status_code == 200
    assert again.json()["read_at"] == body["read_at"]  # the first read time is kept


def test_mark_read_of_someone_elses_notification_is_404(make_user: Any, api_for: Any) -> None:
    owner, stranger = make_user(), make_user()
    theirs = notify(owner)
    client = api_for(stranger)

    assert_not_found(client.post(read_url(theirs.pk)))
    assert_not_found(client.post(read_url(uuid.uuid4())))
    assert_not_found(client.post("/api/v1/notifications/not-a-uuid/read/"))
    theirs.refresh_from_db()
    assert theirs.read_at is None


def test_read_all_marks_only_mine(make_user: Any, api_for: Any) -> None:
    me, someone = make_user(), make_user()
    for n in range(3):
        notify(me, n)
    notification_mark_read(user=me, notification_id=notify(me, 3).pk)
    theirs = notify(someone)
    client = api_for(me)

    response = client.post(READ_ALL)

    assert response.status_code == 200
    assert response.json() == {"marked_read": 3}
    assert not Notification.objects.filter(user=me, read_at__isnull=True).exists()
    theirs.refresh_from_db()
    assert theirs.read_at is None
    assert client.post(READ_ALL).json() == {"marked_read": 0}
    assert ids(client.get(LIST, {"unread": "true"})) == []


def test_unread_count_is_per_user(make_user: Any, api_for: Any) -> None:
    me, someone = make_user(), make_user()
    for n in range(4):
        notify(me, n)
    notify(someone)
    client = api_for(me)

    assert client.get(UNREAD_COUNT).json() == {"unread": 4}
    assert api_for(someone).get(UNREAD_COUNT).json() == {"unread": 1}
    client.post(READ_ALL)
    assert client.get(UNREAD_COUNT).json() == {"unread": 0}


def test_anonymous_is_refused() -> None:
    anonymous = APIClient()

    for response in (
        anonymous.get(LIST),
        anonymous.get(UNREAD_COUNT),
        anonymous.post(READ_ALL),
    ):
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "not_authenticated"


def test_list_query_count_does_not_grow(
    make_user: Any, api_for: Any, django_assert_max_num_queries: Any
) -> None:
    user = make_user()
    client = api_for(user)
    notify(user, 0)
    client.get(LIST)  # the API key's once-a-minute "last used" write happens here

    for n in range(1, 40):
        notify(user, n)

    with django_assert_max_num_queries(2):
        assert len(ids(client.get(LIST))) == 40


# --- notification_create --------------------------------------------------------------------


def test_one_notification_per_user_kind_and_subject(make_user: Any) -> None:
    user = make_user()
    subject = {"subject_type": "tasks.task", "subject_id": "t-1"}

    first = notification_create(user=user, kind=K.GENERATION_FAILED, title="a", **subject)
    second = notification_create(user=user, kind=K.GENERATION_FAILED, title="b", **subject)

    assert first is not None
    assert second is None
    assert list(Notification.objects.values_list("title", flat=True)) == ["a"]


def test_same_subject_other_kind_or_user_is_another_notification(make_user: Any) -> None:
    alice, bob = make_user(), make_user()
    subject = {"subject_type": "tasks.task", "subject_id": "t-1"}

    notification_create(user=alice, kind=K.GENERATION_SUCCESS, title="done", **subject)
    notification_create(user=alice, kind=K.RESULTS_EXPIRING, title="expiring", **subject)
    notification_create(user=bob, kind=K.GENERATION_SUCCESS, title="done", **subject)

    assert Notification.objects.count() == 3


def test_notifications_without_subject_are_not_deduplicated(make_user: Any) -> None:
    user = make_user()

    for _ in range(2):
        assert notification_create(user=user, kind=K.CREDITS, title="Credits added") is not None

    assert Notification.objects.filter(user=user).count() == 2


def test_refused_submit_shows_up_as_an_unread_notification(
    make_user: Any, api_for: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(task_services.enqueue, "submit", lambda task_id: None)
    seed_catalog()
    user = make_user()  # no credits
    client = api_for(user)

    refused = client.post(
        "/api/v1/tasks/", {"model": "sandbox-image", "prompt": "a fox"}, format="json"
    )

    assert refused.status_code == 402
    notes = client.get(LIST, {"unread": "true"}).json()["results"]
    assert [(n["kind"], n["task_id"]) for n in notes] == [
        ("insufficient_credits", refused.json()["id"])
    ]
    assert client.get(UNREAD_COUNT).json() == {"unread": 1}
