"""The credit ledger: accounts, double-entry transactions and their entries, and holds.

Amounts are BIGINT micro-credits (1 credit = 1,000,000). The model is two-phase, like
TigerBeetle's pending transfers: a hold reserves part of a user's balance (``held``); capturing
it turns (part of) the hold into a charge, which is a ledger transaction; releasing it returns it.

What the database enforces by itself:
- entries and transactions are append-only (triggers refuse UPDATE and DELETE; TRUNCATE, used to
  flush test databases, stays allowed), see migration 0002;
- on PostgreSQL, every transaction's entries sum to zero when the database transaction commits
  (a deferred constraint trigger);
- user accounts never go below zero available (CHECK balance - held >= 0, held >= 0);
- a hold's captured amount never exceeds what it reserved, and there is at most one hold per
  subject (the task or chat turn it pays for);
- an idempotency key is used once per scope; a transaction is reversed at most once;
- staff adjustments carry an actor and a reason.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import F, Q


class Account(models.Model):
    class Kind(models.TextChoices):
        USER = "user", "User"
        ISSUANCE = "issuance", "Issuance (grants, purchases, adjustments)"
        REVENUE = "revenue", "Revenue (charges)"

    kind = models.CharField(max_length=16, choices=Kind.choices)
    user = models.OneToOneField(
        settings.AUTH_USER_MODEL,
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="credit_account",
    )
    # For user accounts ``balance`` is the sum of the account's entries, kept in step inside the
    # same database transaction that writes them. System accounts are the other side of every
    # grant and charge; keeping a cached balance there would make one hot row that serializes
    # every capture in the system, so their balance is derived from entries when asked.
    balance = models.BigIntegerField(default=0)
    held = models.BigIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.CheckConstraint(
                name="account_user_iff_user_kind",
                condition=(
                    Q(kind="user", user__isnull=False) | (~Q(kind="user") & Q(user__isnull=True))
                ),
            ),
            models.CheckConstraint(
                name="account_user_never_overdrawn",
                condition=~Q(kind="user") | Q(held__gte=0, balance__gte=F("held")),
            ),
            models.CheckConstraint(
                name="account_system_no_cached_amounts",
                condition=Q(kind="user") | Q(balance=0, held=0),
            ),
            models.UniqueConstraint(
                fields=["kind"], condition=~Q(kind="user"), name="account_one_per_system_kind"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.kind}:{self.user_id}" if self.user_id else self.kind

    @property
    def available(self) -> int:
        return self.balance - self.held


class Hold(models.Model):
    class Status(models.TextChoices):
        OPEN = "open", "Open"
        CAPTURED = "captured", "Captured"
        RELEASED = "released", "Released"

    account = models.ForeignKey(Account, on_delete=models.PROTECT, related_name="holds")
    # What the hold pays for, by generic reference ("tasks.task", "<uuid>"): billing imports no
    # task or chat model.
    subject_type = models.CharField(max_length=64)
    subject_id = models.CharField(max_length=64)
    amount = models.BigIntegerField()
    captured = models.BigIntegerField(default=0)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.OPEN)
    created_at = models.DateTimeField(auto_now_add=True)
    resolved_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["subject_type", "subject_id"], name="hold_one_per_subject"
            ),
            models.CheckConstraint(name="hold_amount_positive", condition=Q(amount__gt=0)),
            models.CheckConstraint(
                name="hold_captured_within_amount",
                condition=Q(captured__gte=0, captured__lte=F("amount")),
            ),
            models.CheckConstraint(
                name="hold_status_consistent",
                condition=(
                    Q(status="open", captured=0, resolved_at__isnull=True)
                    | Q(status="released", captured=0, resolved_at__isnull=False)
                    | Q(status="captured", resolved_at__isnull=False)
                ),
            ),
        ]
        indexes = [
            models.Index(
                fields=["account"], condition=Q(status="open"), name="hold_open_by_account"
            ),
        ]

    def __str__(self) -> str:
        return f"hold {self.pk} {self.subject_type}:{self.subject_id} {self.status}"


class LedgerTransaction(models.Model):
    class Kind(models.TextChoices):
        GRANT = "grant", "Grant"
        PURCHASE = "purchase", "Purchase"
        PROMOTION = "promotion", "Promotion"
        CAPTURE = "capture", "Charge"
        ADJUSTMENT = "adjustment", "Staff adjustment"
        REVERSAL = "reversal", "Reversal"

    kind = models.CharField(max_length=16, choices=Kind.choices)
    created_at = models.DateTimeField(auto_now_add=True)
    reason = models.CharField(max_length=500, blank=True)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    # For a capture: the hold it settles (one capture per hold) and what the hold was for.
    hold = models.OneToOneField(
        Hold, on_delete=models.PROTECT, null=True, blank=True, related_name="capture"
    )
    subject_type = models.CharField(max_length=64, blank=True)
    subject_id = models.CharField(max_length=64, blank=True)
    reversal_of = models.OneToOneField(
        "self", on_delete=models.PROTECT, null=True, blank=True, related_name="reversed_by"
    )
    # Retried operations carry a key: the same key in the same scope takes effect once.
    idempotency_scope = models.CharField(max_length=64, blank=True)
    idempotency_key = models.CharField(max_length=255, blank=True)
    fingerprint = models.CharField(max_length=64, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["idempotency_scope", "idempotency_key"],
                condition=~Q(idempotency_key=""),
                name="ledger_txn_idempotency_unique",
            ),
            models.CheckConstraint(
                name="ledger_txn_adjustment_has_actor_and_reason",
                condition=~Q(kind="adjustment") | (Q(actor__isnull=False) & ~Q(reason="")),
            ),
            models.CheckConstraint(
                name="ledger_txn_capture_has_hold",
                condition=~Q(kind="capture") | Q(hold__isnull=False),
            ),
            models.CheckConstraint(
                name="ledger_txn_reversal_has_original",
                condition=~Q(kind="reversal") | Q(reversal_of__isnull=False),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.kind} #{self.pk}"


class Entry(models.Model):
    """One leg of a ledger transaction. Positive amounts credit the account."""

    transaction = models.ForeignKey(
        LedgerTransaction, on_delete=models.PROTECT, related_name="entries"
    )
    # No index of its own: entry_account_history (account, …) serves lookups by account.
    account = models.ForeignKey(
        Account, on_delete=models.PROTECT, related_name="entries", db_index=False
    )
    amount = models.BigIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name_plural = "entries"
        constraints = [
            models.CheckConstraint(name="entry_amount_nonzero", condition=~Q(amount=0)),
        ]
        indexes = [
            models.Index(fields=["account", "-created_at", "-id"], name="entry_account_history")
        ]

    def __str__(self) -> str:
        return f"entry {self.pk} {self.amount:+d} on {self.account_id}"


class IdempotencyRecord(models.Model):
    """An ``Idempotency-Key`` of an API request that creates or bills (kept 24 h, per user).

    The record is claimed (``in_progress``) in its own transaction before the work starts, and
    completed in the same database transaction as the work, so "completed" means "the work
    committed". A claim left ``in_progress`` by a crashed request is taken over after a while.
    """

    class Status(models.TextChoices):
        IN_PROGRESS = "in_progress", "In progress"
        COMPLETED = "completed", "Completed"

    # No index of its own: idempotency_key_per_user (user, key) serves lookups by user.
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+", db_index=False
    )
    key = models.CharField(max_length=255)
    fingerprint = models.CharField(max_length=64)
    status = models.CharField(max_length=16, choices=Status.choices)
    response_status = models.PositiveSmallIntegerField(null=True, blank=True)
    response_body = models.JSONField(null=True, blank=True)
    response_headers = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    locked_at = models.DateTimeField()
    expires_at = models.DateTimeField(db_index=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["user", "key"], name="idempotency_key_per_user"),
        ]

    def __str__(self) -> str:
        return f"{self.user_id}:{self.key} ({self.status})"
