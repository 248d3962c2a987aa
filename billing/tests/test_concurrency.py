"""Races on real PostgreSQL: threads behind a barrier, each with its own connection."""

from __future__ import annotations

from typing import Any

import pytest

from billing import selectors, services
from billing.models import Hold, LedgerTransaction
from billing.tests.concurrency import run_concurrently
from billing.tests.helpers import assert_ledger_ok
from rivya.errors import HoldAlreadyResolved, InsufficientCredits

pytestmark = pytest.mark.django_db(transaction=True)
C = 1_000_000


def test_exactly_k_of_5k_concurrent_holds_succeed(user: Any) -> None:
    # Given an account with credit for exactly K holds
    k, price = 20, 3 * C
    services.grant(user=user, amount=k * price, reason="exactly K")

    # When 5K holds for distinct subjects race
    results = run_concurrently(
        [
            lambda i=i: services.hold_create(
                user=user, amount=price, subject_type="race", subject_id=str(i)
            )
            for i in range(5 * k)
        ]
    )

    # Then exactly K succeed, the rest are refused for insufficient credits, available is 0
    won = [r for r in results if isinstance(r, Hold)]
    refused = [r for r in results if isinstance(r, InsufficientCredits)]
    assert len(won) == k
    assert len(refused) == 4 * k
    balance = selectors.balance_for_user(user=user)
    assert (balance.held, balance.available) == (k * price, 0)
    assert_ledger_ok()


def test_concurrent_capture_and_release_of_one_hold_one_wins(user: Any) -> None:
    services.grant(user=user, amount=1000 * C, reason="x")
    for trial in range(25):
        hold = services.hold_create(
            user=user, amount=4 * C, subject_type="cr", subject_id=str(trial)
        )

        hold_id = hold.pk
        results = run_concurrently(
            [
                lambda h=hold_id: services.hold_capture(hold=h, amount=3 * C),
                lambda h=hold_id: services.hold_release(hold=h),
                lambda h=hold_id: services.hold_capture(hold=h, amount=3 * C),
                lambda h=hold_id: services.hold_release(hold=h),
            ]
        )

        hold.refresh_from_db()
        assert hold.status in (Hold.Status.CAPTURED, Hold.Status.RELEASED)
        # Every call either agrees with the winner's outcome or is refused as already resolved.
        for r in results:
            assert isinstance(r, Hold | HoldAlreadyResolved), r
            if isinstance(r, Hold):
                assert r.status == hold.status
        captures = LedgerTransaction.objects.filter(kind="capture", hold=hold).count()
        assert captures == (1 if hold.status == Hold.Status.CAPTURED else 0)
    assert selectors.balance_for_user(user=user).held == 0
    assert_ledger_ok()


def test_concurrent_replays_of_one_grant_key_take_effect_once(user: Any) -> None:
    results = run_concurrently(
        [
            lambda: services.grant(
                user=user,
                amount=7 * C,
                reason="purchase #1",
                kind="purchase",
                idempotency_key="order-1",
            )
            for _ in range(30)
        ]
    )

    assert all(isinstance(r, LedgerTransaction) for r in results), results
    assert len({r.pk for r in results}) == 1
    assert selectors.balance_for_user(user=user).balance == 7 * C
    assert_ledger_ok()


def test_concurrent_replays_of_one_adjustment_key_take_effect_once(user: Any, staff: Any) -> None:
    services.grant(user=user, amount=10 * C, reason="x")

    results = run_concurrently(
        [
            lambda: services.adjust(
                user=user, amount=-3 * C, actor=staff, reason="refund fee", idempotency_key="adj-1"
            )
            for _ in range(20)
        ]
    )

    assert len({r.pk for r in results if isinstance(r, LedgerTransaction)}) == 1
    assert all(isinstance(r, LedgerTransaction) for r in results), results
    assert selectors.balance_for_user(user=user).balance == 7 * C
    assert_ledger_ok()


def test_concurrent_holds_for_one_subject_hold_once(user: Any) -> None:
    services.grant(user=user, amount=100 * C, reason="x")

    results = run_concurrently(
        [
            lambda: services.hold_create(
                user=user, amount=5 * C, subject_type="tasks.task", subject_id="same-task"
            )
            for _ in range(20)
        ]
    )

    assert len({r.pk for r in results if isinstance(r, Hold)}) == 1
    assert all(isinstance(r, Hold) for r in results), results
    assert selectors.balance_for_user(user=user).held == 5 * C
    assert_ledger_ok()


def test_concurrent_reversals_reverse_once(user: Any, staff: Any) -> None:
    txn = services.grant(user=user, amount=10 * C, reason="x")

    results = run_concurrently(
        [lambda: services.reverse(txn=txn.pk, actor=staff, reason="undo") for _ in range(10)]
    )

    assert sum(isinstance(r, LedgerTransaction) for r in results) == 1
    assert LedgerTransaction.objects.filter(kind="reversal").count() == 1
    assert selectors.balance_for_user(user=user).balance == 0
    assert_ledger_ok()


def test_concurrent_debits_never_overdraw(user: Any, staff: Any) -> None:
    # Holds and negative adjustments compete for the same 10 credits.
    services.grant(user=user, amount=10 * C, reason="x")
    calls: list[Any] = []
    for i in range(20):
        calls.append(
            lambda i=i: services.hold_create(
                user=user, amount=C, subject_type="mix", subject_id=str(i)
            )
        )
        calls.append(
            lambda i=i: services.adjust(
                user=user, amount=-C, actor=staff, reason="debit", idempotency_key=f"d{i}"
            )
        )

    results = run_concurrently(calls)

    successes = [r for r in results if not isinstance(r, Exception)]
    assert all(isinstance(r, InsufficientCredits) for r in results if isinstance(r, Exception))
    assert len(successes) == 10
    assert selectors.balance_for_user(user=user).available == 0
    assert_ledger_ok()
