"""Chat turns against the real sandbox process: reserve, stream, settle (docs/chat.md)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from billing.invariants import run_checks, run_reports
from billing.models import Hold
from billing.selectors import balance_for_user
from chat import tokens
from chat.models import ChatMessage
from chat.services import turn_cost

C = 1_000_000
IN, OUT = 10, 30  # sandbox-chat's prices per input / output token (tasks/catalog.py)

pytestmark = pytest.mark.usefixtures("chat_catalog", "ledger_ok")


def chat_stats(sandbox: Any) -> dict[str, int]:
    return httpx.get(f"{sandbox.base_url}/v1/chat/stats", trust_env=False).json()


def sandbox_input_tokens(*contents: str) -> int:
    """The sandbox's own count (docs/sandbox.md): 3 + Σ(4 + ⌈bytes/4⌉)."""
    return 3 + sum(4 + -(-len(c.encode()) // 4) for c in contents)


def test_a_turn_bills_the_reported_usage_and_releases_the_rest(
    chatter: Any, open_session: Any, say: Any
) -> None:
    user, client = chatter()
    session = open_session(client)

    status, body = say(client, session, "Tell me about rivers", max_tokens=200)

    assert status == 201
    assert body["status"] == "COMPLETE"
    assert body["role"] == "assistant"
    assert body["usage"] == {
        "input_tokens": sandbox_input_tokens("Tell me about rivers"),
        "output_tokens": 120,  # the sandbox's default reply length
        "input_tokens_estimate": tokens.request_tokens(["Tell me about rivers"]),
        "reported": True,
    }
    assert body["finish_reason"] == "stop"
    assert len(body["content"].split()) == 120
    credits = body["credits"]
    reserved = tokens.request_tokens(["Tell me about rivers"]) * IN + 200 * OUT
    charged = turn_cost(
        input_tokens=body["usage"]["input_tokens"],
        output_tokens=120,
        input_price_micro=IN,
        output_price_micro=OUT,
    )
    assert credits["reserved_micro"] == reserved
    assert credits["charged_micro"] == charged
    assert credits["refunded_micro"] == reserved - charged
    assert credits["uncollected_micro"] == 0
    balance = balance_for_user(user=user)
    assert (balance.balance, balance.held) == (10 * C - charged, 0)
    hold = Hold.objects.get(subject_type="chat.message", subject_id=body["id"])
    assert (hold.status, hold.amount, hold.captured) == ("captured", reserved, charged)


def test_the_stream_ends_with_the_settlement(chatter: Any, open_session: Any, stream: Any) -> None:
    user, client = chatter()
    session = open_session(client)

    events = stream(client, session, "Stream please", max_tokens=50)

    names = [name for name, _ in events]
    assert names[0] == "message"
    assert names[-1] == "settlement"
    assert set(names[1:-1]) == {"delta"}
    assert len(names) == 52
    started, settled = events[0][1], events[-1][1]
    assert started["status"] == "STREAMING"
    assert started["content"] == ""
    assert settled["id"] == started["id"]
    assert settled["content"] == "".join(data["text"] for name, data in events if name == "delta")
    assert settled["finish_reason"] == "length"
    assert (
        settled["credits"]["charged_micro"] + settled["credits"]["refunded_micro"]
        == (settled["credits"]["reserved_micro"])
    )
    assert ChatMessage.objects.get(pk=settled["id"]).content == settled["content"]


def test_zero_balance_is_402_before_any_provider_call(
    chatter: Any, open_session: Any, say: Any, sandbox: Any
) -> None:
    user, client = chatter(credits_micro=0)
    session = open_session(client)
    before = chat_stats(sandbox)["chat_requests"]

    status, body = say(client, session, "Hello")

    assert status == 402
    assert body["error"]["code"] == "insufficient_credits"
    assert chat_stats(sandbox)["chat_requests"] == before
    assert not ChatMessage.objects.filter(user=user).exists()
    assert not Hold.objects.exists()


def test_over_reported_usage_is_capped_at_the_hold_and_reported(
    chatter: Any, open_session: Any, say: Any
) -> None:
    user, client = chatter()
    session = open_session(client)

    status, body = say(client, session, "Count", max_tokens=100, params={"sandbox_usage": "over"})

    credits = body["credits"]
    assert body["status"] == "COMPLETE"
    assert credits["charged_micro"] == credits["reserved_micro"]  # capped: captured <= reserved
    assert credits["refunded_micro"] == 0
    billed = turn_cost(
        input_tokens=body["usage"]["input_tokens"],
        output_tokens=body["usage"]["output_tokens"],
        input_price_micro=IN,
        output_price_micro=OUT,
    )
    assert credits["uncollected_micro"] == billed - credits["reserved_micro"] > 0
    assert run_checks() == []
    notes = run_reports()
    assert [n.check for n in notes] == ["chat_uncollected"]
    assert body["id"] in notes[0].detail
    assert balance_for_user(user=user).balance == 10 * C - credits["reserved_micro"]
