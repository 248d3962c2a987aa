"""Outbound webhooks end to end: a task submitted through the API, run by the real Celery
worker against the sandbox, its events delivered by the worker to the receiver process and
verified with the standardwebhooks library; and a worker killed with SIGKILL in the middle of a
delivery, after which the message is still delivered (at least once)."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from django.db import transaction
from django.utils import timezone
from rest_framework.test import APIClient
from standardwebhooks import Webhook

from billing import services as billing
from notifications import webhooks
from notifications.models import WebhookMessage
from notifications.tests.receiver import Receiver
from rivya import services as rivya_services
from tasks.models import Task
from tests.e2e import Stack, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]
C = 1_000_000


def client_for(user: Any) -> APIClient:
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {rivya_services.api_key_create(user=user).raw}")
    return api


def test_a_task_s_events_reach_its_webhook_url_through_the_worker(
    e2e: Stack, make_user: Any, webhook_receiver: Receiver
) -> None:
    user = make_user()
    billing.grant(user=user, amount=10 * C, reason="e2e test funds")
    api = client_for(user)
    secret = api.get("/api/v1/webhooks/secret/").json()["secret"]
    created = api.post(
        "/api/v1/tasks/",
        {
            "model": "sandbox-image",
            "prompt": "a lighthouse",
            "webhook_url": webhook_receiver.url("/e2e"),
        },
        format="json",
    )
    assert created.status_code == 202, created.content
    assert created.json()["webhook_url"] == webhook_receiver.url("/e2e")
    got = webhook_receiver.wait_for(2, "/e2e")
    payloads = [Webhook(secret).verify(r["body"], r["headers"]) for r in got]
    assert [p["type"] for p in payloads] == ["task.started", "task.completed"]
    task = Task.objects.get(pk=created.json()["id"])
    assert task.status == Task.Status.SUCCESS
    assert payloads[1]["data"]["id"] == str(task.pk)
    assert payloads[1]["data"]["status"] == "SUCCESS"
    wait_for(
        lambda: (
            set(WebhookMessage.objects.values_list("status", flat=True))
            == {WebhookMessage.Status.SUCCEEDED}
        ),
        what="both messages recorded as succeeded",
    )


def test_a_worker_killed_mid_delivery_still_delivers_the_message(
    e2e: Stack, make_user: Any, webhook_receiver: Receiver
) -> None:
    user = make_user()
    hook = webhooks.endpoint_create(user=user, url=webhook_receiver.url("/killed"))
    # The first request is held by the receiver long enough to kill the worker sending it.
    webhook_receiver.script("/killed", {"status": 200, "delay": 30})
    with transaction.atomic():
        webhooks.webhook_event_record(
            user_id=user.pk,
            event_type="task.completed",
            subject_type="tasks.task",
            subject_id="00000000-0000-0000-0000-00000000e2e0",
            data=lambda: {"id": "00000000-0000-0000-0000-00000000e2e0"},
        )
    webhook_receiver.wait_for(1, "/killed")
    message = WebhookMessage.objects.get(endpoint=hook)
    assert message.status == WebhookMessage.Status.SENDING
    for proc in e2e.live_workers():
        e2e.kill_worker(proc)
    # Its lease runs out (here at once, instead of after a minute), and a new worker's sweep
    # takes it again.
    WebhookMessage.objects.filter(pk=message.pk).update(
        lease_until=timezone.now() - timedelta(seconds=1)
    )
    e2e.start_worker()
    got = webhook_receiver.wait_for(2, "/killed")
    assert len(got) == 2
    assert got[0]["headers"]["webhook-id"] == got[1]["headers"]["webhook-id"]
    Webhook(hook.secret).verify(got[1]["body"], got[1]["headers"])
    assert json.loads(got[1]["body"])["type"] == "task.completed"
    wait_for(
        lambda: WebhookMessage.objects.get(pk=message.pk).status == WebhookMessage.Status.SUCCEEDED,
        what="the message recorded as succeeded",
    )
