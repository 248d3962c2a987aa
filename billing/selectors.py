"""Reads of the credit ledger."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.db.models import QuerySet, Sum

from billing.models import Account, Entry, Hold


@dataclass(frozen=True)
class Balance:
    balance: int
    held: int

    @property
    def available(self) -> int:
        return self.balance - self.held


def balance_for_user(*, user: Any) -> Balance:
    """Balance, held and available micro-credits (all zero before the first operation)."""
    row = Account.objects.filter(user=user).values("balance", "held").first()
    if row is None:
        return Balance(balance=0, held=0)
    return Balance(balance=row["balance"], held=row["held"])


def ledger_for_user(*, user: Any) -> QuerySet[Entry]:
    """The user's ledger entries with their transactions, newest first."""
    return (
        Entry.objects.filter(account__user=user)
        .select_related("transaction")
        .order_by("-created_at", "-id")
    )


def hold_for_subject(*, subject_type: str, subject_id: str) -> Hold | None:
    return Hold.objects.filter(subject_type=subject_type, subject_id=str(subject_id)).first()


def system_balance(*, kind: str) -> int:
    """A system account's balance, derived from its entries (see Account.balance)."""
    return Entry.objects.filter(account__kind=kind).aggregate(s=Sum("amount"))["s"] or 0
