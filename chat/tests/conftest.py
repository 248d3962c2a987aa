"""Fixtures for the chat tests: a funded user's API client and a session to talk in. Turns
settle in a worker thread (no test transaction there), so these tests use ``transactional_db``."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from rest_framework.test import APIClient

from billing import services as billing
from tasks.catalog import seed_catalog

C = 1_000_000


@pytest.fixture
def chat_catalog(transactional_db: Any, sandbox: Any) -> None:
    seed_catalog()


@pytest.fixture
def chatter(chat_catalog: None, make_user: Any, api_for: Any) -> Callable[..., Any]:
    """``chatter(credits=10)``: a new user with that many credits, as (user, API client)."""

    def make(credits_micro: int = 10 * C) -> tuple[Any, APIClient]:
        user = make_user()
        if credits_micro:
            billing.grant(user=user, amount=credits_micro, reason="test funds")
        return user, api_for(user)

    return make


@pytest.fixture
def open_session() -> Callable[..., str]:
    def make(client: APIClient, model: str = "sandbox-chat") -> str:
        response = client.post("/api/v1/chat/sessions/", {"model": model}, format="json")
        assert response.status_code == 201, response.content
        return str(response.json()["id"])

    return make


def read_body(response: Any) -> bytes:
    """All of a response's body; a streamed one is read to its end (the turn settles)."""
    if not response.streaming:
        return bytes(response.content)
    if response.is_async:
        from asgiref.sync import async_to_sync

        async def collect() -> bytes:
            return b"".join([chunk async for chunk in response.streaming_content])

        return async_to_sync(collect)()
    return b"".join(response.streaming_content)


@pytest.fixture
def say() -> Callable[..., Any]:
    """``say(client, session_id, content, **body)``: one turn as JSON; (status, body)."""

    def send(
        client: APIClient, session_id: str, content: str = "Hello there", **body: Any
    ) -> tuple[int, Any]:
        headers = body.pop("headers", {})
        response = client.post(
            f"/api/v1/chat/sessions/{session_id}/messages/",
            {"content": content, **body},
            format="json",
            **headers,
        )
        return response.status_code, json.loads(read_body(response))

    return send


def parse_events(raw: bytes) -> list[tuple[str, Any]]:
    """Server-sent events as (event, data)."""
    events = []
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events


@pytest.fixture
def stream() -> Callable[..., list[tuple[str, Any]]]:
    """``stream(client, session_id, content, **body)``: one turn as server-sent events."""

    def send(client: APIClient, session_id: str, content: str = "Hello there", **body: Any) -> Any:
        response = client.post(
            f"/api/v1/chat/sessions/{session_id}/messages/",
            {"content": content, **body},
            format="json",
            HTTP_ACCEPT="text/event-stream",
        )
        assert response.status_code == 201, response.content
        assert response["Content-Type"] == "text/event-stream"
        return parse_events(read_body(response))

    return send


@pytest.fixture
def read_response() -> Callable[[Any], bytes]:
    return read_body


@pytest.fixture
def events_of() -> Callable[[bytes], list[tuple[str, Any]]]:
    return parse_events
