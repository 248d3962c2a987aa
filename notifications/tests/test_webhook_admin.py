"""Webhooks in the support admin: endpoints, messages and attempts read-only, messages found by
task id, resent by staff allowed to (the Support group), refused to others."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth.models import Group
from django.core.management import call_command
from django.test import Client

from notifications import webhooks
from notifications.models import WebhookAttempt, WebhookEndpoint, WebhookMessage
from notifications.tests.receiver import Receiver

pytestmark = pytest.mark.django_db(transaction=True)
LIST = "/admin/notifications/webhookmessage/"
TASK_ID = "0e0e0e0e-0000-4000-8000-000000000001"


@pytest.fixture
def delivered(funded: Any, webhook_receiver: Receiver, deliver_due: Any) -> WebhookMessage:
    """A message about TASK_ID, delivered once, and one about another task."""
    user = funded(0)
    webhooks.endpoint_create(user=user, url=webhook_receiver.url())
    for subject in (TASK_ID, "0e0e0e0e-0000-4000-8000-000000000002"):
        webhooks.webhook_event_record(
            user_id=user.pk,
            event_type="task.completed",
            subject_type="tasks.task",
            subject_id=subject,
            data=lambda: {"status": "SUCCESS"},
        )
    deliver_due()
    return WebhookMessage.objects.get(subject_id=TASK_ID)


def staff_client(make_user: Any, group: str | None) -> Client:
    call_command("setup_roles")
    user = make_user(is_staff=True)
    if group:
        user.groups.add(Group.objects.get(name=group))
    client = Client()
    client.force_login(user)
    return client


def test_support_finds_a_task_s_messages_and_sees_their_attempts_but_no_secret(
    delivered: WebhookMessage, make_user: Any
) -> None:
    client = staff_client(make_user, "Support")
    listed = client.get(LIST, {"q": TASK_ID})
    assert listed.status_code == 200
    assert str(delivered.pk) in listed.content.decode()
    assert listed.context["cl"].result_count == 1
    page = client.get(f"{LIST}{delivered.pk}/change/")
    assert page.status_code == 200
    html = page.content.decode()
    assert delivered.webhook_id in html
    assert "Scheduled" in html  # the attempt, inline
    endpoint = WebhookEndpoint.objects.get()
    assert endpoint.secret not in html
    endpoint_page = client.get(f"/admin/notifications/webhookendpoint/{endpoint.pk}/change/")
    assert endpoint_page.status_code == 200
    assert endpoint.secret not in endpoint_page.content.decode()
    # Read-only: no change by POST.
    assert client.post(f"{LIST}{delivered.pk}/change/", {"status": "failed"}).status_code == 403


def test_support_resends_a_message_from_the_list(
    delivered: WebhookMessage, make_user: Any, deliver_due: Any, webhook_receiver: Receiver
) -> None:
    client = staff_client(make_user, "Support")
    answer = client.post(
        LIST, {"action": "resend", "_selected_action": [str(delivered.pk)]}, follow=True
    )
    assert answer.status_code == 200
    assert "queued to be sent again" in answer.content.decode()
    deliver_due()
    attempts = WebhookAttempt.objects.filter(message=delivered).order_by("number")
    assert [a.trigger for a in attempts] == ["scheduled", "resend"]
    assert len(webhook_receiver.received()) == 3  # two messages, one of them twice


def test_staff_without_the_permission_cannot_resend(
    delivered: WebhookMessage, make_user: Any, deliver_due: Any
) -> None:
    client = staff_client(make_user, None)
    client.post(LIST, {"action": "resend", "_selected_action": [str(delivered.pk)]})
    delivered.refresh_from_db()
    assert delivered.status == WebhookMessage.Status.SUCCEEDED
    assert delivered.resend_requested_at is None
    assert deliver_due() == {}
