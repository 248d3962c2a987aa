"""The chat checks of ``ledger_check`` find planted breaches (each check can fail)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from billing import services as billing
from billing.invariants import run_checks, run_reports
from chat import services
from chat.models import ChatMessage

C = 1_000_000

pytestmark = pytest.mark.usefixtures("chat_catalog")


def breached(name: str) -> list[str]:
    return [b.detail for b in run_checks() if b.check == name]


def a_turn(chatter: Any, open_session: Any) -> tuple[Any, ChatMessage]:
    user, client = chatter()
    session = open_session(client)
    start = services.start_turn(user=user, session_id=session, content="Hi", max_tokens=10)
    return user, start.message


def test_clean_turns_pass(chatter: Any, open_session: Any) -> None:
    user, message = a_turn(chatter, open_session)
    assert run_checks() == []


def test_a_hold_without_its_message_is_a_breach(chatter: Any, make_user: Any) -> None:
    user, _client = chatter()
    ghost = str(uuid.uuid4())
    billing.hold_create(user=user, amount=100, subject_type="chat.message", subject_id=ghost)

    assert any(ghost in d and "no such message" in d for d in breached("4.chat_hold_owner"))


def test_a_hold_on_another_users_account_is_a_breach(
    chatter: Any, open_session: Any, make_user: Any
) -> None:
    user, message = a_turn(chatter, open_session)
    other, _client = chatter()
    fake = ChatMessage.objects.create(
        session=message.session,
        user=user,
        role="assistant",
        status="STREAMING",
        reserved_micro=100,
    )
    billing.hold_create(user=other, amount=100, subject_type="chat.message", subject_id=fake.pk)

    assert any(str(fake.pk) in d for d in breached("4.chat_hold_owner"))


def test_a_reserve_that_is_not_the_estimate_is_a_breach(chatter: Any, open_session: Any) -> None:
    user, message = a_turn(chatter, open_session)
    ChatMessage.objects.filter(pk=message.pk).update(max_tokens=5)

    assert any(str(message.pk) in d for d in breached("4.chat_reserve"))


def test_free_delivered_text_is_a_breach(chatter: Any, open_session: Any) -> None:
    user, message = a_turn(chatter, open_session)
    services.finish_turn(
        message_id=message.pk,
        content="some text",
        usage=None,
        streamed_tokens=2,
        finish_reason="stop",
    )
    assert run_checks() == []
    ChatMessage.objects.filter(pk=message.pk).update(charged_micro=0)

    assert any(str(message.pk) in d for d in breached("4.chat_delivered"))


def test_a_turn_streaming_long_past_the_cutoff_is_reported(
    chatter: Any, open_session: Any, settings: Any
) -> None:
    user, message = a_turn(chatter, open_session)
    assert [r for r in run_reports() if r.check == "chat_abandoned"] == []
    settings.CHAT_TURN_MAX_SECONDS = -1000  # as if it had streamed for far too long

    reports = [r.detail for r in run_reports() if r.check == "chat_abandoned"]
    assert len(reports) == 1
    assert str(message.pk) in reports[0]
