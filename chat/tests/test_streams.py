"""Chat streams served by the real ASGI server (uvicorn, as ``make run``): a client that closes
its connection mid-stream, concurrent turns of one account, and no database connection held
while a stream waits for tokens."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from django.db import connection

from billing.models import Hold
from billing.selectors import balance_for_user
from chat.models import ChatMessage
from chat.services import turn_cost
from rivya import services as rivya_services

C = 1_000_000
IN, OUT = 10, 30

pytestmark = pytest.mark.usefixtures("asgi_server", "ledger_ok")


def wait_until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def bearer(user: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {rivya_services.api_key_create(user=user).raw}"}


def sse_headers(user: Any) -> dict[str, str]:
    return {**bearer(user), "Accept": "text/event-stream"}


def new_session(base: str, user: Any) -> str:
    response = httpx.post(
        f"{base}/api/v1/chat/sessions/",
        json={"model": "sandbox-chat"},
        headers=bearer(user),
        trust_env=False,
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def chat_stats(sandbox: Any) -> dict[str, int]:
    return httpx.get(f"{sandbox.base_url}/v1/chat/stats", trust_env=False).json()


def test_a_client_that_closes_the_connection_mid_stream_is_settled_in_full(
    asgi_server: str, chatter: Any, sandbox: Any
) -> None:
    user, _ = chatter()
    session = new_session(asgi_server, user)
    before = chat_stats(sandbox)
    body = {
        "content": "Walk away",
        "max_tokens": 200,
        "params": {"sandbox_reply_tokens": 100, "sandbox_token_delay_ms": 20},
    }

    deltas = 0
    with (
        httpx.Client(trust_env=False, timeout=30) as client,
        client.stream(
            "POST",
            f"{asgi_server}/api/v1/chat/sessions/{session}/messages/",
            json=body,
            headers=sse_headers(user),
        ) as response,
    ):
        assert response.status_code == 201
        for line in response.iter_lines():
            if line == "event: delta":
                deltas += 1
                if deltas == 10:
                    break  # leaving the block closes the connection for real
    closed_at = time.monotonic()

    message = ChatMessage.objects.get(user=user, role="assistant")
    wait_until(
        lambda: ChatMessage.objects.get(pk=message.pk).is_finished,
        timeout=2 + 5,  # the rest of the reply (~1.8 s), then settled within 5 s
        what="the abandoned turn to settle",
    )
    settled_after = time.monotonic() - closed_at
    message.refresh_from_db()
    assert message.status == ChatMessage.Status.COMPLETE
    assert message.client_gone_at is not None
    assert len(message.content.split()) == 100  # the whole reply was read and kept
    assert message.output_tokens == 100
    assert message.usage_reported is True
    charged = turn_cost(
        input_tokens=message.input_tokens,
        output_tokens=100,
        input_price_micro=IN,
        output_price_micro=OUT,
    )
    assert message.charged_micro == charged
    assert message.refunded_micro == message.reserved_micro - charged
    hold = Hold.objects.get(subject_type="chat.message", subject_id=str(message.pk))
    assert (hold.status, hold.captured) == ("captured", charged)
    assert balance_for_user(user=user).balance == 10 * C - charged
    after = chat_stats(sandbox)
    assert after["chat_disconnects"] == before["chat_disconnects"]  # Rivya kept reading
    assert after["chat_tokens"] == before["chat_tokens"] + 100  # every token was read
    assert after["chat_streams_open"] == 0
    assert settled_after < 7


def test_concurrent_turns_on_one_account_never_overdraw(asgi_server: str, chatter: Any) -> None:
    # Enough for about three full holds of 300 reply tokens; eight turns race for it.
    user, _ = chatter(credits_micro=3 * 300 * OUT + 500)
    session = new_session(asgi_server, user)
    headers = bearer(user)

    async def turn(n: int, client: httpx.AsyncClient) -> httpx.Response:
        return await client.post(
            f"{asgi_server}/api/v1/chat/sessions/{session}/messages/",
            json={
                "content": f"Race {n}",
                "max_tokens": 300,
                "params": {"sandbox_reply_tokens": 300, "sandbox_token_delay_ms": 1},
            },
            headers=headers,
        )

    async def race() -> list[httpx.Response]:
        async with httpx.AsyncClient(trust_env=False, timeout=60) as client:
            return await asyncio.gather(*(turn(n, client) for n in range(8)))

    answers = asyncio.run(race())

    statuses = sorted(r.status_code for r in answers)
    assert set(statuses) <= {201, 402}, [r.text for r in answers]
    assert 201 in statuses
    assert 402 in statuses  # not everyone could be served
    settled = [r.json() for r in answers if r.status_code == 201]
    charged = sum(m["credits"]["charged_micro"] for m in settled)
    reserved = sum(m["credits"]["reserved_micro"] for m in settled)
    balance = balance_for_user(user=user)
    assert reserved <= 3 * 300 * OUT + 500  # the holds never exceeded the balance together
    assert balance.balance == 3 * 300 * OUT + 500 - charged >= 0
    assert balance.held == 0
    for refused in (r for r in answers if r.status_code == 402):
        assert refused.json()["error"]["code"] == "insufficient_credits"
    assert ChatMessage.objects.filter(role="assistant").count() == len(settled)


def _connections_to_this_database() -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return int(cursor.fetchone()[0])


def _assistant_messages() -> int:
    return ChatMessage.objects.filter(role="assistant").count()


async def off_loop(func: Any) -> Any:
    """``func()`` in a thread whose database connection is closed afterwards."""

    def call() -> Any:
        try:
            return func()
        finally:
            connection.close()

    return await asyncio.to_thread(call)


def test_a_waiting_stream_holds_no_database_connection(asgi_server: str, chatter: Any) -> None:
    user, _ = chatter()
    session = new_session(asgi_server, user)
    headers = sse_headers(user)
    streams = 8
    url = f"{asgi_server}/api/v1/chat/sessions/{session}/messages/"
    body = {"content": "Wait for it", "max_tokens": 5, "params": {"sandbox_latency_ms": 2500}}

    async def run() -> tuple[int, list[str]]:
        async with httpx.AsyncClient(trust_env=False, timeout=30) as client:

            async def one() -> str:
                async with client.stream("POST", url, json=body, headers=headers) as response:
                    return (await response.aread()).decode()

            tasks = [asyncio.create_task(one()) for _ in range(streams)]
            # All streams started (their messages exist) and wait for their first token.
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if await off_loop(_assistant_messages) == streams:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            held = await off_loop(_connections_to_this_database)
            return held, await asyncio.gather(*tasks)

    held, bodies = asyncio.run(run())

    assert held < streams, f"{held} connections for {streams} waiting streams"
    assert all(b.rstrip().split("\n\n")[-1].startswith("event: settlement") for b in bodies)
    assert ChatMessage.objects.filter(role="assistant", status="COMPLETE").count() == streams
