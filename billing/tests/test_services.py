"""Ledger services: each operation's contract, its replays and its refusals."""

from __future__ import annotations

from typing import Any

import pytest

from billing import selectors, services
from billing.models import Account, Entry, Hold, LedgerTransaction
from billing.tests.helpers import assert_ledger_ok
from rivya.errors import (
    HoldAlreadyResolved,
    IdempotencyKeyReused,
    InsufficientCredits,
    InvalidAmount,
    NotReversible,
    ReasonRequired,
)

pytestmark = pytest.mark.django_db
C = 1_000_000  # one credit in micro-credits


def bal(user: Any) -> tuple[int, int, int]:
    b = selectors.balance_for_user(user=user)
    return b.balance, b.held, b.available


def test_grant_credits_the_user_and_debits_issuance(user: Any) -> None:
    txn = services.grant(user=user, amount=25 * C, reason="welcome")

    assert bal(user) == (25 * C, 0, 25 * C)
    assert sorted(txn.entries.values_list("amount", flat=True)) == [-25 * C, 25 * C]
    assert selectors.system_balance(kind=Account.Kind.ISSUANCE) == -25 * C
    assert_ledger_ok()


def test_grant_replay_returns_first_result_and_changes_nothing(user: Any) -> None:
    first = services.grant(user=user, amount=5 * C, reason="promo", idempotency_key="k1")
    again = services.grant(user=user, amount=5 * C, reason="promo", idempotency_key="k1")

    assert again.pk == first.pk
    assert bal(user) == (5 * C, 0, 5 * C)
    assert LedgerTransaction.objects.count() == 1


def test_same_key_different_arguments_is_refused(user: Any) -> None:
    services.grant(user=user, amount=5 * C, reason="promo", idempotency_key="k1")

    with pytest.raises(IdempotencyKeyReused):
        services.grant(user=user, amount=6 * C, reason="promo", idempotency_key="k1")
    assert bal(user)[0] == 5 * C


def test_keys_are_scoped_per_user(make_user: Any) -> None:
    a, b = make_user(), make_user()
    services.grant(user=a, amount=C, reason="x", idempotency_key="same")
    services.grant(user=b, amount=2 * C, reason="x", idempotency_key="same")

    assert bal(a)[0] == C
    assert bal(b)[0] == 2 * C


@pytest.mark.parametrize("amount", [0, -1, 1.5, "3", None, True, 10**16])
def test_grant_refuses_bad_amounts(user: Any, amount: Any) -> None:
    with pytest.raises(InvalidAmount):
        services.grant(user=user, amount=amount, reason="x")
    assert LedgerTransaction.objects.count() == 0


def test_grant_requires_a_reason(user: Any) -> None:
    with pytest.raises(ReasonRequired):
        services.grant(user=user, amount=C, reason="   ")


def test_hold_reserves_available_credits(user: Any) -> None:
    services.grant(user=user, amount=10 * C, reason="x")

    hold = services.hold_create(user=user, amount=4 * C, subject_type="tasks.task", subject_id="t1")

    assert hold.status == Hold.Status.OPEN
    assert bal(user) == (10 * C, 4 * C, 6 * C)
    assert_ledger_ok()


def test_hold_beyond_available_is_refused_and_reserves_nothing(user: Any) -> None:
    services.grant(user=user, amount=3 * C, reason="x")
    services.hold_create(user=user, amount=2 * C, subject_type="t", subject_id="a")

    with pytest.raises(InsufficientCredits) as info:
        services.hold_create(user=user, amount=2 * C, subject_type="t", subject_id="b")

    assert info.value.extra["available_micro"] == C
    assert bal(user) == (3 * C, 2 * C, C)
    assert Hold.objects.count() == 1


def test_one_hold_per_subject_replay_returns_it(user: Any) -> None:
    services.grant(user=user, amount=10 * C, reason="x")
    first = services.hold_create(user=user, amount=2 * C, subject_type="t", subject_id="a")
    again = services.hold_create(user=user, amount=2 * C, subject_type="t", subject_id="a")

    assert again.pk == first.pk
    assert bal(user)[1] == 2 * C
    with pytest.raises(IdempotencyKeyReused):
        services.hold_create(user=user, amount=3 * C, subject_type="t", subject_id="a")


