"""Streamed chat: the sandbox's ``POST /v1/chat/completions`` (a real subprocess) driven through
``SandboxProvider.stream_chat`` and over raw HTTP. No database.

The sandbox process is shared by the session, so stats are compared before and after.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from tasks.providers.base import (
    ChatDelta,
    ChatEnd,
    ChatRequest,
    ChatTurnMessage,
    ChatUsage,
    ProviderError,
)
from tasks.providers.sandbox import SandboxProvider
from tasks.sandbox.chat import WORDS
from tasks.tests.sandbox_process import SandboxProcess

# ---- helpers ---------------------------------------------------------------------------------


@pytest.fixture
def provider(sandbox_process: SandboxProcess) -> SandboxProvider:
    return SandboxProvider(sandbox_process.base_url, sandbox_process.secret)


def chat_request(
    params: Mapping[str, Any] | None = None,
    *,
    max_tokens: int = 1000,
    messages: tuple[tuple[str, str], ...] = (("user", "Tell me about rivers."),),
) -> ChatRequest:
    return ChatRequest(
        model="sandbox-chat",
        messages=tuple(ChatTurnMessage(role=role, content=content) for role, content in messages),
        max_tokens=max_tokens,
        params=dict(params or {}),
    )


@dataclass
class Run:
    deltas: list[str]
    end: ChatEnd | None
    error: ProviderError | None
    started: float
    arrivals: list[float]  # monotonic time of each delta
    finished: float

    @property
    def text(self) -> str:
        return "".join(self.deltas)


async def _collect(provider: SandboxProvider, request: ChatRequest) -> Run:
    run = Run([], None, None, time.monotonic(), [], 0.0)
    try:
        async for item in provider.stream_chat(request):
            assert run.end is None, "nothing may follow the ChatEnd"
            if isinstance(item, ChatDelta):
                run.deltas.append(item.text)
                run.arrivals.append(time.monotonic())
            else:
                assert isinstance(item, ChatEnd)
                run.end = item
    except ProviderError as exc:
        run.error = exc
    run.finished = time.monotonic()
    return run


def collect(provider: SandboxProvider, request: ChatRequest) -> Run:
    return asyncio.run(_collect(provider, request))


def expected_tokens(last_user_message: str, count: int) -> list[str]:
    """The documented algorithm (docs/sandbox.md), written out independently of the server."""
    seed = hashlib.sha256(last_user_message.encode()).digest()
    words = [
        WORDS[
            int.from_bytes(hashlib.sha256(seed + i.to_bytes(4, "big")).digest()[:8], "big")
            % len(WORDS)
        ]
        for i in range(count)
    ]
    return [word if i == 0 else " " + word for i, word in enumerate(words)]


def documented_input_tokens(contents: list[str]) -> int:
    return 3 + sum(4 + math.ceil(len(c.encode("utf-8")) / 4) for c in contents)


def chat_stats(sandbox: SandboxProcess) -> dict[str, int]:
    return httpx.get(f"{sandbox.base_url}/v1/chat/stats", trust_env=False).json()


def wait_for(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def post_chat(sandbox: SandboxProcess, body: Any) -> httpx.Response:
    return httpx.post(
        f"{sandbox.base_url}/v1/chat/completions", json=body, trust_env=False, timeout=10
    )


# ---- the stream, exactly ---------------------------------------------------------------------


def test_the_raw_stream_is_exact(sandbox_process: SandboxProcess) -> None:
    body = {
        "model": "sandbox-chat",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi there."},
            {"role": "user", "content": "How are you?"},
        ],
        "max_tokens": 100,
        "stream": True,
        "params": {"sandbox_reply_tokens": 5},
    }
    with httpx.stream(
        "POST", f"{sandbox_process.base_url}/v1/chat/completions", json=body, trust_env=False
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["transfer-encoding"] == "chunked"
        raw = response.read().decode()

    tokens = expected_tokens("How are you?", 5)
    # 3 + (4 + 3) + (4 + 2) + (4 + 3) + (4 + 3) = 30
    assert documented_input_tokens([m["content"] for m in body["messages"]]) == 30
    expected = "".join(
        f'data: {{"choices":[{{"delta":{{"content":{json.dumps(t)}}}}}]}}\n\n' for t in tokens
    )
    expected += (
        'data: {"choices":[{"delta":{},"finish_reason":"stop"}],'
        '"usage":{"prompt_tokens":30,"completion_tokens":5}}\n\n'
        "data: [DONE]\n\n"
    )
    assert raw == expected


def test_provider_yields_the_deltas_then_one_end_with_exact_usage(
    provider: SandboxProvider,
) -> None:
    request = chat_request()  # no knobs: the default 120-token reply
    run = collect(provider, request)

    assert run.error is None
    assert run.deltas == expected_tokens("Tell me about rivers.", 120)
    assert run.text.startswith(run.deltas[0])
    assert not run.text.startswith(" ")
    assert run.end == ChatEnd(
        usage=ChatUsage(input_tokens=3 + 4 + 6, output_tokens=120), finish_reason="stop"
    )
    # Deterministic: the same conversation gives the same reply; another gives another.
    assert collect(provider, request).deltas == run.deltas
    other = collect(provider, chat_request(messages=(("user", "Tell me about stones."),)))
    assert other.deltas != run.deltas
    assert len(other.deltas) == 120


def test_the_reply_follows_the_last_user_message_only(provider: SandboxProvider) -> None:
    params = {"sandbox_reply_tokens": 12}
    one = collect(provider, chat_request(params, messages=(("user", "a"), ("assistant", "b"))))
    two = collect(
        provider,
        chat_request(params, messages=(("system", "s"), ("user", "a"), ("assistant", "other"))),
    )
    assert one.deltas == two.deltas == expected_tokens("a", 12)
    assert one.end is not None
    assert two.end is not None
    assert one.end.usage != two.end.usage  # the input count still covers every message


@pytest.mark.parametrize(
    ("reply_tokens", "max_tokens", "streamed", "finish_reason"),
    [
        (10, 4, 4, "length"),
        (10, 1, 1, "length"),
        (10, 10, 10, "stop"),
        (10, 11, 10, "stop"),
        (0, 5, 0, "stop"),
    ],
)
def test_reply_length_and_finish_reason_follow_max_tokens(
    provider: SandboxProvider, reply_tokens: int, max_tokens: int, streamed: int, finish_reason: str
) -> None:
    run = collect(
        provider, chat_request({"sandbox_reply_tokens": reply_tokens}, max_tokens=max_tokens)
    )
    assert run.error is None
    assert run.deltas == expected_tokens("Tell me about rivers.", streamed)
    assert run.end is not None
    assert run.end.finish_reason == finish_reason
    assert run.end.usage == ChatUsage(input_tokens=13, output_tokens=streamed)


def test_input_token_count_follows_the_documented_formula(provider: SandboxProvider) -> None:
    cases: list[tuple[tuple[tuple[str, str], ...], int]] = [
        ((("user", ""),), 3 + 4 + 0),
        ((("user", "abcd"),), 3 + 4 + 1),
        ((("user", "abcde"),), 3 + 4 + 2),
        ((("user", "é"),), 3 + 4 + 1),  # 2 bytes
        ((("user", "日本語です"),), 3 + 4 + 4),  # 15 bytes
        ((("user", "🙂🙂"),), 3 + 4 + 2),  # 8 bytes
        (
            (("system", "x" * 401), ("user", "hi"), ("assistant", "yo!"), ("user", "ok")),
            123,
        ),  # 3 + (4 + 101) + 3 * (4 + 1)
    ]
    for messages, expected in cases:
        run = collect(provider, chat_request({"sandbox_reply_tokens": 1}, messages=messages))
        contents = [content for _, content in messages]
        assert expected == documented_input_tokens(contents)
        assert run.end is not None
        assert run.end.usage is not None
        assert run.end.usage.input_tokens == expected, messages
        # Rivya's own estimate (ceil(bytes / 2) + 4 per message, + 3) is never below it.
        estimate = 3 + sum(math.ceil(len(c.encode()) / 2) + 4 for c in contents)
        assert estimate >= run.end.usage.input_tokens


# ---- knobs -----------------------------------------------------------------------------------


def test_fail_ends_with_an_error_and_the_usage_so_far(
    provider: SandboxProvider, sandbox_process: SandboxProcess
) -> None:
    run = collect(provider, chat_request({"sandbox_reply_tokens": 10, "sandbox_outcome": "fail"}))
    assert run.error is None  # a reported failure ends the stream; it is not a broken one
    assert run.deltas == expected_tokens("Tell me about rivers.", 5)  # half the reply
    assert run.end is not None
    assert run.end.finish_reason == "error"
    assert run.end.usage == ChatUsage(input_tokens=13, output_tokens=5)
    assert run.end.error is not None
    assert run.end.error.code == "sandbox_failure"
    assert run.end.error.retryable

    run = collect(
        provider,
        chat_request(
            {"sandbox_reply_tokens": 10, "sandbox_outcome": "fail", "sandbox_fail_after_tokens": 3}
        ),
    )
    assert len(run.deltas) == 3
    assert run.end is not None
    assert run.end.usage == ChatUsage(input_tokens=13, output_tokens=3)

    # On the wire: the error event with usage, then the end of the body; no [DONE].
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 10,
        "stream": True,
        "params": {"sandbox_outcome": "fail", "sandbox_fail_after_tokens": 1},
    }
    with httpx.stream(
        "POST", f"{sandbox_process.base_url}/v1/chat/completions", json=body, trust_env=False
    ) as response:
        events = [e for e in response.read().decode().split("\n\n") if e]
    assert len(events) == 2
    assert json.loads(events[1].removeprefix("data: ")) == {
        "error": {
            "code": "sandbox_failure",
            "message": "The sandbox failed mid-reply (sandbox_outcome=fail).",
        },
        "usage": {"prompt_tokens": 8, "completion_tokens": 1},
    }


def test_reject_raises_before_any_delta(provider: SandboxProvider) -> None:
    run = collect(provider, chat_request({"sandbox_outcome": "reject"}))
    assert run.deltas == []
    assert run.end is None
    assert run.error is not None
    assert run.error.code == "content_policy"
    assert run.error.status == 400
    assert not run.error.retryable


def test_drop_raises_after_the_deltas(
    provider: SandboxProvider, sandbox_process: SandboxProcess
) -> None:
    before = chat_stats(sandbox_process)
    run = collect(
        provider,
        chat_request(
            {"sandbox_reply_tokens": 20, "sandbox_outcome": "drop", "sandbox_fail_after_tokens": 7}
        ),
    )
    assert run.deltas == expected_tokens("Tell me about rivers.", 7)
    assert run.end is None
    assert run.error is not None
    assert run.error.retryable
    # The sandbox cut the connection: that is not the client disconnecting.
    after = chat_stats(sandbox_process)
    assert after["chat_disconnects"] == before["chat_disconnects"]
    assert after["chat_tokens"] - before["chat_tokens"] == 7


def test_drop_by_default_cuts_at_half_the_reply(provider: SandboxProvider) -> None:
    run = collect(provider, chat_request({"sandbox_reply_tokens": 9, "sandbox_outcome": "drop"}))
    assert len(run.deltas) == 4
    assert run.error is not None
    assert run.error.retryable


def test_usage_over_reports_more_than_was_streamed(provider: SandboxProvider) -> None:
    run = collect(provider, chat_request({"sandbox_reply_tokens": 6, "sandbox_usage": "over"}))
    assert len(run.deltas) == 6
    assert run.end == ChatEnd(
        usage=ChatUsage(input_tokens=2 * 13, output_tokens=3 * 6 + 100), finish_reason="stop"
    )


def test_usage_omit_reports_none(provider: SandboxProvider) -> None:
    run = collect(provider, chat_request({"sandbox_reply_tokens": 6, "sandbox_usage": "omit"}))
    assert len(run.deltas) == 6
    assert run.end == ChatEnd(usage=None, finish_reason="stop")

    failed = collect(
        provider,
        chat_request(
            {"sandbox_reply_tokens": 6, "sandbox_usage": "omit", "sandbox_outcome": "fail"}
        ),
    )
    assert failed.end is not None
    assert failed.end.finish_reason == "error"
    assert failed.end.usage is None


def test_latency_delays_the_first_token_and_token_delay_paces_them(
    provider: SandboxProvider,
) -> None:
    run = collect(
        provider,
        chat_request(
            {
                "sandbox_latency_ms": 400,
                "sandbox_token_delay_ms": 60,
                "sandbox_reply_tokens": 6,
            }
        ),
    )
    assert len(run.deltas) == 6
    assert 0.4 <= run.arrivals[0] - run.started < 1.5
    assert run.arrivals[-1] - run.arrivals[0] >= 5 * 0.06 - 0.01
    # Tokens arrive as they are produced, not buffered until the end.
    assert run.finished - run.arrivals[0] >= 0.25
    assert run.finished - run.started >= 0.4 + 5 * 0.06


def test_four_hundred_tokens_stream_within_two_seconds(provider: SandboxProvider) -> None:
    run = collect(provider, chat_request({"sandbox_reply_tokens": 400}, max_tokens=400))
    assert len(run.deltas) == 400
    assert run.end is not None
    assert run.end.finish_reason == "stop"
    assert run.finished - run.started < 2.0


def test_the_job_knobs_are_accepted_and_ignored(provider: SandboxProvider) -> None:
    run = collect(
        provider,
        chat_request(
            {"sandbox_reply_tokens": 3, "sandbox_callback": "none", "sandbox_status": "error"}
        ),
    )
    assert len(run.deltas) == 3
    assert run.end is not None
    assert run.end.finish_reason == "stop"


def body_with(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "m",
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 5,
        "stream": True,
        "params": {},
    }
    body.update(changes)
    return body


@pytest.mark.parametrize(
    "body",
    [
        [],
        body_with(model=""),
        body_with(messages=[]),
        body_with(messages=[{"role": "tool", "content": "x"}]),
        body_with(messages=[{"role": "user", "content": 5}]),
        body_with(messages=["hello"]),
        body_with(max_tokens=0),
        body_with(max_tokens=2.5),
        body_with(max_tokens=True),
        body_with(stream="yes"),
        body_with(params=[]),
        body_with(params={"sandbox_latency_ms": -1}),
        body_with(params={"sandbox_latency_ms": 600_001}),
        body_with(params={"sandbox_token_delay_ms": 5_001}),
        body_with(params={"sandbox_reply_tokens": 8_193}),
        body_with(params={"sandbox_reply_tokens": 1.5}),
        body_with(params={"sandbox_reply_tokens": "10"}),
        body_with(params={"sandbox_reply_tokens": True}),
        body_with(params={"sandbox_fail_after_tokens": -1}),
        body_with(params={"sandbox_outcome": "partial"}),
        body_with(params={"sandbox_usage": "some"}),
    ],
)
def test_bad_bodies_are_refused_with_400(sandbox_process: SandboxProcess, body: Any) -> None:
    response = post_chat(sandbox_process, body)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_request"


def test_a_bad_body_is_a_permanent_provider_error(provider: SandboxProvider) -> None:
    run = collect(provider, chat_request({"sandbox_token_delay_ms": 10**9}))
    assert run.deltas == []
    assert run.end is None
    assert run.error is not None
    assert run.error.code == "invalid_request"
    assert not run.error.retryable


def test_lone_surrogates_are_refused(sandbox_process: SandboxProcess) -> None:
    raw = b'{"model":"m","messages":[{"role":"user","content":"\\ud800"}],"max_tokens":5}'
    response = httpx.post(
        f"{sandbox_process.base_url}/v1/chat/completions", content=raw, trust_env=False
    )
    assert response.status_code == 400


def test_stream_false_answers_one_json_completion(sandbox_process: SandboxProcess) -> None:
    response = post_chat(
        sandbox_process, body_with(stream=False, max_tokens=3, params={"sandbox_reply_tokens": 8})
    )
    assert response.status_code == 200
    answer = response.json()
    assert answer["choices"][0]["message"] == {
        "role": "assistant",
        "content": "".join(expected_tokens("x", 3)),
    }
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"] == {"prompt_tokens": 8, "completion_tokens": 3}


def test_an_http_1_0_client_gets_a_close_delimited_stream(sandbox_process: SandboxProcess) -> None:
    body = json.dumps(body_with(max_tokens=2)).encode()
    port = int(sandbox_process.base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, payload = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") or head.startswith(b"HTTP/1.0 200")
    assert b"transfer-encoding" not in head.lower()
    assert payload.decode().endswith("data: [DONE]\n\n")
    assert payload.count(b'"content"') == 2


# ---- the connection ----------------------------------------------------------------------------


def test_a_client_that_disconnects_mid_stream_is_counted(
    provider: SandboxProvider, sandbox_process: SandboxProcess
) -> None:
    before = chat_stats(sandbox_process)

    async def read_three_then_leave() -> list[str]:
        got: list[str] = []
        stream = provider.stream_chat(
            chat_request({"sandbox_token_delay_ms": 50, "sandbox_reply_tokens": 100})
        )
        async for item in stream:
            assert isinstance(item, ChatDelta)
            got.append(item.text)
            if len(got) == 3:
                break
        await stream.aclose()  # type: ignore[attr-defined]  # closes the connection
        return got

    assert len(asyncio.run(read_three_then_leave())) == 3
    wait_for(lambda: chat_stats(sandbox_process)["chat_disconnects"] > before["chat_disconnects"])
    after = chat_stats(sandbox_process)
    assert after["chat_disconnects"] == before["chat_disconnects"] + 1
    assert after["chat_streams"] == before["chat_streams"] + 1
    assert after["chat_streams_open"] == before["chat_streams_open"]
    # The stream stopped soon after the client left, far short of its 100 tokens.
    assert 3 <= after["chat_tokens"] - before["chat_tokens"] < 20


def test_a_hang_up_during_the_latency_is_noticed_at_once(sandbox_process: SandboxProcess) -> None:
    before = chat_stats(sandbox_process)
    body = body_with(params={"sandbox_latency_ms": 600_000})
    with httpx.stream(
        "POST", f"{sandbox_process.base_url}/v1/chat/completions", json=body, trust_env=False
    ) as response:
        assert response.status_code == 200
        wait_for(
            lambda: (
                chat_stats(sandbox_process)["chat_streams_open"] == before["chat_streams_open"] + 1
            )
        )
    # Well before the ten minutes: the waiting stream saw the connection close.
    wait_for(lambda: chat_stats(sandbox_process)["chat_disconnects"] > before["chat_disconnects"])
    after = chat_stats(sandbox_process)
    assert after["chat_streams_open"] == before["chat_streams_open"]
    assert after["chat_tokens"] == before["chat_tokens"]


def test_a_read_timeout_between_tokens_raises_retryable(sandbox_process: SandboxProcess) -> None:
    provider = SandboxProvider(
        sandbox_process.base_url, sandbox_process.secret, chat_read_timeout_s=0.3
    )
    run = collect(
        provider, chat_request({"sandbox_token_delay_ms": 2_000, "sandbox_reply_tokens": 5})
    )
    assert len(run.deltas) == 1
    assert run.end is None
    assert run.error is not None
    assert run.error.retryable
    assert "ReadTimeout" in run.error.message
    assert run.finished - run.started < 1.5


def test_two_hundred_fifty_concurrent_streams(
    provider: SandboxProvider, sandbox_process: SandboxProcess
) -> None:
    before = chat_stats(sandbox_process)
    seen_open: list[int] = []

    async def main() -> list[Run]:
        runs = [
            asyncio.create_task(
                _collect(
                    provider,
                    chat_request(
                        {"sandbox_latency_ms": 3_000, "sandbox_reply_tokens": 5},
                        messages=(("user", f"question {n}"),),
                    ),
                )
            )
            for n in range(250)
        ]
        # Every stream waits 3 s before its first token: all 250 must be open at once.
        deadline = time.monotonic() + 2.5
        async with httpx.AsyncClient(trust_env=False) as client:
            while time.monotonic() < deadline:
                stats = (await client.get(f"{sandbox_process.base_url}/v1/chat/stats")).json()
                seen_open.append(stats["chat_streams_open"] - before["chat_streams_open"])
                if seen_open[-1] == 250:
                    break
                await asyncio.sleep(0.05)
        return await asyncio.gather(*runs)

    runs = asyncio.run(main())
    assert max(seen_open) == 250
    for n, run in enumerate(runs):
        assert run.error is None
        assert run.deltas == expected_tokens(f"question {n}", 5)
        assert run.end is not None
        assert run.end.usage is not None
    after = chat_stats(sandbox_process)
    assert after["chat_streams"] - before["chat_streams"] == 250
    assert after["chat_streams_open"] == before["chat_streams_open"]


# ---- an upstream misbehaving (a local fake: the sandbox never does this) ---------------------


@pytest.fixture
def fake_upstream() -> Iterator[Callable[[bytes], str]]:
    """A server answering every POST with a 200 event stream of the given bytes, then closing."""
    payload: list[bytes] = [b""]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 -- stdlib naming
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(payload[0])

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()

    def serve(data: bytes) -> str:
        payload[0] = data
        return f"http://127.0.0.1:{server.server_address[1]}"

    try:
        yield serve
    finally:
        server.shutdown()
        server.server_close()


def fake_provider(url: str, sandbox_process: SandboxProcess) -> SandboxProvider:
    return SandboxProvider(url, sandbox_process.secret)


def test_an_unreadable_event_raises_after_the_deltas(
    fake_upstream: Callable[[bytes], str], sandbox_process: SandboxProcess
) -> None:
    url = fake_upstream(
        b'data: {"choices":[{"delta":{"content":"one"}}]}\n\ndata: {not json\n\n'
        b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
    )
    run = collect(fake_provider(url, sandbox_process), chat_request())
    assert run.deltas == ["one"]
    assert run.end is None
    assert run.error is not None
    assert run.error.code == "upstream_bad_response"
    assert run.error.retryable


def test_a_stream_without_its_final_event_raises(
    fake_upstream: Callable[[bytes], str], sandbox_process: SandboxProcess
) -> None:
    url = fake_upstream(b'data: {"choices":[{"delta":{"content":"one"}}]}\n\n')
    run = collect(fake_provider(url, sandbox_process), chat_request())
    assert run.deltas == ["one"]
    assert run.error is not None
    assert run.error.code == "upstream_stream_incomplete"
    assert run.error.retryable


def test_a_complete_reply_needs_no_done_marker(
    fake_upstream: Callable[[bytes], str], sandbox_process: SandboxProcess
) -> None:
    url = fake_upstream(
        b': a comment\n\ndata: {"choices":[{"delta":{"content":"a\\nb"}}]}\n\n'
        b'data: {"choices":[{"delta":{},"finish_reason":"length"}],'
        b'"usage":{"prompt_tokens":1,"completion_tokens":1}}\n\n'
    )
    run = collect(fake_provider(url, sandbox_process), chat_request())
    assert run.error is None
    assert run.deltas == ["a\nb"]
    assert run.end == ChatEnd(usage=ChatUsage(1, 1), finish_reason="length")
