"""``capture_refund``: a charge given back whole (its reversal) or in parts, never more than
was charged, once per key, with the actor and the reason."""

from __future__ import annotations

from typing import Any

import pytest

from billing import selectors, services
from billing.models import LedgerTransaction
from billing.tests.concurrency import run_concurrently
from billing.tests.helpers import assert_ledger_ok
from rivya.errors import InvalidAmount, NotReversible

pytestmark = pytest.mark.django_db
C = 1_000_000


def charged(user: Any, amount: int = 10 * C) -> LedgerTransaction:
    services.grant(user=user, amount=20 * C, reason="funds")
    hold = services.hold_create(
        user=user, amount=amount, subject_type="tasks.task", subject_id="t1"
    )
    services.hold_capture(hold=hold)
    return LedgerTransaction.objects.get(hold=hold)


def test_partial_refunds_add_up_to_the_charge_and_no_further(user: Any, staff: Any) -> None:
    capture = charged(user)

    first = services.capture_refund(
        capture=capture, amount=3 * C, actor=staff, reason="slow", idempotency_key="k1"
    )
    again = services.capture_refund(
        capture=capture, amount=3 * C, actor=staff, reason="slow", idempotency_key="k1"
    )
    rest = services.capture_refund(capture=capture, amount=None, actor=staff, reason="rest")

    assert again.pk == first.pk
    assert first.kind == LedgerTransaction.Kind.ADJUSTMENT
    assert (first.actor_id, first.reason, first.subject_id) == (staff.pk, "slow", "t1")
    assert services.capture_refunded(capture=capture) == 10 * C
    assert rest.kind == LedgerTransaction.Kind.ADJUSTMENT  # a part left: not a reversal
    assert selectors.balance_for_user(user=user).balance == 20 * C
    with pytest.raises(NotReversible):
        services.capture_refund(capture=capture, amount=C, actor=staff, reason="more")
    assert_ledger_ok()


def test_a_whole_refund_is_the_reversal(user: Any, staff: Any) -> None:
    capture = charged(user)

    txn = services.capture_refund(capture=capture, amount=None, actor=staff, reason="lost")

    assert txn.kind == LedgerTransaction.Kind.REVERSAL
    assert txn.reversal_of_id == capture.pk
    assert selectors.balance_for_user(user=user).balance == 20 * C
    assert_ledger_ok()


def test_refund_beyond_what_is_left_is_refused(user: Any, staff: Any) -> None:
    capture = charged(user)
    services.capture_refund(capture=capture, amount=8 * C, actor=staff, reason="part")

    with pytest.raises(InvalidAmount) as err:
        services.capture_refund(capture=capture, amount=3 * C, actor=staff, reason="too much")

    assert err.value.code == "refund_too_large"
    assert selectors.balance_for_user(user=user).balance == 18 * C
    assert_ledger_ok()


@pytest.mark.django_db(transaction=True)
def test_concurrent_refunds_never_add_up_beyond_the_charge(user: Any, staff: Any) -> None:
    # Given a charge of 10 credits; when 8 staff refund 3 credits each at the same moment
    capture = charged(user)
    results = run_concurrently(
        [
            lambda n=n: services.capture_refund(
                capture=capture.pk, amount=3 * C, actor=staff, reason=f"refund {n}"
            )
            for n in range(8)
        ]
    )

    # Then exactly three pass (9 of 10 credits), the rest are refused as too large
    done = [r for r in results if isinstance(r, LedgerTransaction)]
    assert len(done) == 3, results
    assert all(isinstance(r, InvalidAmount) for r in results if r not in done)
    assert services.capture_refunded(capture=capture) == 9 * C
    assert_ledger_ok()


@pytest.mark.django_db(transaction=True)
def test_concurrent_replays_of_one_refund_key_take_effect_once(user: Any, staff: Any) -> None:
    capture = charged(user)
    results = run_concurrently(
        [
            lambda: services.capture_refund(
                capture=capture.pk, amount=C, actor=staff, reason="r", idempotency_key="same"
            )
            for _ in range(6)
        ]
    )

    assert {r.pk for r in results} == {results[0].pk}, results
    assert services.capture_refunded(capture=capture) == C
    assert_ledger_ok()
