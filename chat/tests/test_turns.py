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


def test_a_failure_mid_stream_settles_the_usage_it_reports(
    chatter: Any, open_session: Any, stream: Any
) -> None:
    user, client = chatter()
    session = open_session(client)

    events = stream(
        client,
        session,
        "Fail halfway",
        max_tokens=100,
        params={"sandbox_outcome": "fail", "sandbox_fail_after_tokens": 30},
    )

    settled = events[-1][1]
    assert events[-1][0] == "settlement"
    assert sum(1 for name, _ in events if name == "delta") == 30
    assert settled["status"] == "FAILED"
    assert settled["error"]["code"] == "sandbox_failure"
    assert settled["error"]["kind"] == "provider"
    assert settled["usage"]["output_tokens"] == 30
    assert settled["usage"]["reported"] is True
    charged = turn_cost(
        input_tokens=settled["usage"]["input_tokens"],
        output_tokens=30,
        input_price_micro=IN,
        output_price_micro=OUT,
    )
    assert settled["credits"]["charged_micro"] == charged
    assert settled["credits"]["refunded_micro"] == settled["credits"]["reserved_micro"] - charged
    assert len(settled["content"].split()) == 30  # the partial reply is kept


def test_a_refusal_before_streaming_charges_nothing(
    chatter: Any, open_session: Any, say: Any
) -> None:
    user, client = chatter()
    session = open_session(client)

    status, body = say(client, session, "Refuse me", params={"sandbox_outcome": "reject"})

    assert status == 201
    assert body["status"] == "FAILED"
    assert body["error"]["code"] == "content_policy"
    assert body["error"]["kind"] == "user"
    assert body["credits"]["charged_micro"] == 0
    assert body["credits"]["refunded_micro"] == body["credits"]["reserved_micro"] > 0
    assert balance_for_user(user=user).balance == 10 * C
    hold = Hold.objects.get(subject_type="chat.message", subject_id=body["id"])
    assert hold.status == "released"


def test_a_broken_stream_without_usage_is_counted_locally(
    chatter: Any, open_session: Any, say: Any
) -> None:
    user, client = chatter()
    session = open_session(client)

    status, body = say(
        client,
        session,
        "Drop the line",
        max_tokens=100,
        params={"sandbox_outcome": "drop", "sandbox_fail_after_tokens": 40},
    )

    assert body["status"] == "FAILED"
    assert body["error"]["code"] == "upstream_unreachable"  # the connection broke
    assert body["error"]["kind"] == "provider"
    assert body["usage"]["reported"] is False
    assert body["usage"]["output_tokens"] == 40  # the tokens that were streamed
    assert body["usage"]["input_tokens"] == tokens.request_tokens(["Drop the line"])
    charged = turn_cost(
        input_tokens=body["usage"]["input_tokens"],
        output_tokens=40,
        input_price_micro=IN,
        output_price_micro=OUT,
    )
    assert body["credits"]["charged_micro"] == charged > 0  # delivered text never costs 0
    assert body["credits"]["refunded_micro"] == body["credits"]["reserved_micro"] - charged


def test_no_usage_report_is_counted_locally(chatter: Any, open_session: Any, say: Any) -> None:
    user, client = chatter()
    session = open_session(client)

    status, body = say(
        client, session, "No usage", max_tokens=100, params={"sandbox_usage": "omit"}
    )

    assert body["status"] == "COMPLETE"
    assert body["usage"]["reported"] is False
    assert body["usage"]["output_tokens"] == 100
    assert body["usage"]["input_tokens"] == body["usage"]["input_tokens_estimate"]
    assert "counted by Rivya" in " ".join(body["notices"])
    expected = turn_cost(
        input_tokens=body["usage"]["input_tokens"],
        output_tokens=100,
        input_price_micro=IN,
        output_price_micro=OUT,
    )
    assert body["credits"]["charged_micro"] == expected
    # The estimate held exactly this: input estimate + max_tokens at the output price.
    assert body["credits"]["refunded_micro"] == 0


