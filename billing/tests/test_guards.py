"""What the database itself refuses, whatever the application code does."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import IntegrityError, InternalError, connection, transaction

from billing import services
from billing.models import Account, Entry, Hold, LedgerTransaction

C = 1_000_000
DB_ERRORS = (IntegrityError, InternalError)


@pytest.fixture
def granted(db: Any, user: Any) -> LedgerTransaction:
    return services.grant(user=user, amount=10 * C, reason="x")


@pytest.mark.django_db
@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE billing_entry SET amount = amount + 1",
        "DELETE FROM billing_entry",
        "UPDATE billing_ledgertransaction SET reason = 'rewritten'",
        "DELETE FROM billing_ledgertransaction",
    ],
)
def test_raw_update_or_delete_of_the_ledger_is_refused(granted: Any, sql: str) -> None:
    with (
        pytest.raises(DB_ERRORS, match="append-only"),
        transaction.atomic(),
        connection.cursor() as cursor,
    ):
        cursor.execute(sql)
    assert Entry.objects.filter(transaction=granted).count() == 2


@pytest.mark.django_db
def test_orm_delete_of_an_entry_is_refused(granted: Any) -> None:
    with pytest.raises(DB_ERRORS), transaction.atomic():
        Entry.objects.filter(transaction=granted).delete()


@pytest.mark.django_db(transaction=True)
def test_unbalanced_transaction_is_refused_at_commit(user: Any) -> None:
    account = services.account_for_user(user=user)

    def forge() -> None:
        with transaction.atomic():
            txn = LedgerTransaction.objects.create(kind="grant", reason="forged")
            Entry.objects.create(transaction=txn, account=account, amount=5 * C)

    with pytest.raises(DB_ERRORS, match="does not balance"):
        forge()
    assert not LedgerTransaction.objects.filter(reason="forged").exists()


@pytest.mark.django_db
def test_account_cannot_go_below_zero_available(granted: Any, user: Any) -> None:
    with pytest.raises(IntegrityError), transaction.atomic():
        Account.objects.filter(user=user).update(held=11 * C)


@pytest.mark.django_db
def test_hold_cannot_capture_more_than_reserved(granted: Any, user: Any) -> None:
    hold = services.hold_create(user=user, amount=C, subject_type="t", subject_id="1")
    with pytest.raises(IntegrityError), transaction.atomic():
        Hold.objects.filter(pk=hold.pk).update(status="captured", captured=2 * C)


@pytest.mark.django_db
def test_second_hold_for_a_subject_is_refused_by_the_database(granted: Any, user: Any) -> None:
    hold = services.hold_create(user=user, amount=C, subject_type="t", subject_id="1")
    with pytest.raises(IntegrityError), transaction.atomic():
        Hold.objects.create(account=hold.account, amount=C, subject_type="t", subject_id="1")


@pytest.mark.django_db
def test_adjustment_without_actor_or_reason_is_refused_by_the_database(granted: Any) -> None:
    with pytest.raises(IntegrityError), transaction.atomic():
        LedgerTransaction.objects.create(kind="adjustment", reason="")


@pytest.mark.django_db
def test_ledger_entries_protect_their_account(granted: Any, user: Any) -> None:
    from django.db.models import ProtectedError

    with pytest.raises(ProtectedError):
        user.delete()
