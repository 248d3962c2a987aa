"""Chat in the support admin (read-only, each turn's settlement), and turns whose server died
mid-stream, settled by the beat."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import Group
from django.core.management import call_command
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from billing.models import Hold
from billing.selectors import balance_for_user
from chat import services
from chat.models import ChatMessage

C = 1_000_000

pytestmark = pytest.mark.usefixtures("chat_catalog", "ledger_ok")


def test_support_reads_a_turns_settlement_and_cannot_change_it(
    chatter: Any, open_session: Any, say: Any, make_user: Any
) -> None:
    user, client = chatter()
    session = open_session(client)
    status, body = say(client, session, "Hello admin", max_tokens=20)
    call_command("setup_roles")
    agent = make_user(is_staff=True)
    agent.groups.add(Group.objects.get(name="Support"))
    staff = Client()
    staff.force_login(agent)
    url = reverse("admin:chat_chatmessage_change", args=[body["id"]])

    page = staff.get(url)

    assert page.status_code == 200
    html = page.content.decode()
    charged = body["credits"]["charged_micro"]
    assert f"charged {charged} µ for" in html
    assert "reported by the provider" in html
    assert f"hold {Hold.objects.get(subject_id=body['id']).pk}</a>: captured" in html
    assert 'name="_save"' not in html
    assert "deletelink" not in html
    assert staff.post(url, {"content": "changed"}).status_code == 403
    assert ChatMessage.objects.get(pk=body["id"]).content == body["content"]

    listing = staff.get(reverse("admin:chat_chatmessage_changelist"), {"q": user.username})
    assert listing.status_code == 200
    assert body["id"][:8] in listing.content.decode()
    user_page = staff.get(reverse("admin:rivya_user_change", args=[user.pk]))
    assert reverse("admin:chat_chatsession_change", args=[session]) in user_page.content.decode()
    ledger = staff.get(reverse("admin:billing_entry_changelist"), {"q": user.username})
    assert reverse("admin:chat_chatmessage_change", args=[body["id"]]) in ledger.content.decode()


def test_a_turn_abandoned_by_a_dead_server_is_released_by_the_beat(
    chatter: Any, open_session: Any, settings: Any
) -> None:
    user, client = chatter()
    session = open_session(client)
    start = services.start_turn(user=user, session_id=session, content="Lost", max_tokens=50)
    message = start.message
    assert balance_for_user(user=user).held == message.reserved_micro > 0

    assert services.settle_abandoned_turns() == 0  # still young: it may be streaming
    later = timezone.now() + timedelta(seconds=settings.CHAT_TURN_MAX_SECONDS + 61)
    assert services.settle_abandoned_turns(now=later) == 1
    assert services.settle_abandoned_turns(now=later) == 0

    message.refresh_from_db()
    assert message.status == ChatMessage.Status.FAILED
    assert message.error_code == "turn_interrupted"
    assert message.error_kind == "infra"
    assert (message.charged_micro, message.refunded_micro) == (0, message.reserved_micro)
    balance = balance_for_user(user=user)
    assert (balance.balance, balance.held) == (10 * C, 0)


def test_finishing_a_turn_twice_settles_once(chatter: Any, open_session: Any) -> None:
    from tasks.providers.base import ChatUsage

    user, client = chatter()
    session = open_session(client)
    start = services.start_turn(user=user, session_id=session, content="Twice", max_tokens=50)

    first = services.finish_turn(
        message_id=start.message.pk,
        content="one two",
        usage=ChatUsage(10, 2),
        streamed_tokens=2,
        finish_reason="stop",
    )
    second = services.finish_turn(
        message_id=start.message.pk,
        content="other",
        usage=ChatUsage(100, 50),
        streamed_tokens=50,
        finish_reason="stop",
    )

    assert second.charged_micro == first.charged_micro == 10 * 10 + 2 * 30
    assert second.content == "one two"
    assert balance_for_user(user=user).balance == 10 * C - first.charged_micro