def test_max_tokens_is_lowered_to_what_the_balance_affords(
    chatter: Any, open_session: Any, say: Any
) -> None:
    content = "Short"
    input_cost = tokens.request_tokens([content]) * IN
    user, client = chatter(credits_micro=input_cost + 50 * OUT + 7)
    session = open_session(client)

    status, body = say(client, session, content, max_tokens=1000)

    assert status == 201
    assert body["max_tokens_requested"] == 1000
    assert body["max_tokens"] == 50
    assert body["credits"]["reserved_micro"] == input_cost + 50 * OUT
    assert any("lowered from 1000 to 50" in n for n in body["notices"])
    assert body["usage"]["output_tokens"] == 50
    assert body["finish_reason"] == "length"
    assert balance_for_user(user=user).available >= 0


def test_one_token_short_is_402(chatter: Any, open_session: Any, say: Any) -> None:
    content = "Short"
    user, client = chatter(credits_micro=tokens.request_tokens([content]) * IN + OUT - 1)
    session = open_session(client)

    status, body = say(client, session, content)

    assert status == 402
    assert body["error"]["code"] == "insufficient_credits"
    assert not ChatMessage.objects.exists()


def test_a_replayed_idempotency_key_is_billed_once(
    chatter: Any, open_session: Any, say: Any, read_response: Any, events_of: Any, sandbox: Any
) -> None:
    user, client = chatter()
    session = open_session(client)
    key = {"HTTP_IDEMPOTENCY_KEY": "turn-1"}
    before = chat_stats(sandbox)["chat_requests"]

    first_status, first = say(client, session, "Once", max_tokens=20, headers=key)
    again_status, again = say(client, session, "Once", max_tokens=20, headers=key)
    response = client.post(
        f"/api/v1/chat/sessions/{session}/messages/",
        {"content": "Once", "max_tokens": 20},
        format="json",
        HTTP_ACCEPT="text/event-stream",
        **key,
    )
    events = events_of(read_response(response))

    assert (first_status, again_status) == (201, 201)
    assert again == first
    assert response["Idempotent-Replayed"] == "true"
    assert events[-1] == ("settlement", first)
    assert "".join(d["text"] for name, d in events if name == "delta") == first["content"]
    assert chat_stats(sandbox)["chat_requests"] == before + 1
    assert ChatMessage.objects.filter(role="assistant").count() == 1
    assert balance_for_user(user=user).balance == 10 * C - first["credits"]["charged_micro"]

    status, body = say(client, session, "Different", headers=key)
    assert status == 422
    assert body["error"]["code"] == "idempotency_key_reused"


def test_credit_history_names_the_chat_message(chatter: Any, open_session: Any, say: Any) -> None:
    user, client = chatter()
    session = open_session(client)
    status, body = say(client, session, "Bill me", max_tokens=10)

    entries = client.get("/api/v1/credits/ledger/").json()["results"]

    capture = next(e for e in entries if e["kind"] == "capture")
    assert capture["chat_message_id"] == body["id"]
    assert capture["task_id"] is None
    assert capture["amount_micro"] == -body["credits"]["charged_micro"]


def test_ledger_check_prints_uncollected_usage_and_passes(
    chatter: Any, open_session: Any, say: Any, capsys: Any
) -> None:
    from django.core.management import call_command

    user, client = chatter()
    session = open_session(client)
    status, body = say(client, session, "Over", max_tokens=10, params={"sandbox_usage": "over"})

    call_command("ledger_check")  # exit 0: uncollected usage is not a breach

    out = capsys.readouterr().out
    assert f"NOTE chat_uncollected: chat message {body['id']}" in out
    assert "all 19 checks pass" in out


def test_an_omitted_max_tokens_lowered_to_the_balance_says_so(
    chatter: Any, open_session: Any, say: Any
) -> None:
    content = "Short"
    user, client = chatter(credits_micro=tokens.request_tokens([content]) * IN + 50 * OUT)
    session = open_session(client)

    status, body = say(client, session, content)

    assert body["max_tokens"] == 50
    assert body["max_tokens_requested"] == 2048  # the model's maximum, asked by default
    assert any("lowered from 2048 to 50" in n for n in body["notices"])


def test_a_bad_idempotency_key_is_400(chatter: Any, open_session: Any, say: Any) -> None:
    user, client = chatter()
    session = open_session(client)

    for key in ("k" * 256, "tab\tkey"):
        status, body = say(client, session, "Hi", headers={"HTTP_IDEMPOTENCY_KEY": key})
        assert status == 400
        assert body["error"]["code"] == "invalid_idempotency_key"
    assert not ChatMessage.objects.exists()
