"""Reads of the credit ledger."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from django.db.models import Exists, Q, QuerySet, Sum
from django.db.models.functions import Coalesce, TruncDate
from django.utils import timezone

from billing.models import Account, Entry, Hold, LedgerTransaction


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


@dataclass(frozen=True)
class DaySpend:
    day: date  # a UTC calendar day
    micro: int  # charged that day, net of the charges reversed since


_CHARGE_LEGS = Q(transaction__kind=LedgerTransaction.Kind.CAPTURE) | Q(
    transaction__kind=LedgerTransaction.Kind.REVERSAL,
    transaction__reversal_of__kind=LedgerTransaction.Kind.CAPTURE,
)


def spend_per_day(*, user: Any, days: int = 30, now: datetime | None = None) -> list[DaySpend]:
    """Micro-credits the user was charged per UTC day, for the ``days`` days ending today
    (``now``'s day, included), oldest first; days without charges are 0.

    Charges are captures. A reversed capture counts on the day of the charge it undoes, so a
    day is what its charges finally cost (never negative), and a refund of an older charge does
    not move a day outside the window. One GROUP BY query.
    """
    today = (now or timezone.now()).astimezone(UTC).date()
    first = today - timedelta(days=days - 1)
    charge_day = TruncDate(
        Coalesce("transaction__reversal_of__created_at", "transaction__created_at"), tzinfo=UTC
    )
    rows = (
        Entry.objects.filter(
            _CHARGE_LEGS,
            account__user=user,
            # Sound narrowing for the index: a reversal is written after the charge it undoes.
            created_at__gte=datetime.combine(first, time.min, tzinfo=UTC),
        )
        .annotate(day=charge_day)
        .filter(day__gte=first, day__lte=today)
        .values("day")
        .annotate(net=Sum("amount"))
        .order_by()
    )
    # User legs of charges are negative, those of their reversals positive.
    spent = {row["day"]: -row["net"] for row in rows}
    return [
        DaySpend(day=day, micro=spent.get(day, 0))
        for day in (first + timedelta(days=n) for n in range(days))
    ]


def entries_for_subject(*, subject_type: str, subject_id: Any) -> QuerySet[Entry]:
    """Every ledger entry of the transactions about a subject (its capture, reversals,
    adjustments naming it), with their transaction and account (and the account's user),
    oldest first. One query."""
    return (
        Entry.objects.filter(
            transaction__subject_type=subject_type, transaction__subject_id=str(subject_id)
        )
        .select_related("transaction", "account__user")
        .order_by("created_at", "id")
    )


def open_hold_exists(*, subject_type: str, subject_id: Any) -> Exists:
    """An EXISTS over billing's holds: the subject (an expression, e.g. the outer row's id cast
    to text) has a hold still open. For filters of other apps that must stay one query."""
    return Exists(
        Hold.objects.filter(
            subject_type=subject_type, subject_id=subject_id, status=Hold.Status.OPEN
        )
    )
