"""A chat turn sends ``chat.message.completed`` to the account's endpoints when it settles."""

from __future__ import annotations

import json
from typing import Any

import pytest
from standardwebhooks import Webhook

from notifications import webhooks
from notifications.tests.receiver import Receiver

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_finished_turn_is_sent_to_a_subscribed_endpoint(
    chatter: Any,
    open_session: Any,
    say: Any,
    webhook_receiver: Receiver,
    deliver_due: Any,
    ledger_ok: None,
) -> None:
    user, client = chatter()
    hook = webhooks.endpoint_create(
        user=user, url=webhook_receiver.url("/chat"), event_types=["chat.message.completed"]
    )
    status, body = say(client, open_session(client), "Hello there")
    assert status == 201, body
    deliver_due()
    (request,) = webhook_receiver.received("/chat")
    payload = Webhook(hook.secret).verify(request["body"], request["headers"])
    assert payload["type"] == "chat.message.completed"
    assert payload["data"]["id"] == body["id"]
    assert payload["data"]["status"] == "COMPLETE"
    assert payload["data"]["credits"] == json.loads(json.dumps(body["credits"]))
