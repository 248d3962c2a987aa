"""The credits API: balance and ledger history, the caller's own only."""

from __future__ import annotations

from typing import Any

import pytest
from rest_framework.test import APIClient

from billing import services

pytestmark = pytest.mark.django_db
C = 1_000_000
CREDITS = "/api/v1/credits/"
LEDGER = "/api/v1/credits/ledger/"


def collect_pages(client: APIClient, url: str) -> list[list[dict[str, Any]]]:
    pages: list[list[dict[str, Any]]] = []
    next_url: str | None = url
    while next_url:
        response = client.get(next_url)
        assert response.status_code == 200
        body = response.json()
        pages.append(body["results"])
        next_url = body["next"]
        assert len(pages) < 50, "pagination does not terminate"
    return pages


# --- GET /api/v1/credits/ -------------------------------------------------------------------


def test_credits_before_any_operation_are_zero(api: APIClient) -> None:
    response = api.get(CREDITS)

    assert response.status_code == 200
    assert response.json() == {
        "balance": "0",
        "balance_micro": 0,
        "held": "0",
        "held_micro": 0,
        "available": "0",
        "available_micro": 0,
    }


def test_credits_show_balance_held_and_available(api: APIClient, user: Any) -> None:
    services.grant(user=user, amount=12_500_000, reason="welcome")
    services.hold_create(user=user, amount=2 * C, subject_type="tasks.task", subject_id="t1")

    response = api.get(CREDITS)

    assert response.status_code == 200
    assert response.json() == {
        "balance": "12.5",
        "balance_micro": 12_500_000,
        "held": "2",
        "held_micro": 2_000_000,
        "available": "10.5",
        "available_micro": 10_500_000,
    }


def test_credits_show_sub_credit_precision(api: APIClient, user: Any) -> None:
    services.grant(user=user, amount=1_000_001, reason="x")

    body = api.get(CREDITS).json()

    assert (body["balance"], body["balance_micro"]) == ("1.000001", 1_000_001)


def test_credits_are_the_callers_own(make_user: Any, api_for: Any) -> None:
    alice, bob = make_user(), make_user()
    services.grant(user=alice, amount=5 * C, reason="x")
    services.grant(user=bob, amount=9 * C, reason="x")

    assert api_for(alice).get(CREDITS).json()["balance_micro"] == 5 * C
    assert api_for(bob).get(CREDITS).json()["balance_micro"] == 9 * C


def test_credits_need_authentication() -> None:
    response = APIClient().get(CREDITS)

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "not_authenticated"


# --- GET /api/v1/credits/ledger/ ------------------------------------------------------------


def test_ledger_lists_entries_newest_first_with_what_they_were_for(
    api: APIClient, user: Any
) -> None:
    grant = services.grant(user=user, amount=10 * C, reason="welcome")
    hold = services.hold_create(
        user=user, amount=4 * C, subject_type="tasks.task", subject_id="task-42"
    )
    services.hold_capture(hold=hold, reason="image generation")

    response = api.get(LEDGER)

    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"next", "previous", "results"}
    assert body["next"] is None
    assert body["previous"] is None
    capture, granted = body["results"]
    assert capture["kind"] == "capture"
    assert (capture["amount"], capture["amount_micro"]) == ("-4", -4 * C)
    assert capture["task_id"] == "task-42"
    assert capture["chat_message_id"] is None
    assert capture["reason"] == "image generation"
    assert granted["kind"] == "grant"
    assert (granted["amount"], granted["amount_micro"]) == ("10", 10 * C)
    assert granted["task_id"] is None
    assert granted["reason"] == "welcome"
    assert granted["transaction_id"] == grant.pk
    assert granted["created_at"] <= capture["created_at"]


def test_ledger_names_chat_messages_but_not_other_subjects(api: APIClient, user: Any) -> None:
    services.grant(user=user, amount=10 * C, reason="x")
    chat = services.hold_create(user=user, amount=C, subject_type="chat.message", subject_id="m7")
    other = services.hold_create(user=user, amount=C, subject_type="other.thing", subject_id="o1")
    services.hold_capture(hold=chat)
    services.hold_capture(hold=other)

    results = api.get(LEDGER).json()["results"]

    assert [(r["task_id"], r["chat_message_id"]) for r in results] == [
        (None, None),
        (None, "m7"),
        (None, None),
    ]


