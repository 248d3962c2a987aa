"""Chat sessions over the API: create, list, get with messages, rename, delete; other users'
sessions are 404; bad input is a 4xx with an error code; history truncated to the context."""

from __future__ import annotations

from typing import Any

import pytest

from chat import tokens
from chat.models import ChatMessage, ChatSession

pytestmark = pytest.mark.usefixtures("chat_catalog", "ledger_ok")


def test_sessions_are_listed_newest_activity_first(
    chatter: Any, open_session: Any, say: Any
) -> None:
    user, client = chatter()
    older = open_session(client)
    newer = open_session(client, model="sandbox-chat-mini")

    say(client, older, "Bring me back to the top", max_tokens=5)

    listed = client.get("/api/v1/chat/sessions/").json()
    assert [s["id"] for s in listed["results"]] == [older, newer]
    assert listed["results"][0]["title"] == "Bring me back to the top"
    assert listed["results"][1]["model"] == "sandbox-chat-mini"
    assert set(listed) == {"next", "previous", "results"}


def test_a_session_with_its_messages_paginated(chatter: Any, open_session: Any, say: Any) -> None:
    user, client = chatter()
    session = open_session(client)
    for n in range(3):
        say(client, session, f"Message {n}", max_tokens=3)

    body = client.get(f"/api/v1/chat/sessions/{session}/?page_size=4").json()

    page = body["messages"]
    assert [m["role"] for m in page["results"]] == ["user", "assistant"] * 2
    assert page["results"][0]["content"] == "Message 0"
    assert page["next"]
    rest = client.get(page["next"]).json()
    assert [m["content"] for m in rest["results"] if m["role"] == "user"] == ["Message 2"]
    assert rest["next"] is None


def test_rename_and_delete(chatter: Any, open_session: Any) -> None:
    user, client = chatter()
    session = open_session(client)

    renamed = client.patch(
        f"/api/v1/chat/sessions/{session}/", {"title": "  Trip   plans "}, format="json"
    )
    assert renamed.status_code == 200
    assert renamed.json()["title"] == "Trip plans"

    assert client.delete(f"/api/v1/chat/sessions/{session}/").status_code == 204
    assert client.get(f"/api/v1/chat/sessions/{session}/").status_code == 404
    assert client.get("/api/v1/chat/sessions/").json()["results"] == []
    assert ChatSession.objects.get(pk=session).deleted_at is not None  # kept for the ledger


def test_other_users_sessions_are_404(
    chatter: Any, open_session: Any, say: Any, sandbox: Any
) -> None:
    owner, owner_client = chatter()
    session = open_session(owner_client)
    say(owner_client, session, "Mine", max_tokens=3)
    stranger, client = chatter()
    base = f"/api/v1/chat/sessions/{session}/"

    answers = [
        client.get(base),
        client.patch(base, {"title": "x"}, format="json"),
        client.delete(base),
        client.get(base + "messages/"),
        client.post(base + "messages/", {"content": "hi"}, format="json"),
        client.post(
            base + "messages/",
            {"content": "hi"},
            format="json",
            HTTP_ACCEPT="text/event-stream",
        ),
    ]

    for response in answers:
        assert response.status_code == 404, response.content
        assert response.json()["error"]["code"] == "chat_session_not_found"
    assert ChatMessage.objects.filter(user=stranger).count() == 0
    assert ChatSession.objects.get(pk=session).deleted_at is None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"content": ""}, "content"),
        ({"content": 5}, "content"),
        ({"content": "a\u0000b"}, "content"),
        ({"content": "hi", "max_tokens": 0}, "max_tokens"),
        ({"content": "hi", "max_tokens": 100_000}, "max_tokens"),
        ({"content": "hi", "max_tokens": "ten"}, "max_tokens"),
        ({"content": "hi", "max_tokens": True}, "max_tokens"),
        ({"content": "hi", "params": {"sandbox_usage": "all"}}, "params.sandbox_usage"),
        ({"content": "hi", "params": {"bogus": 1}}, "params.bogus"),
        ({"content": "hi", "params": []}, "params"),
    ],
)
def test_bad_turns_are_400_and_hold_nothing(
    chatter: Any, open_session: Any, say: Any, body: dict[str, Any], field: str
) -> None:
    user, client = chatter()
    session = open_session(client)
    content = body.pop("content")

    status, answer = say(client, session, content, **body)

    assert status == 400
    assert field in answer["error"]["fields"]
    assert answer["error"]["kind"] == "user"
    assert not ChatMessage.objects.exists()


def test_malformed_bodies_and_unknown_models(chatter: Any, open_session: Any) -> None:
    user, client = chatter()
    session = open_session(client)
    url = f"/api/v1/chat/sessions/{session}/messages/"

    broken = client.post(url, "{not json", content_type="application/json")
    assert broken.status_code == 400
    assert broken.json()["error"]["code"]
    listed = client.post(url, ["content"], format="json")
    assert listed.status_code == 400
    for model, code in (("nope", "unknown_model"), ("sandbox-image", "model_not_available")):
        response = client.post("/api/v1/chat/sessions/", {"model": model}, format="json")
        assert response.status_code == 400
        assert response.json()["error"]["code"] == code
    assert client.get("/api/v1/chat/sessions/not-a-uuid/").status_code == 404


def test_history_is_truncated_to_the_context_window(
    chatter: Any, open_session: Any, say: Any
) -> None:
    user, client = chatter()
    session = open_session(client, model="sandbox-chat-mini")  # 1,024 tokens of context
    long_text = "word " * 300  # 1,500 bytes: 754 tokens by Rivya's estimate
    say(client, session, long_text, max_tokens=10)
    say(client, session, long_text, max_tokens=10)

    status, body = say(client, session, "And now?", max_tokens=100)

    assert status == 201
    context = body["context"]
    assert context["truncated"] is True
    assert context["messages_dropped"] >= 1
    assert any("did not fit the model's context" in n for n in body["notices"])
    assert body["usage"]["input_tokens_estimate"] + 100 <= 1024
    sent = context["messages_sent"]
    assert sent == 4 - context["messages_dropped"] + 1
    assert tokens.request_tokens(["And now?"]) <= body["usage"]["input_tokens_estimate"]


def test_a_message_too_long_for_the_context_is_400(
    chatter: Any, open_session: Any, say: Any
) -> None:
    user, client = chatter()
    session = open_session(client, model="sandbox-chat-mini")

    # Within the model's 2,000 characters, but 3,980 bytes: ~1,990 tokens by the estimate.
    status, body = say(client, session, "é" * 1_990)

    assert status == 400
    assert body["error"]["code"] == "context_window_exceeded"
