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
    balance = balance_for_user(user=user)
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

    # The server's API threads keep their connections (CONN_MAX_AGE): count them first.
    baseline = _connections_to_this_database()
    held, bodies = asyncio.run(run())

    # None for the waiting streams (another request of the test may be closing one).
    assert held - baseline <= 1, f"{held} connections (before: {baseline}) while {streams} wait"
    assert all(b.rstrip().split("\n\n")[-1].startswith("event: settlement") for b in bodies)
    assert ChatMessage.objects.filter(role="assistant", status="COMPLETE").count() == streams


def test_clients_that_leave_right_after_sending_never_leave_a_turn_unsettled(
    asgi_server: str, chatter: Any
) -> None:
    import json
    import socket
    from urllib.parse import urlsplit

    user, _ = chatter()
    session = new_session(asgi_server, user)
    url = urlsplit(asgi_server)
    auth = bearer(user)["Authorization"]
    # Hang up at once, or while the turn is being recorded, or as its answer starts: whatever
    # the moment, a recorded turn runs and settles now, not when the beat's sweep finds it.
    for n, delay in enumerate((0, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15)):
        body = json.dumps({"content": f"Gone {n}", "max_tokens": 30}).encode()
        request = (
            f"POST /api/v1/chat/sessions/{session}/messages/ HTTP/1.1\r\n"
            f"Host: {url.netloc}\r\nAuthorization: {auth}\r\n"
            "Accept: text/event-stream\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        with socket.create_connection((url.hostname, url.port)) as sock:
            sock.sendall(request)
            time.sleep(delay)  # then hang up without reading a byte

    def all_settled() -> bool:
        turns = ChatMessage.objects.filter(user=user, role="assistant")
        return turns.exists() and not turns.filter(status="STREAMING").exists()

    wait_until(all_settled, timeout=10, what="every recorded turn to settle")
    time.sleep(0.5)  # a request still being recorded would show up now
    assert all_settled()
    for message in ChatMessage.objects.filter(user=user, role="assistant"):
        assert message.status == ChatMessage.Status.COMPLETE
        assert message.output_tokens == 30
    assert balance_for_user(user=user).held == 0


def test_a_json_client_that_leaves_mid_turn_is_settled_in_full(
    asgi_server: str, chatter: Any
) -> None:
    user, _ = chatter()
    session = new_session(asgi_server, user)
    body = {
        "content": "JSON and away",
        "max_tokens": 80,
        "params": {"sandbox_reply_tokens": 80, "sandbox_token_delay_ms": 20},
    }

    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{asgi_server}/api/v1/chat/sessions/{session}/messages/",
            json=body,
            headers=bearer(user),
            trust_env=False,
            timeout=httpx.Timeout(10, read=0.5),  # gives up well before the reply ends
        )

    wait_until(
        lambda: (
            ChatMessage.objects.filter(user=user, role="assistant")
            .exclude(status="STREAMING")
            .exists()
        ),
        timeout=8,
        what="the turn of a JSON client that left to settle",
    )
    message = ChatMessage.objects.get(user=user, role="assistant")
    assert message.status == ChatMessage.Status.COMPLETE
    assert message.output_tokens == 80
    assert len(message.content.split()) == 80
    assert message.client_gone_at is not None


def test_one_idempotency_key_raced_by_many_requests_is_one_turn(
    asgi_server: str, chatter: Any, sandbox: Any
) -> None:
    user, _ = chatter()
    session = new_session(asgi_server, user)
    headers = {**bearer(user), "Idempotency-Key": "race-1"}
    before = chat_stats(sandbox)["chat_requests"]
    body = {
        "content": "Only once",
        "max_tokens": 40,
        "params": {"sandbox_reply_tokens": 40, "sandbox_token_delay_ms": 10},
    }

    async def race() -> list[httpx.Response]:
        async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        f"{asgi_server}/api/v1/chat/sessions/{session}/messages/",
                        json=body,
                        headers=headers,
                    )
                    for _ in range(8)
                )
            )

    answers = asyncio.run(race())

    statuses = [r.status_code for r in answers]
    assert statuses.count(201) >= 1
    assert set(statuses) <= {201, 409}
    for busy in (r for r in answers if r.status_code == 409):
        assert busy.json()["error"]["code"] == "idempotency_in_progress"
    ids = {r.json()["id"] for r in answers if r.status_code == 201}
    assert len(ids) == 1
    assert chat_stats(sandbox)["chat_requests"] == before + 1
    assert ChatMessage.objects.filter(user=user, role="assistant").count() == 1
    message = ChatMessage.objects.get(user=user, role="assistant")
    assert balance_for_user(user=user).balance == 10 * C - message.charged_micro

    # Once settled, the same key replays the settled turn; it never runs again.
    again = httpx.post(
        f"{asgi_server}/api/v1/chat/sessions/{session}/messages/",
        json=body,
        headers=headers,
        trust_env=False,
    )
    assert again.status_code == 201
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] in ids
    assert chat_stats(sandbox)["chat_requests"] == before + 1