def test_full_capture_charges_the_held_amount(user: Any) -> None:
    services.grant(user=user, amount=10 * C, reason="x")
    hold = services.hold_create(user=user, amount=4 * C, subject_type="t", subject_id="a")

    hold = services.hold_capture(hold=hold)

    assert (hold.status, hold.captured) == (Hold.Status.CAPTURED, 4 * C)
    assert bal(user) == (6 * C, 0, 6 * C)
    assert selectors.system_balance(kind=Account.Kind.REVENUE) == 4 * C
    assert_ledger_ok()


def test_partial_capture_releases_the_rest(user: Any) -> None:
    services.grant(user=user, amount=10 * C, reason="x")
    hold = services.hold_create(user=user, amount=4 * C, subject_type="t", subject_id="a")

    services.hold_capture(hold=hold, amount=C)

    assert bal(user) == (9 * C, 0, 9 * C)
    assert_ledger_ok()


def test_capture_replay_is_harmless_but_a_different_capture_is_refused(user: Any) -> None:
    services.grant(user=user, amount=10 * C, reason="x")
    hold = services.hold_create(user=user, amount=4 * C, subject_type="t", subject_id="a")
    services.hold_capture(hold=hold, amount=C)

    services.hold_capture(hold=hold, amount=C)
    with pytest.raises(HoldAlreadyResolved):
        services.hold_capture(hold=hold, amount=2 * C)
    with pytest.raises(HoldAlreadyResolved):
        services.hold_release(hold=hold)

    assert bal(user) == (9 * C, 0, 9 * C)
    assert LedgerTransaction.objects.filter(kind="capture").count() == 1


def test_capture_more_than_held_is_refused(user: Any) -> None:
    services.grant(user=user, amount=10 * C, reason="x")
    hold = services.hold_create(user=user, amount=4 * C, subject_type="t", subject_id="a")

    with pytest.raises(InvalidAmount):
        services.hold_capture(hold=hold, amount=5 * C)
    assert Hold.objects.get(pk=hold.pk).status == Hold.Status.OPEN


def test_capture_of_zero_is_a_release(user: Any) -> None:
    services.grant(user=user, amount=10 * C, reason="x")
    hold = services.hold_create(user=user, amount=4 * C, subject_type="t", subject_id="a")

    hold = services.hold_capture(hold=hold, amount=0)

    assert hold.status == Hold.Status.RELEASED
    assert bal(user) == (10 * C, 0, 10 * C)


def test_release_returns_the_hold_once(user: Any) -> None:
    services.grant(user=user, amount=10 * C, reason="x")
    hold = services.hold_create(user=user, amount=4 * C, subject_type="t", subject_id="a")

    services.hold_release(hold=hold)
    services.hold_release(hold=hold)

    assert bal(user) == (10 * C, 0, 10 * C)
    with pytest.raises(HoldAlreadyResolved):
        services.hold_capture(hold=hold)
    assert_ledger_ok()


def test_adjust_positive_and_negative_with_actor_and_reason(user: Any, staff: Any) -> None:
    services.grant(user=user, amount=10 * C, reason="x")

    services.adjust(user=user, amount=2 * C, actor=staff, reason="goodwill")
    services.adjust(user=user, amount=-5 * C, actor=staff, reason="chargeback")

    assert bal(user)[0] == 7 * C
    adj = LedgerTransaction.objects.filter(kind="adjustment")
    assert {(t.actor_id, t.reason) for t in adj} == {
        (staff.pk, "goodwill"),
        (staff.pk, "chargeback"),
    }
    assert_ledger_ok()


def test_adjust_never_overdraws_available(user: Any, staff: Any) -> None:
    services.grant(user=user, amount=10 * C, reason="x")
    services.hold_create(user=user, amount=8 * C, subject_type="t", subject_id="a")

    with pytest.raises(InsufficientCredits):
        services.adjust(user=user, amount=-3 * C, actor=staff, reason="too much")
    services.adjust(user=user, amount=-2 * C, actor=staff, reason="exactly available")

    assert bal(user) == (8 * C, 8 * C, 0)


