"""Operator commands: ``grant_credits`` and ``ledger_check``."""

from __future__ import annotations

import io
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from billing import selectors, services
from billing.models import Account, Hold, LedgerTransaction
from billing.tests.helpers import assert_ledger_ok

pytestmark = pytest.mark.django_db
C = 1_000_000


def grant_credits(*args: str, **options: Any) -> str:
    out = io.StringIO()
    call_command("grant_credits", *args, stdout=out, stderr=io.StringIO(), **options)
    return out.getvalue()


def ledger_check() -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    try:
        call_command("ledger_check", stdout=out, stderr=err)
    except SystemExit as exc:
        code = exc.code
    else:
        code = 0
    assert isinstance(code, int)
    return code, out.getvalue(), err.getvalue()


def balance(user: Any) -> int:
    return selectors.balance_for_user(user=user).balance


# --- grant_credits --------------------------------------------------------------------------


def test_grant_credits_grants_whole_credits(user: Any) -> None:
    out = grant_credits(user.username, "25", reason="support ticket 12")

    assert balance(user) == 25 * C
    txn = LedgerTransaction.objects.get()
    assert (txn.kind, txn.reason) == ("grant", "support ticket 12")
    assert "Granted 25 credits" in out
    assert user.username in out
    assert_ledger_ok()


def test_grant_credits_accepts_fractions(user: Any) -> None:
    grant_credits(user.username, "0.5", reason="x")
    grant_credits(user.username, "0.000001", reason="y")

    assert balance(user) == 500_001


def test_grant_credits_kind(user: Any) -> None:
    grant_credits(user.username, "3", reason="invoice 7", kind="purchase")

    assert LedgerTransaction.objects.get().kind == "purchase"


def test_grant_credits_with_idempotency_key_takes_effect_once(user: Any) -> None:
    grant_credits(user.username, "5", reason="x", idempotency_key="ticket-9")
    grant_credits(user.username, "5", reason="x", idempotency_key="ticket-9")

    assert balance(user) == 5 * C
    assert LedgerTransaction.objects.count() == 1


@pytest.mark.parametrize("amount", ["0.1234567", "-3", "abc", "0", "", "NaN", "1e400"])
def test_grant_credits_refuses_bad_amounts(user: Any, amount: str) -> None:
    with pytest.raises(CommandError):
        grant_credits(user.username, amount, reason="x")

    assert balance(user) == 0
    assert LedgerTransaction.objects.count() == 0


def test_grant_credits_refuses_unknown_user(user: Any) -> None:
    with pytest.raises(CommandError, match="nobody"):
        grant_credits("nobody", "5", reason="x")

    assert LedgerTransaction.objects.count() == 0


def test_grant_credits_requires_a_reason(user: Any) -> None:
    with pytest.raises((CommandError, SystemExit)):
        grant_credits(user.username, "5")

    assert balance(user) == 0
    assert LedgerTransaction.objects.count() == 0


def test_grant_credits_refuses_a_blank_reason(user: Any) -> None:
    with pytest.raises(CommandError, match="reason"):
        grant_credits(user.username, "5", reason="   ")

    assert LedgerTransaction.objects.count() == 0


def test_grant_credits_accepts_a_unique_email(make_user: Any) -> None:
    target = make_user("carol")

    grant_credits("CAROL@example.com", "2", reason="x")

    assert balance(target) == 2 * C


def test_grant_credits_by_username_wins_over_an_email() -> None:
    users = get_user_model().objects
    owner = users.create_user(username="dup1", email="dup@example.com")
    named = users.create_user(username="dup@example.com", email="other@example.com")

    grant_credits("dup@example.com", "1", reason="x")

    assert balance(named) == C
    assert balance(owner) == 0


# --- ledger_check ---------------------------------------------------------------------------


def test_ledger_check_passes_on_an_empty_ledger() -> None:
    code, out, err = ledger_check()

    assert code == 0
    assert "all" in out
    assert "pass" in out
    assert err == ""


def test_ledger_check_passes_on_a_healthy_ledger(make_user: Any, staff: Any) -> None:
    alice, bob = make_user(), make_user()
    services.grant(user=alice, amount=10 * C, reason="x")
    services.grant(user=bob, amount=5 * C, reason="x", idempotency_key="k")
    captured = services.hold_create(user=alice, amount=3 * C, subject_type="t", subject_id="1")
    services.hold_capture(hold=captured, amount=2 * C)
    services.hold_create(user=alice, amount=C, subject_type="t", subject_id="2")
    released = services.hold_create(user=bob, amount=C, subject_type="t", subject_id="3")
    services.hold_release(hold=released)
    services.adjust(user=bob, amount=-C, actor=staff, reason="chargeback")
    services.reverse(
        txn=LedgerTransaction.objects.get(kind="capture"), actor=staff, reason="refund"
    )

    code, out, err = ledger_check()

    assert code == 0, err
    assert "2.account_balance" in out
    assert "2.account_held" in out
    assert "BREACH" not in err


def test_ledger_check_names_an_account_balance_off_from_its_entries(user: Any) -> None:
    services.grant(user=user, amount=10 * C, reason="x")
    account = Account.objects.get(user=user)
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE billing_account SET balance = balance + 1 WHERE user_id = %s", [user.pk]
        )

    code, out, err = ledger_check()

    assert code == 1
    assert f"BREACH 2.account_balance: account {account.pk}" in err
    assert f"balance {10 * C + 1} but entries sum to {10 * C}" in err
    assert "2.account_held" not in err
    assert "1 breach" in err
    assert "pass" not in out


def test_ledger_check_names_an_open_hold_missing_from_held(user: Any) -> None:
    services.grant(user=user, amount=10 * C, reason="x")
    account = Account.objects.get(user=user)
    # Planted: an open hold whose reservation never reached account.held.
    Hold.objects.create(account=account, amount=2 * C, subject_type="t", subject_id="planted")

    code, _, err = ledger_check()

    assert code == 1
    assert f"BREACH 2.account_held: account {account.pk}: held 0 but open holds sum to" in err
    assert "2.account_balance" not in err


def test_ledger_check_names_held_that_no_open_hold_explains(user: Any) -> None:
    services.grant(user=user, amount=10 * C, reason="x")
    hold = services.hold_create(user=user, amount=2 * C, subject_type="t", subject_id="h")
    with connection.cursor() as cursor:
        cursor.execute("UPDATE billing_account SET held = held + 1 WHERE user_id = %s", [user.pk])

    code, _, err = ledger_check()

    assert code == 1
    assert f"held {hold.amount + 1} but open holds sum to {hold.amount}" in err
    assert "2.account_held" in err


def test_ledger_check_names_every_breach(make_user: Any) -> None:
    alice, bob = make_user(), make_user()
    services.grant(user=alice, amount=10 * C, reason="x")
    services.grant(user=bob, amount=10 * C, reason="x")
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE billing_account SET balance = balance + 1 WHERE user_id IN (%s, %s)",
            [alice.pk, bob.pk],
        )

    code, _, err = ledger_check()

    assert code == 1
    for someone in (alice, bob):
        assert f"account {Account.objects.get(user=someone).pk}:" in err
    assert "2 breach" in err