def test_the_same_key_while_its_turn_streams_is_409(asgi_server: str, chatter: Any) -> None:
    user, _ = chatter()
    session = new_session(asgi_server, user)
    url = f"{asgi_server}/api/v1/chat/sessions/{session}/messages/"
    body = {
        "content": "Still going",
        "max_tokens": 60,
        "params": {"sandbox_reply_tokens": 60, "sandbox_token_delay_ms": 30},
    }
    headers = {**sse_headers(user), "Idempotency-Key": "busy-1"}

    with (
        httpx.Client(trust_env=False, timeout=30) as client,
        client.stream("POST", url, json=body, headers=headers) as first,
    ):
        lines = first.iter_lines()
        assert next(lines) == "event: message"  # the turn is recorded and streaming
        busy = httpx.post(url, json=body, headers=headers, trust_env=False)
        rest = "\n".join(lines)

    assert busy.status_code == 409
    assert busy.json()["error"]["code"] == "idempotency_in_progress"
    assert "event: settlement" in rest
    assert ChatMessage.objects.filter(user=user, role="assistant").count() == 1


def test_a_graceful_shutdown_lets_a_turn_whose_client_left_finish(
    asgi_env: dict[str, str], chatter: Any, sandbox: Any
) -> None:
    import signal
    from pathlib import Path

    from tests.asgi_process import start_asgi

    base, server = start_asgi(asgi_env, log=Path("var") / "asgi-shutdown.log")
    try:
        user, _ = chatter()
        session = new_session(base, user)
        body = {
            "content": "Long story",
            "max_tokens": 400,
            "params": {"sandbox_reply_tokens": 400, "sandbox_token_delay_ms": 25},
        }
        with (
            httpx.Client(trust_env=False, timeout=30) as client,
            client.stream(
                "POST",
                f"{base}/api/v1/chat/sessions/{session}/messages/",
                json=body,
                headers=sse_headers(user),
            ) as response,
        ):
            deltas = 0
            for line in response.iter_lines():
                deltas += line == "event: delta"
                if deltas == 20:
                    break  # the client leaves; the turn reads on in the server
        message = ChatMessage.objects.get(user=user, role="assistant")
        assert message.status == ChatMessage.Status.STREAMING
        server.send_signal(signal.SIGTERM)  # a restart, ~9 s before the reply would end
        server.wait(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()

    # The graceful shutdown waited for the turn: it read to the end and settled.
    message.refresh_from_db()
    assert message.status == ChatMessage.Status.COMPLETE
    assert message.output_tokens == 400
    assert len(message.content.split()) == 400
    assert message.client_gone_at is not None
    assert message.charged_micro == turn_cost(
        input_tokens=message.input_tokens,
        output_tokens=400,
        input_price_micro=IN,
        output_price_micro=OUT,
    )
    assert balance_for_user(user=user).held == 0


def test_a_burst_of_turns_waits_for_connections_instead_of_failing(
    asgi_server: str, chatter: Any, settings: Any
) -> None:
    import os
    import threading

    user, _ = chatter()
    session = new_session(asgi_server, user)
    headers = bearer(user)
    burst = 40
    baseline = _connections_to_this_database()
    peak = [baseline]
    done = threading.Event()

    def sample() -> None:
        try:
            while not done.is_set():
                peak[0] = max(peak[0], _connections_to_this_database())
                time.sleep(0.01)
        finally:
            connection.close()

    async def race() -> list[httpx.Response]:
        async with httpx.AsyncClient(trust_env=False, timeout=60) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        f"{asgi_server}/api/v1/chat/sessions/{session}/messages/",
                        json={"content": f"Burst {n}", "max_tokens": 20},
                        headers=headers,
                    )
                    for n in range(burst)
                )
            )

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        answers = asyncio.run(race())
    finally:
        done.set()
        sampler.join()

    assert [r.status_code for r in answers] == [201] * burst
    assert ChatMessage.objects.filter(user=user, role="assistant", status="COMPLETE").count() == (
        burst
    )
    # Turns being recorded (CHAT_START_CONCURRENCY) and settling (asyncio's default executor)
    # hold a connection each, at most; the burst itself does not open one per turn.
    settling = min(32, (os.cpu_count() or 1) + 4)
    bound = baseline + settings.CHAT_START_CONCURRENCY + settling + 2
    assert peak[0] <= bound, f"{peak[0]} connections at the peak (bound {bound})"