def test_adjust_requires_reason_and_actor(user: Any, staff: Any) -> None:
    with pytest.raises(ReasonRequired):
        services.adjust(user=user, amount=C, actor=staff, reason="")
    with pytest.raises(InvalidAmount):
        services.adjust(user=user, amount=C, actor=None, reason="why")
    with pytest.raises(InvalidAmount):
        services.adjust(user=user, amount=0, actor=staff, reason="why")


def test_reverse_a_grant_once(user: Any, staff: Any) -> None:
    txn = services.grant(user=user, amount=10 * C, reason="mistake")

    services.reverse(txn=txn, actor=staff, reason="granted by mistake")

    assert bal(user)[0] == 0
    with pytest.raises(NotReversible):
        services.reverse(txn=txn, actor=staff, reason="again")
    assert_ledger_ok()


def test_reverse_a_capture_refunds_the_user(user: Any, staff: Any) -> None:
    services.grant(user=user, amount=10 * C, reason="x")
    hold = services.hold_create(user=user, amount=4 * C, subject_type="t", subject_id="a")
    services.hold_capture(hold=hold)
    capture = LedgerTransaction.objects.get(kind="capture")

    rev = services.reverse(txn=capture, actor=staff, reason="bad output")

    assert bal(user)[0] == 10 * C
    assert rev.subject_id == "a"
    assert_ledger_ok()


def test_reverse_refuses_taking_back_spent_credits(user: Any, staff: Any) -> None:
    txn = services.grant(user=user, amount=10 * C, reason="x")
    services.hold_create(user=user, amount=4 * C, subject_type="t", subject_id="a")

    with pytest.raises(InsufficientCredits):
        services.reverse(txn=txn, actor=staff, reason="take back")
    assert bal(user) == (10 * C, 4 * C, 6 * C)
    assert not LedgerTransaction.objects.filter(kind="reversal").exists()


def test_reversal_is_not_reversible(user: Any, staff: Any) -> None:
    txn = services.grant(user=user, amount=10 * C, reason="x")
    rev = services.reverse(txn=txn, actor=staff, reason="undo")

    with pytest.raises(NotReversible):
        services.reverse(txn=rev, actor=staff, reason="redo")


def test_ledger_history_lists_what_each_entry_was_for(user: Any) -> None:
    services.grant(user=user, amount=10 * C, reason="welcome")
    hold = services.hold_create(
        user=user, amount=4 * C, subject_type="tasks.task", subject_id="abc"
    )
    services.hold_capture(hold=hold)

    entries = list(selectors.ledger_for_user(user=user))

    assert [(e.transaction.kind, e.amount, e.transaction.subject_id) for e in entries] == [
        ("capture", -4 * C, "abc"),
        ("grant", 10 * C, ""),
    ]
    assert Entry.objects.count() == 4


def test_reverse_replayed_with_its_key_returns_the_first_reversal(user: Any, staff: Any) -> None:
    txn = services.grant(user=user, amount=10 * C, reason="mistake")

    first = services.reverse(txn=txn, actor=staff, reason="undo", idempotency_key="rev-1")
    again = services.reverse(txn=txn, actor=staff, reason="undo", idempotency_key="rev-1")

    assert again.pk == first.pk
    assert LedgerTransaction.objects.filter(kind="reversal").count() == 1
    assert bal(user)[0] == 0
    assert_ledger_ok()


@pytest.mark.parametrize("amount", [0, -1, 1.5, "3", None, True])
def test_hold_refuses_bad_amounts(user: Any, amount: Any) -> None:
    services.grant(user=user, amount=10 * C, reason="x")

    with pytest.raises(InvalidAmount):
        services.hold_create(user=user, amount=amount, subject_type="t", subject_id="bad")

    assert not Hold.objects.exists()
    assert bal(user) == (10 * C, 0, 10 * C)


@pytest.mark.parametrize("amount", [-1, 1.5, "3", True, 4 * C + 1])
def test_capture_refuses_bad_amounts(user: Any, amount: Any) -> None:
    services.grant(user=user, amount=10 * C, reason="x")
    hold = services.hold_create(user=user, amount=4 * C, subject_type="t", subject_id="a")

    with pytest.raises(InvalidAmount):
        services.hold_capture(hold=hold, amount=amount)

    hold.refresh_from_db()
    assert hold.status == Hold.Status.OPEN
    assert bal(user) == (10 * C, 4 * C, 6 * C)
    assert_ledger_ok()
