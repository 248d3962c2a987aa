"""The webhooks section of the account page: endpoints added (secret shown once), disabled,
rotated and removed; a private URL refused with the reason; another account's ids refused;
recent deliveries listed and resent."""

from __future__ import annotations

import html
from typing import Any

import pytest
from django.test import Client

from notifications import webhooks
from notifications.models import WebhookAttempt, WebhookEndpoint, WebhookMessage
from notifications.tests.receiver import Receiver

pytestmark = pytest.mark.django_db(transaction=True)


def logged_in(some_user: Any) -> Client:
    client = Client()
    client.force_login(some_user)
    return client


def page_text(client: Client) -> str:
    return html.unescape(client.get("/account/").content.decode())


def record_failure(user: Any) -> None:
    """A ``task.failed`` event for ``user`` (its data does not matter here)."""
    webhooks.webhook_event_record(
        user_id=user.pk,
        event_type="task.failed",
        subject_type="",
        subject_id="",
        data=lambda: {},
    )


def test_adding_an_endpoint_shows_its_secret_once(funded: Any, webhook_receiver: Receiver) -> None:
    user = funded(0)
    client = logged_in(user)
    answer = client.post(
        "/account/",
        {
            "action": "create_endpoint",
            "url": webhook_receiver.url(),
            "description": "staging",
            "event_types": ["task.completed", "task.failed"],
        },
    )
    assert answer.status_code == 302  # reloading the page does not add it again
    endpoint = WebhookEndpoint.objects.get(user=user)
    assert endpoint.event_types == ["task.completed", "task.failed"]
    assert endpoint.secret in page_text(client)
    again = page_text(client)
    assert endpoint.url in again
    assert "staging" in again
    assert endpoint.secret not in again


def test_a_private_url_is_refused_with_the_reason(funded: Any, settings: Any) -> None:
    settings.WEBHOOK_ALLOW_PRIVATE = False
    client = logged_in(funded(0))
    answer = client.post(
        "/account/", {"action": "create_endpoint", "url": "https://10.0.0.5/hook"}, follow=True
    )
    text = html.unescape(answer.content.decode())
    assert "does not resolve to a public address" in text
    assert "10.0.0.5, a" not in text  # what an internal name points to is not said
    assert not WebhookEndpoint.objects.exists()


def test_disable_enable_rotate_and_remove(funded: Any, webhook_receiver: Receiver) -> None:
    user = funded(0)
    endpoint = webhooks.endpoint_create(user=user, url=webhook_receiver.url())
    client = logged_in(user)
    client.post("/account/", {"action": "toggle_endpoint", "endpoint": str(endpoint.pk)})
    endpoint.refresh_from_db()
    assert not endpoint.enabled
    assert "disabled" in page_text(client)
    client.post("/account/", {"action": "toggle_endpoint", "endpoint": str(endpoint.pk)})
    old = endpoint.secret
    rotated = client.post(
        "/account/", {"action": "rotate_endpoint", "endpoint": str(endpoint.pk)}, follow=True
    )
    endpoint.refresh_from_db()
    assert endpoint.enabled
    assert endpoint.previous_secret == old
    assert endpoint.secret in rotated.content.decode()
    client.post("/account/", {"action": "delete_endpoint", "endpoint": str(endpoint.pk)})
    assert not WebhookEndpoint.objects.exists()


def test_another_account_s_endpoint_or_delivery_is_not_found(
    funded: Any, webhook_receiver: Receiver, deliver_due: Any
) -> None:
    owner, other = funded(0), funded(0)
    endpoint = webhooks.endpoint_create(user=owner, url=webhook_receiver.url())
    record_failure(owner)
    deliver_due()
    message = WebhookMessage.objects.get()
    client = logged_in(other)
    for action in ("toggle_endpoint", "rotate_endpoint", "delete_endpoint"):
        answer = client.post(
            "/account/", {"action": action, "endpoint": str(endpoint.pk)}, follow=True
        )
        assert "No such webhook endpoint." in answer.content.decode()
    answer = client.post(
        "/account/", {"action": "resend_message", "message": str(message.pk)}, follow=True
    )
    assert "No such delivery." in answer.content.decode()
    endpoint.refresh_from_db()
    message.refresh_from_db()
    assert endpoint.enabled
    assert endpoint.previous_secret == ""
    assert message.resend_requested_at is None
    assert endpoint.url not in page_text(client)


def test_recent_deliveries_are_listed_and_resent(
    funded: Any, webhook_receiver: Receiver, deliver_due: Any
) -> None:
    user = funded(0)
    webhooks.endpoint_create(user=user, url=webhook_receiver.url())
    webhook_receiver.script("/hook", {"status": 500})
    record_failure(user)
    deliver_due()
    client = logged_in(user)
    text = page_text(client)
    assert "task.failed" in text
    assert "HTTP 500" in text
    message = WebhookMessage.objects.get()
    client.post("/account/", {"action": "resend_message", "message": str(message.pk)})
    deliver_due()
    message.refresh_from_db()
    assert message.status == WebhookMessage.Status.SUCCEEDED
    assert list(WebhookAttempt.objects.order_by("number").values_list("trigger", flat=True)) == [
        "scheduled",
        "resend",
    ]
