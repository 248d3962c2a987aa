"""The chat pages: the list of chats (start, rename, delete), one conversation, and the message
partial the page's script swaps in once a turn has settled. Turns are recorded and settled
through ``chat.services`` (no provider call: the streaming itself is the API's and is checked in
``chat/tests`` and, in Chromium, ``tests/browser/test_chat.py``)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from django.test import Client

from billing import services as billing
from chat import services
from chat.models import ChatMessage, ChatSession
from rivya.money import format_credits
from rivya.pages.common import price_label
from tasks.models import AIModel
from tasks.providers.base import ChatUsage, ProviderError

pytestmark = pytest.mark.django_db
C = 1_000_000


def logged_in(some_user: Any) -> Client:
    client = Client()
    client.force_login(some_user)
    return client


@pytest.fixture
def chat_user(make_user: Any, seeded_catalog: None) -> Any:
    def make(credits: int = 10) -> Any:
        some_user = make_user()
        if credits:
            billing.grant(user=some_user, amount=credits * C, reason="chat page tests")
        return some_user

    return make


def turn(
    user: Any,
    session: ChatSession,
    content: str = "Hello there",
    *,
    reply: str = "General Kenobi",
    usage: ChatUsage | None = None,
    error: ProviderError | None = None,
    client_gone: bool = False,
    settle: bool = True,
    **start: Any,
) -> ChatMessage:
    """One turn recorded (and settled, unless ``settle`` is False) through the services."""
    started = services.start_turn(user=user, session_id=session.pk, content=content, **start)
    if not settle:
        return started.message
    return services.finish_turn(
        message_id=started.message.pk,
        content=reply,
        usage=usage if usage is not None else ChatUsage(input_tokens=7, output_tokens=3),
        streamed_tokens=3,
        finish_reason="error" if error else "stop",
        error=error,
        client_gone=client_gone,
    )


def by_testid(html: str, name: str) -> list[str]:
    """The text of the elements marked ``name``, outside the page's <template>s (chat.js's)."""
    html = re.sub(r"<template.*?</template>", "", html, flags=re.S)
    return [
        re.sub(r"<[^>]+>", "", m)
        for m in re.findall(rf'data-testid="{name}"[^>]*>(.*?)</', html, re.S)
    ]


# --- the price of a chat model ------------------------------------------------------------------


def test_a_chat_models_price_is_per_million_tokens_input_and_output(
    seeded_catalog: None,
) -> None:
    chat = AIModel.objects.get(slug="sandbox-chat")
    mini = AIModel.objects.get(slug="sandbox-chat-mini")

    assert price_label(chat) == (
        "10 credits per million input tokens, 30 per million output tokens"
    )
    assert price_label(mini) == "2 credits per million input tokens, 8 per million output tokens"
    chat.input_price_micro = None  # the output price applies to input too
    assert price_label(chat) == "30 credits per million tokens"
    chat.price_micro = 0
    assert price_label(chat) == "Free"


# --- the list -------------------------------------------------------------------------------


def test_the_list_shows_the_users_chats_newest_activity_first_and_the_models(
    chat_user: Any, django_assert_max_num_queries: Any, form_controls: Any
) -> None:
    me, other = chat_user(), chat_user()
    first = services.create_session(user=me, model_slug="sandbox-chat", title="First")
    second = services.create_session(user=me, model_slug="sandbox-chat-mini", title="Second")
    services.create_session(user=other, model_slug="sandbox-chat", title="Not mine")
    services.rename_session(session=first, title="First, renamed")  # the newest activity now
    client = logged_in(me)
    client.get("/chat/")

    with django_assert_max_num_queries(6):
        response = client.get("/chat/")

    html = response.content.decode()
    assert response.status_code == 200
    ids = re.findall(r'data-testid="session" data-id="([^"]+)"', html)
    assert ids == [str(first.pk), str(second.pk)]
    assert "Not mine" not in html
    assert "Sandbox Chat Mini" in html
    assert by_testid(html, "price-sandbox-chat") == [
        "10 credits per million input tokens, 30 per million output tokens"
    ]
    assert by_testid(html, "price-sandbox-chat-mini") == [
        "2 credits per million input tokens, 8 per million output tokens"
    ]
    assert 'href="/chat/" aria-current="page"' in html  # the header's Chat link
    parsed = form_controls(html)
    for control in parsed.controls:
        assert control.get("id") in parsed.label_for, control


def test_the_list_pages_by_keyset_and_a_crafted_cursor_gives_the_first_page(
    chat_user: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rivya.pages import chat as chat_pages

    monkeypatch.setattr(chat_pages, "SESSIONS_PER_PAGE", 2)
    me = chat_user()
    made = [
        services.create_session(user=me, model_slug="sandbox-chat", title=f"chat {n}")
        for n in range(3)
    ]
    client = logged_in(me)

    html = client.get("/chat/").content.decode()
    ids = re.findall(r'data-testid="session" data-id="([^"]+)"', html)
    cursor = re.search(r'href="/chat/\?cursor=([^"]+)" rel="next"', html).group(1)
    older = client.get(f"/chat/?cursor={cursor}").content.decode()

    assert ids == [str(made[2].pk), str(made[1].pk)]
    assert re.findall(r'data-testid="session" data-id="([^"]+)"', older) == [str(made[0].pk)]
    assert 'rel="next"' not in older
    for crafted in ("nonsense", "99999999999999999999999_x", "1_not-a-uuid", "-5_"):
        response = client.get("/chat/", {"cursor": crafted})
        assert response.status_code == 200
        assert len(re.findall(r'data-testid="session"', response.content.decode())) == 2


def test_a_new_chat_opens_its_page_and_a_bad_model_is_said_next_to_the_choice(
    chat_user: Any,
) -> None:
    me = chat_user()
    client = logged_in(me)

    response = client.post("/chat/new/", {"model": "sandbox-chat-mini", "title": "  Plans  "})

    session = ChatSession.objects.get(user=me)
    assert response.status_code == 302
    assert response["Location"] == f"/chat/{session.pk}/"
    assert session.model.slug == "sandbox-chat-mini"
    assert session.title == "Plans"

    refused = client.post("/chat/new/", {"model": "sandbox-image"})
    assert refused.status_code == 400
    assert "is not a chat model" in refused.content.decode()
    assert (
        client.post("/chat/new/", {"model": "sandbox-chat", "title": "a\x00b"}).status_code == 400
    )
    assert ChatSession.objects.filter(user=me).count() == 1


def test_rename_and_delete_only_the_users_own_chats(chat_user: Any) -> None:
    me, other = chat_user(), chat_user()
    mine = services.create_session(user=me, model_slug="sandbox-chat", title="Old")
    theirs = services.create_session(user=other, model_slug="sandbox-chat", title="Theirs")
    client = logged_in(me)

    renamed = client.post(f"/chat/{mine.pk}/rename/", {"title": "New name", "next": "/chat/"})
    assert renamed.status_code == 302
    assert renamed["Location"] == "/chat/"
    mine.refresh_from_db()
    assert mine.title == "New name"
    elsewhere = client.post(
        f"/chat/{mine.pk}/rename/", {"title": "x", "next": "https://evil.example/chat/"}
    )
    assert elsewhere["Location"] == f"/chat/{mine.pk}/"
    too_long = client.post(f"/chat/{mine.pk}/rename/", {"title": "x" * 201}, follow=True)
    assert "The chat was not renamed: At most 200 characters." in too_long.content.decode()

    assert client.post(f"/chat/{theirs.pk}/rename/", {"title": "Mine now"}).status_code == 404
    assert client.get(f"/chat/{theirs.pk}/delete/").status_code == 404
    assert client.post(f"/chat/{theirs.pk}/delete/").status_code == 404
    theirs.refresh_from_db()
    assert (theirs.title, theirs.deleted_at) == ("Theirs", None)

    confirm = client.get(f"/chat/{mine.pk}/delete/")
    assert "Delete this chat?" in confirm.content.decode()
    deleted = client.post(f"/chat/{mine.pk}/delete/", follow=True)
    assert deleted.redirect_chain == [("/chat/", 302)]
    assert "Deleted “x”." in deleted.content.decode()
    assert 'data-testid="session"' not in deleted.content.decode()
    assert client.get(f"/chat/{mine.pk}/").status_code == 404


# --- one conversation ---------------------------------------------------------------------------


def test_the_conversation_shows_each_turns_tokens_credits_and_notices(
    chat_user: Any, django_assert_max_num_queries: Any
) -> None:
    me = chat_user()
    session = services.create_session(user=me, model_slug="sandbox-chat")
    answer = turn(me, session, "What is Rivya?", reply="A place to make things.", max_tokens=50)
    stopped = turn(me, session, "And more?", reply="Much more.", client_gone=True)
    client = logged_in(me)
    client.get(f"/chat/{session.pk}/")

    with django_assert_max_num_queries(8):
        response = client.get(f"/chat/{session.pk}/")

    html = response.content.decode()
    assert response.status_code == 200
    assert by_testid(html, "chat-title") == ["What is Rivya?"]
    assert by_testid(html, "message-text") == [
        "What is Rivya?",
        "A place to make things.",
        "And more?",
        "Much more.",
    ]
    assert by_testid(html, "tokens-in") == ["7", "7"]
    assert by_testid(html, "tokens-out") == ["3", "3"]
    assert by_testid(html, "credits-reserved") == [
        format_credits(answer.reserved_micro),
        format_credits(stopped.reserved_micro),
    ]
    assert by_testid(html, "credits-charged")[0] == format_credits(answer.charged_micro)
    assert by_testid(html, "credits-refunded")[0] == format_credits(answer.refunded_micro)
    assert answer.charged_micro == 7 * 10 + 3 * 30
    assert by_testid(html, "message-status") == ["Stopped"]
    assert "it ran to its end and is kept here in full" in html  # the stopped turn's notice
    assert "uncollected" not in html


def test_the_message_box_has_max_tokens_options_and_the_testing_knobs_collapsed(
    chat_user: Any, form_controls: Any
) -> None:
    me = chat_user()
    session = services.create_session(user=me, model_slug="sandbox-chat-mini")

    html = logged_in(me).get(f"/chat/{session.pk}/").content.decode()

    parsed = form_controls(html)
    for control in parsed.controls:
        assert control.get("id") in parsed.label_for, control
    names = [c.get("name") for c in parsed.controls]
    assert names.index("content") + 1 == names.index("max_tokens")
    assert 'max="512"' in html  # the mini model's longest reply
    testing = html.split('<details class="testing"')[1].split("</details>")[0]
    assert " open" not in html.split('<details class="testing"')[1].split(">")[0]
    knobs = re.findall(r'name="param_(sandbox_\w+)"', testing)
    assert knobs[:3] == ["sandbox_reply_tokens", "sandbox_token_delay_ms", "sandbox_latency_ms"]
    assert "param_temperature" in html.split('<details class="options"')[1].split("</details>")[0]
    specs = json.loads(
        re.search(r'<script id="chat-params" type="application/json">(.*?)</script>', html).group(1)
    )
    assert {"name": "sandbox_outcome", "widget": "select", "kind": "string"}.items() <= next(
        s for s in specs if s["name"] == "sandbox_outcome"
    ).items()
    assert f'data-stream-url="/api/v1/chat/sessions/{session.pk}/messages/"' in html
    assert "js/chat.js" in html


def test_a_failed_turn_shows_its_error_and_whose_fault(chat_user: Any) -> None:
    me = chat_user()
    session = services.create_session(user=me, model_slug="sandbox-chat")
    turn(
        me,
        session,
        reply="",
        usage=ChatUsage(input_tokens=0, output_tokens=0),
        error=ProviderError("The upstream fell over.", retryable=False, code="upstream_error"),
    )

    html = logged_in(me).get(f"/chat/{session.pk}/").content.decode()

    assert by_testid(html, "message-status") == ["Failed"]
    assert by_testid(html, "fault") == ["Cause: the provider failed."]
    assert by_testid(html, "error-message") == ["The upstream fell over."]


def test_another_users_chat_a_deleted_one_or_a_missing_one_is_the_styled_404(
    chat_user: Any,
) -> None:
    me, other = chat_user(), chat_user()
    theirs = services.create_session(user=other, model_slug="sandbox-chat")
    gone = services.create_session(user=me, model_slug="sandbox-chat")
    services.delete_session(session=gone)
    client = logged_in(me)

    for url in (
        f"/chat/{theirs.pk}/",
        f"/chat/{gone.pk}/",
        "/chat/00000000-0000-0000-0000-000000000001/",
    ):
        response = client.get(url)
        assert response.status_code == 404, url
        assert "We could not find that page" in response.content.decode()


def test_signed_out_visitors_are_sent_to_log_in(chat_user: Any) -> None:
    session = services.create_session(user=chat_user(), model_slug="sandbox-chat")

    for url in ("/chat/", f"/chat/{session.pk}/"):
        response = Client().get(url)
        assert response.status_code == 302
        assert response["Location"].startswith("/login/")


# --- the message partial ------------------------------------------------------------------------


def test_the_message_partial_is_204_while_streaming_then_the_settled_turn(
    chat_user: Any,
) -> None:
    me = chat_user()
    session = services.create_session(user=me, model_slug="sandbox-chat")
    message = turn(me, session, settle=False)
    client = logged_in(me)
    url = f"/chat/{session.pk}/messages/{message.pk}/"

    assert client.get(url, {"seen": "STREAMING"}).status_code == 204
    polled = client.get(url).content.decode()
    assert 'hx-trigger="every 1s"' in polled
    assert by_testid(polled, "message-status") == ["Writing…"]

    services.finish_turn(
        message_id=message.pk,
        content="All done.",
        usage=ChatUsage(input_tokens=4, output_tokens=2),
        streamed_tokens=2,
        finish_reason="stop",
        client_gone=True,
    )
    settled = client.get(url, {"seen": "STREAMING"})
    html = settled.content.decode()
    assert settled.status_code == 200
    assert json.loads(settled["HX-Trigger"]) == {"rivya:changed": True}
    assert 'data-status="COMPLETE"' in html
    assert 'data-session-title="Hello there"' in html  # named after its first message
    assert "hx-trigger" not in html
    assert by_testid(html, "message-text") == ["All done."]
    assert by_testid(html, "tokens-out") == ["2"]
    assert by_testid(html, "message-status") == ["Stopped"]
    assert "HX-Trigger" not in client.get(url)  # not a change the page had not seen


def test_the_message_partial_answers_only_its_owner_in_its_session(chat_user: Any) -> None:
    me, other = chat_user(), chat_user()
    session = services.create_session(user=me, model_slug="sandbox-chat")
    another = services.create_session(user=me, model_slug="sandbox-chat")
    message = turn(me, session)

    assert logged_in(other).get(f"/chat/{session.pk}/messages/{message.pk}/").status_code == 404
    assert logged_in(me).get(f"/chat/{another.pk}/messages/{message.pk}/").status_code == 404
    services.delete_session(session=session)
    assert logged_in(me).get(f"/chat/{session.pk}/messages/{message.pk}/").status_code == 404
