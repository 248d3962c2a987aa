"""The webhooks section of the account page in Chromium: an endpoint added through the form
shows its secret once; a generation's events are delivered by the real worker, listed under
"Recent deliveries", and one is resent with its button; every delivery verifies with the
secret the page showed."""

from __future__ import annotations

import json
from typing import Any

import pytest
from playwright.sync_api import expect
from standardwebhooks import Webhook

from notifications.tests.receiver import Receiver
from rivya.models import User
from tasks import services as tasks

pytestmark = pytest.mark.usefixtures("e2e")


def test_add_an_endpoint_see_its_deliveries_and_resend_one(
    page: Any, signed_up: str, webhook_receiver: Receiver, shoot: Any
) -> None:
    # Given the account page, an endpoint is added with the form
    page.goto("/account/")
    page.fill("#id_webhook_url", webhook_receiver.url("/browser"))
    page.fill("#id_webhook_description", "my receiver")
    page.get_by_role("button", name="Add endpoint").click()
    secret = page.get_by_test_id("new-webhook-secret").inner_text().strip()
    assert secret.startswith("whsec_")
    endpoints = page.get_by_test_id("webhook-endpoints")
    expect(endpoints).to_contain_text(webhook_receiver.url("/browser"))
    page.reload()  # the answer was a redirect: nothing is sent again
    expect(page.get_by_test_id("new-webhook-secret")).to_have_count(0)  # shown once
    expect(endpoints.locator("tr", has_text="my receiver")).to_have_count(1)

    # When a generation runs (the worker delivers its events)
    user = User.objects.get(username=signed_up)
    tasks.task_submit(user=user, model_slug="sandbox-image", prompt="a red fox", params={})
    got = webhook_receiver.wait_for(2, "/browser")
    assert [json.loads(r["body"])["type"] for r in got] == ["task.started", "task.completed"]

    # Then the page lists them, and one is resent with its button
    page.goto("/account/")  # a new load (not "#webhooks": that would only scroll)
    messages = page.get_by_test_id("webhook-messages")
    completed = messages.locator("tr", has_text="task.completed")
    expect(completed).to_contain_text("Succeeded")
    shoot(page, "account-webhooks")
    completed.get_by_role("button", name="Resend").click()
    expect(page.get_by_text("task.completed will be sent again now.")).to_be_visible()
    got = webhook_receiver.wait_for(3, "/browser")
    assert len(got) == 3
    assert got[2]["headers"]["webhook-id"] == got[1]["headers"]["webhook-id"]
    for request in got:
        Webhook(secret).verify(request["body"], request["headers"])