def test_open_and_released_holds_are_not_ledger_entries(api: APIClient, user: Any) -> None:
    services.grant(user=user, amount=10 * C, reason="x")
    services.hold_create(user=user, amount=C, subject_type="tasks.task", subject_id="open")
    released = services.hold_create(user=user, amount=C, subject_type="tasks.task", subject_id="r")
    services.hold_release(hold=released)

    results = api.get(LEDGER).json()["results"]

    assert [r["kind"] for r in results] == ["grant"]


def test_ledger_never_shows_another_users_entries(make_user: Any, api_for: Any) -> None:
    alice, bob = make_user(), make_user()
    services.grant(user=alice, amount=10 * C, reason="alice grant")
    services.grant(user=bob, amount=3 * C, reason="bob grant")
    hold = services.hold_create(user=bob, amount=C, subject_type="tasks.task", subject_id="b1")
    services.hold_capture(hold=hold)

    alice_results = api_for(alice).get(LEDGER).json()["results"]
    bob_results = api_for(bob).get(LEDGER).json()["results"]

    assert [(r["reason"], r["amount_micro"]) for r in alice_results] == [("alice grant", 10 * C)]
    assert [(r["kind"], r["amount_micro"]) for r in bob_results] == [
        ("capture", -C),
        ("grant", 3 * C),
    ]
    # The other legs (issuance, revenue) are system accounts: no user ever sees them.
    assert all(r["amount_micro"] != -10 * C for r in alice_results + bob_results)


def test_ledger_is_empty_for_a_new_user(api: APIClient) -> None:
    assert api.get(LEDGER).json() == {"next": None, "previous": None, "results": []}


def test_ledger_pages_with_cursor_without_overlap(api: APIClient, user: Any) -> None:
    txns = [services.grant(user=user, amount=(i + 1) * C, reason=f"g{i}") for i in range(5)]

    pages = collect_pages(api, f"{LEDGER}?page_size=2")

    assert [len(page) for page in pages] == [2, 2, 1]
    seen = [r["transaction_id"] for page in pages for r in page]
    assert seen == [t.pk for t in reversed(txns)]
    assert len(set(seen)) == len(seen)


def test_ledger_previous_link_returns_to_the_first_page(api: APIClient, user: Any) -> None:
    for i in range(3):
        services.grant(user=user, amount=C, reason=f"g{i}")
    first = api.get(f"{LEDGER}?page_size=2").json()

    second = api.get(first["next"]).json()
    back = api.get(second["previous"]).json()

    assert [r["id"] for r in back["results"]] == [r["id"] for r in first["results"]]


def test_ledger_page_size_is_capped(api: APIClient, user: Any) -> None:
    services.grant(user=user, amount=C, reason="x")

    response = api.get(f"{LEDGER}?page_size=100000")

    assert response.status_code == 200
    assert len(response.json()["results"]) == 1


def test_ledger_rejects_a_forged_cursor(api: APIClient) -> None:
    response = api.get(f"{LEDGER}?cursor=not-a-cursor")

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_ledger_needs_authentication() -> None:
    response = APIClient().get(LEDGER)

    assert response.status_code == 401


def _ledger_queries(api: APIClient, capture: Any) -> int:
    with capture(10) as ctx:
        response = api.get(LEDGER)
    assert response.status_code == 200
    return len(ctx.captured_queries)


def test_ledger_query_count_does_not_grow_with_entries(
    api: APIClient, user: Any, django_assert_max_num_queries: Any
) -> None:
    services.grant(user=user, amount=C, reason="first")
    api.get(CREDITS)  # the key's first use is recorded once; keep that write out of the count
    few = _ledger_queries(api, django_assert_max_num_queries)
    for i in range(30):
        hold = services.hold_create(
            user=user, amount=C // 100, subject_type="tasks.task", subject_id=f"t{i}"
        )
        services.hold_capture(hold=hold)

    with django_assert_max_num_queries(few):
        response = api.get(LEDGER)

    assert len(response.json()["results"]) == 31
    assert few <= 3
