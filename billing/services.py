"""Writes to the credit ledger. Every function here keeps the invariants in ``docs/ledger.md``.

Concurrency rules used throughout (a check and its write are never two steps):
- the balance check and the change are one conditional UPDATE (``... WHERE balance >= held + x``);
  the row count decides, never a value read earlier in Python;
- a hold changes state by one conditional UPDATE on its status, so it is resolved exactly once;
- retried operations carry an idempotency key whose uniqueness the database enforces; the loser of
  a race waits for the winner's commit, hits the unique index and returns the winner's result;
- when several user accounts are touched (a reversal), their rows are locked in primary-key order.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from billing.models import Account, Entry, Hold, IdempotencyRecord, LedgerTransaction
from rivya.db import reconnect_if_broken
from rivya.errors import (
    HoldAlreadyResolved,
    IdempotencyInProgress,
    IdempotencyKeyReused,
    InsufficientCredits,
    InvalidAmount,
    NotReversible,
    ReasonRequired,
)
from rivya.money import check_micro, format_credits

T = TypeVar("T")

GRANT_KINDS = (
    LedgerTransaction.Kind.GRANT,
    LedgerTransaction.Kind.PURCHASE,
    LedgerTransaction.Kind.PROMOTION,
)


# --- accounts -------------------------------------------------------------------------------


def account_for_user(*, user: Any) -> Account:
    """The user's credit account, created on first use (race-safe: unique per user)."""
    account, _ = Account.objects.get_or_create(user=user, defaults={"kind": Account.Kind.USER})
    return account


def system_account_id(kind: str) -> int:
    """Id of the issuance or revenue account, created on first use.

    Not cached per process: a cached id outlives a flushed or rolled-back database, and the
    lookup is one primary-key-sized index read.
    """
    account, _ = Account.objects.get_or_create(kind=kind, user=None)
    return account.pk


# --- idempotency ----------------------------------------------------------------------------


def _fingerprint(**fields: Any) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def _replay(scope: str, key: str, fingerprint: str) -> LedgerTransaction | None:
    txn = LedgerTransaction.objects.filter(idempotency_scope=scope, idempotency_key=key).first()
    if txn is not None and txn.fingerprint != fingerprint:
        raise IdempotencyKeyReused()
    return txn


def _once(
    scope: str,
    key: str,
    fingerprint: str,
    post: Callable[[], LedgerTransaction],
) -> LedgerTransaction:
    """Run ``post`` once per (scope, key): a replay returns the first transaction unchanged."""
    if key:
        if len(key) > 255:
            raise InvalidAmount(
                "Idempotency keys are at most 255 characters.", code="invalid_idempotency_key"
            )
        first = _replay(scope, key, fingerprint)
        if first is not None:
            return first
    try:
        with transaction.atomic():
            return post()
    except IntegrityError as exc:
        # A concurrent call with the same key committed first: the unique index made us wait
        # for it, then refused our insert. Its result is ours.
        if key and "ledger_txn_idempotency_unique" in str(exc):
            first = _replay(scope, key, fingerprint)
            if first is not None:
                return first
        raise


def _new_txn(
    kind: str,
    *,
    reason: str = "",
    actor: Any = None,
    scope: str = "",
    key: str = "",
    fingerprint: str = "",
    **extra: Any,
) -> LedgerTransaction:
    return LedgerTransaction.objects.create(
        kind=kind,
        reason=reason[:500],
        actor=actor,
        idempotency_scope=scope if key else "",
        idempotency_key=key,
        fingerprint=fingerprint if key else "",
        **extra,
    )


def _entries(txn: LedgerTransaction, legs: list[tuple[int, int]]) -> None:
    if sum(amount for _, amount in legs) != 0:  # a bug, never user input
        raise RuntimeError(f"unbalanced ledger transaction {txn.pk}: {legs}")
    Entry.objects.bulk_create(
        [
            Entry(transaction=txn, account_id=account_id, amount=amount)
            for account_id, amount in legs
            if amount
        ]
    )


def _insufficient(account_id: int, needed: int) -> InsufficientCredits:
    account = Account.objects.get(pk=account_id)
    return InsufficientCredits(
        extra={
            "available": format_credits(account.available),
            "available_micro": account.available,
            "required": format_credits(needed),
            "required_micro": needed,
        }
    )


def _required_reason(reason: str) -> str:
    reason = (reason or "").strip()
    if not reason:
        raise ReasonRequired()
    return reason


# --- single-phase operations ----------------------------------------------------------------


def grant(
    *,
    user: Any,
    amount: int,
    reason: str,
    kind: str = LedgerTransaction.Kind.GRANT,
    idempotency_key: str = "",
    actor: Any = None,
) -> LedgerTransaction:
    """Credit ``amount`` micro-credits to ``user`` (signup grant, purchase, promotion).

    Before: ``amount`` is a positive integer; ``reason`` is not blank.
    After: the user's balance is higher by ``amount``; issuance is lower by as much.
    Raises InvalidAmount, ReasonRequired, IdempotencyKeyReused.
    """
    check_micro(amount)
    reason = _required_reason(reason)
    if kind not in GRANT_KINDS:
        raise InvalidAmount(f"{kind!r} is not a kind of grant.", code="invalid_kind")
    account = account_for_user(user=user)
    scope = f"account:{account.pk}"
    fingerprint = _fingerprint(op="grant", amount=amount, kind=kind, reason=reason)

    def post() -> LedgerTransaction:
        txn = _new_txn(
            kind,
            reason=reason,
            actor=actor,
            scope=scope,
            key=idempotency_key,
            fingerprint=fingerprint,
        )
        Account.objects.filter(pk=account.pk).update(balance=F("balance") + amount)
        _entries(txn, [(system_account_id(Account.Kind.ISSUANCE), -amount), (account.pk, amount)])
        return txn

    return _once(scope, idempotency_key, fingerprint, post)


def adjust(
    *, user: Any, amount: int, actor: Any, reason: str, idempotency_key: str = ""
) -> LedgerTransaction:
    """A staff adjustment, positive or negative, that never overdraws the account.

    Before: ``amount`` is a non-zero integer; ``actor`` is the staff member; ``reason`` not blank.
    After: balance changed by ``amount``; available is still >= 0.
    Raises InvalidAmount, ReasonRequired, InsufficientCredits (a debit larger than available),
    IdempotencyKeyReused.
    """
    check_micro(amount, allow_negative=True)
    reason = _required_reason(reason)
    if actor is None:
        raise InvalidAmount(
            "A staff adjustment needs the staff member who makes it.", code="actor_required"
        )
    account = account_for_user(user=user)
    scope = f"account:{account.pk}"
    fingerprint = _fingerprint(op="adjust", amount=amount, reason=reason, actor=actor.pk)

    def post() -> LedgerTransaction:
        txn = _new_txn(
            LedgerTransaction.Kind.ADJUSTMENT,
            reason=reason,
            actor=actor,
            scope=scope,
            key=idempotency_key,
            fingerprint=fingerprint,
        )
        # WHERE balance + amount >= held: a debit may not take what is available below zero.
        changed = Account.objects.filter(pk=account.pk, balance__gte=F("held") - amount).update(
            balance=F("balance") + amount
        )
        if not changed:
            raise _insufficient(account.pk, -amount)
        _entries(txn, [(system_account_id(Account.Kind.ISSUANCE), -amount), (account.pk, amount)])
        return txn

    return _once(scope, idempotency_key, fingerprint, post)


def reverse(
    *, txn: LedgerTransaction | int, actor: Any, reason: str, idempotency_key: str = ""
) -> LedgerTransaction:
    """Post the exact opposite of a transaction (a grant taken back, a charge refunded).

    A transaction is reversed at most once and a reversal is never reversed. Taking back credits
    the user has already spent or holds is refused (no overdraft).
    Raises NotReversible, InsufficientCredits, ReasonRequired, IdempotencyKeyReused.
    """
    reason = _required_reason(reason)
    original_id = txn if isinstance(txn, int) else txn.pk
    scope = "reversal"
    fingerprint = _fingerprint(op="reverse", txn=original_id, reason=reason)

    def post() -> LedgerTransaction:
        original = LedgerTransaction.objects.filter(pk=original_id).first()
        if original is None:
            raise NotReversible("No such ledger transaction.", code="not_found", status=404)
        if original.kind == LedgerTransaction.Kind.REVERSAL:
            raise NotReversible("A reversal cannot itself be reversed.")
        if LedgerTransaction.objects.filter(reversal_of=original).exists():
            raise NotReversible("This transaction was already reversed.")
        legs = [(e.account_id, -e.amount) for e in original.entries.all()]
        user_ids = set(
            Account.objects.filter(pk__in=[a for a, _ in legs], kind=Account.Kind.USER).values_list(
                "pk", flat=True
            )
        )
        rev = _new_txn(
            LedgerTransaction.Kind.REVERSAL,
            reason=reason,
            actor=actor,
            scope=scope,
            key=idempotency_key,
            fingerprint=fingerprint,
            reversal_of=original,
            subject_type=original.subject_type,
            subject_id=original.subject_id,
        )
        # Lock user rows in primary-key order so that two multi-account operations never
        # deadlock each other.
        for account_id, delta in sorted(legs):
            if account_id not in user_ids:
                continue
            changed = Account.objects.filter(pk=account_id, balance__gte=F("held") - delta).update(
                balance=F("balance") + delta
            )
            if not changed:
                raise _insufficient(account_id, -delta)
        _entries(rev, legs)
        return rev

    try:
        return _once(scope, idempotency_key, fingerprint, post)
    except IntegrityError as exc:
        if "reversal_of" in str(exc):
            raise NotReversible("This transaction was already reversed.") from None
        raise


# --- two-phase: hold, capture, release ------------------------------------------------------


def _same_hold(hold: Hold, account_id: int, amount: int) -> Hold:
    if hold.account_id != account_id or hold.amount != amount:
        raise IdempotencyKeyReused(
            "A hold for this subject already exists with a different account or amount."
        )
    return hold


def hold_create(*, user: Any, amount: int, subject_type: str, subject_id: str) -> Hold:
    """Reserve ``amount`` of the user's available credits for one subject (a task, a chat turn).

    At most one hold exists per subject: calling again with the same arguments returns the
    existing hold and reserves nothing more.
    After: held is higher by ``amount``; available stayed >= 0.
    Raises InsufficientCredits when available < amount; IdempotencyKeyReused when the subject
    already has a different hold.
    """
    check_micro(amount)
    subject_id = str(subject_id)
    account = account_for_user(user=user)
    existing = Hold.objects.filter(subject_type=subject_type, subject_id=subject_id).first()
    if existing is not None:
        return _same_hold(existing, account.pk, amount)
    try:
        with transaction.atomic():
            changed = Account.objects.filter(pk=account.pk, balance__gte=F("held") + amount).update(
                held=F("held") + amount
            )
            if not changed:
                raise _insufficient(account.pk, amount)
            return Hold.objects.create(
                account=account, amount=amount, subject_type=subject_type, subject_id=subject_id
            )
    except IntegrityError as exc:
        if "hold_one_per_subject" not in str(exc):
            raise
    return _same_hold(
        Hold.objects.get(subject_type=subject_type, subject_id=subject_id), account.pk, amount
    )


def hold_capture(*, hold: Hold | int, amount: int | None = None, reason: str = "") -> Hold:
    """Settle a hold: charge ``amount`` (default: all of it) and release the rest.

    Resolved exactly once: the first capture wins; repeating the same capture returns the hold
    unchanged; capturing a hold that was released (or captured for another amount) raises
    HoldAlreadyResolved. Capturing 0 is a release.
    Raises InvalidAmount when ``amount`` exceeds the hold.
    """
    hold_id = hold if isinstance(hold, int) else hold.pk
    with transaction.atomic():
        current = Hold.objects.get(pk=hold_id)
        amount = current.amount if amount is None else check_micro(amount, allow_zero=True)
        if amount > current.amount:
            raise InvalidAmount(
                "Cannot capture more than was held.", extra={"held_micro": current.amount}
            )
        if amount == 0:
            return hold_release(hold=hold_id)
        now = timezone.now()
        won = Hold.objects.filter(pk=hold_id, status=Hold.Status.OPEN).update(
            status=Hold.Status.CAPTURED, captured=amount, resolved_at=now
        )
        if not won:
            current.refresh_from_db()
            if current.status == Hold.Status.CAPTURED and current.captured == amount:
                return current
            raise HoldAlreadyResolved(extra={"hold_status": current.status})
        Account.objects.filter(pk=current.account_id).update(
            balance=F("balance") - amount, held=F("held") - current.amount
        )
        txn = _new_txn(
            LedgerTransaction.Kind.CAPTURE,
            reason=reason,
            hold_id=hold_id,
            subject_type=current.subject_type,
            subject_id=current.subject_id,
        )
        _entries(
            txn, [(current.account_id, -amount), (system_account_id(Account.Kind.REVENUE), amount)]
        )
    current.refresh_from_db()
    return current


def hold_release(*, hold: Hold | int) -> Hold:
    """Return a hold to the user's available credits. Releasing twice is harmless; releasing a
    captured hold raises HoldAlreadyResolved."""
    hold_id = hold if isinstance(hold, int) else hold.pk
    with transaction.atomic():
        won = Hold.objects.filter(pk=hold_id, status=Hold.Status.OPEN).update(
            status=Hold.Status.RELEASED, resolved_at=timezone.now()
        )
        current = Hold.objects.get(pk=hold_id)
        if not won:
            if current.status == Hold.Status.RELEASED:
                return current
            raise HoldAlreadyResolved(extra={"hold_status": current.status})
        Account.objects.filter(pk=current.account_id).update(held=F("held") - current.amount)
    return current


# --- API idempotency keys -------------------------------------------------------------------

IDEMPOTENCY_TTL = timedelta(hours=24)
IDEMPOTENCY_STALE = timedelta(seconds=60)


@dataclass(frozen=True)
class IdempotencyClaim:
    """Either ``record`` (ours to run and complete) or ``replay`` (the first response)."""

    record: IdempotencyRecord | None = None
    replay: IdempotencyRecord | None = None


def _take_over(record: IdempotencyRecord, fingerprint: str, now: Any) -> IdempotencyRecord | None:
    won = IdempotencyRecord.objects.filter(
        pk=record.pk, locked_at=record.locked_at, status=record.status
    ).update(
        fingerprint=fingerprint,
        status=IdempotencyRecord.Status.IN_PROGRESS,
        locked_at=now,
        expires_at=now + IDEMPOTENCY_TTL,
        response_status=None,
        response_body=None,
        response_headers={},
    )
    return IdempotencyRecord.objects.get(pk=record.pk) if won else None


def check_idempotency_key(key: Any) -> str:
    """The one rule for an ``Idempotency-Key``: 1 to 255 printable characters (else 400
    ``invalid_idempotency_key``)."""
    if not isinstance(key, str) or not key or len(key) > 255 or not key.isprintable():
        raise InvalidAmount(
            "Idempotency-Key must be 1 to 255 printable characters.", code="invalid_idempotency_key"
        )
    return key


def idempotency_claim(*, user: Any, key: str, fingerprint: str) -> IdempotencyClaim:
    """Claim ``key`` for a request with ``fingerprint`` (a hash of method, path and body).

    Returns a claim to run, or the completed first response to replay.
    Raises IdempotencyKeyReused (same key, different request), IdempotencyInProgress (the first
    request is still running, or the key changed hands at each of three tries),
    InvalidAmount-coded ``invalid_idempotency_key`` for bad keys.
    """
    check_idempotency_key(key)
    # The record we conflict with can vanish before we read it: its request abandoned the claim
    # (the work was refused or failed) or the purge deleted it (expired). The key is then free:
    # go back to the insert. Three tries, in case the key keeps changing hands.
    for _attempt in range(3):
        now = timezone.now()
        try:
            with transaction.atomic():
                return IdempotencyClaim(
                    record=IdempotencyRecord.objects.create(
                        user=user,
                        key=key,
                        fingerprint=fingerprint,
                        status=IdempotencyRecord.Status.IN_PROGRESS,
                        locked_at=now,
                        expires_at=now + IDEMPOTENCY_TTL,
                    )
                )
        except IntegrityError:
            pass
        try:
            record = IdempotencyRecord.objects.get(user=user, key=key)
        except IdempotencyRecord.DoesNotExist:
            continue
        if record.expires_at <= now:
            taken = _take_over(record, fingerprint, now)
            if taken is not None:
                return IdempotencyClaim(record=taken)
            try:
                record.refresh_from_db()
            except IdempotencyRecord.DoesNotExist:  # purged before our take-over: free again
                continue
        if record.fingerprint != fingerprint:
            raise IdempotencyKeyReused()
        if record.status == IdempotencyRecord.Status.COMPLETED:
            return IdempotencyClaim(replay=record)
        if record.locked_at <= now - IDEMPOTENCY_STALE:
            # The first request died before committing (its completion shares the work's
            # transaction, so an in-progress record means the work did not commit).
            taken = _take_over(record, fingerprint, now)
            if taken is not None:
                return IdempotencyClaim(record=taken)
        raise IdempotencyInProgress()
    raise IdempotencyInProgress()


def idempotency_record_completed(
    *, user: Any, key: str, fingerprint: str, status: int, body: Any, headers: dict[str, str]
) -> IdempotencyRecord:
    """The record, not yet saved, of a request whose work and record are written together, in
    one statement (``tasks.services.accept``): completed with its response from the start, as
    ``idempotency_claim`` then ``idempotency_complete`` would leave it. Whoever inserts it must
    do nothing if the key is taken (``ON CONFLICT DO NOTHING``) and then go the ordinary way."""
    now = timezone.now()
    return IdempotencyRecord(
        user=user,
        key=check_idempotency_key(key),
        fingerprint=fingerprint,
        status=IdempotencyRecord.Status.COMPLETED,
        locked_at=now,
        expires_at=now + IDEMPOTENCY_TTL,
        response_status=status,
        response_body=body,
        response_headers=headers,
    )


def idempotency_complete(
    *, record: IdempotencyRecord, status: int, body: Any, headers: dict[str, str]
) -> None:
    """Store the response; call inside the transaction of the work itself.

    Raises IdempotencyInProgress if the claim was taken over meanwhile (the caller's
    transaction must then roll back, so the work happens once).
    """
    done = IdempotencyRecord.objects.filter(
        pk=record.pk, locked_at=record.locked_at, status=IdempotencyRecord.Status.IN_PROGRESS
    ).update(
        status=IdempotencyRecord.Status.COMPLETED,
        response_status=status,
        response_body=body,
        response_headers=headers,
    )
    if not done:
        raise IdempotencyInProgress("This request was superseded by a retry with the same key.")


def idempotency_abandon(*, record: IdempotencyRecord) -> None:
    """Drop our claim so that a retry with the same key runs anew (nothing was committed).

    Called when the work failed, perhaps because the database connection was lost: the claim is
    dropped on a working connection, else a retry would meet ``IdempotencyInProgress`` until
    the claim goes stale."""
    reconnect_if_broken()
    IdempotencyRecord.objects.filter(
        pk=record.pk, locked_at=record.locked_at, status=IdempotencyRecord.Status.IN_PROGRESS
    ).delete()


def idempotency_purge_expired(*, now: Any = None) -> int:
    """Delete records past their 24 h; returns how many."""
    deleted, _ = IdempotencyRecord.objects.filter(expires_at__lt=now or timezone.now()).delete()
    return deleted


# --- refunds of a charge (support) ----------------------------------------------------------


def capture_refund(
    *,
    capture: LedgerTransaction | int,
    amount: int | None,
    actor: Any,
    reason: str,
    idempotency_key: str = "",
) -> LedgerTransaction:
    """Give back all or part of a charge (a ``capture`` transaction), once per key.

    The whole charge, when nothing of it was refunded yet, is its reversal (``reverse``: the
    exact opposite, at most once). A part is a staff ``adjustment`` from revenue to the charged
    account, naming the charge's subject (the task), with the actor and the reason. Together the
    refunds of a charge never exceed it: they are decided under a lock on the charge's hold, so
    two concurrent refunds cannot both pass the check.

    Before: ``capture`` is a capture; ``amount`` (None: all that is left) > 0; actor and reason.
    After: the charged account's balance is higher by ``amount``; revenue lower by as much.
    Raises NotReversible (not a charge, or nothing left of it), InvalidAmount (more than what
    is left), ReasonRequired, IdempotencyKeyReused.
    """
    reason = _required_reason(reason)
    if actor is None:
        raise InvalidAmount("A refund needs the staff member who makes it.", code="actor_required")
    capture_id = capture if isinstance(capture, int) else capture.pk
    with transaction.atomic():
        original = LedgerTransaction.objects.filter(pk=capture_id).first()
        if original is None or original.kind != LedgerTransaction.Kind.CAPTURE:
            raise NotReversible("Only a charge can be refunded.")
        hold = Hold.objects.select_for_update().get(pk=original.hold_id)
        if idempotency_key:
            # After the lock: a concurrent twin has committed by now, and we see its result.
            first = LedgerTransaction.objects.filter(
                idempotency_key=idempotency_key,
                idempotency_scope__in=["reversal", f"account:{hold.account_id}"],
            ).first()
            if first is not None:
                if first.subject_id != original.subject_id or first.actor_id != actor.pk:
                    raise IdempotencyKeyReused()
                return first
        left = hold.captured - capture_refunded(capture=original)
        if left <= 0:
            raise NotReversible("This charge was already refunded in full.")
        amount = left if amount is None else check_micro(amount)
        if amount > left:
            raise InvalidAmount(
                f"At most {format_credits(left)} credits of this charge are left to refund.",
                code="refund_too_large",
                extra={"left_micro": left},
            )
        if amount == hold.captured:
            return reverse(
                txn=original, actor=actor, reason=reason, idempotency_key=idempotency_key
            )
        scope = f"account:{hold.account_id}"
        fingerprint = _fingerprint(
            op="capture_refund", capture=capture_id, amount=amount, reason=reason, actor=actor.pk
        )

        def post() -> LedgerTransaction:
            txn = _new_txn(
                LedgerTransaction.Kind.ADJUSTMENT,
                reason=reason,
                actor=actor,
                scope=scope,
                key=idempotency_key,
                fingerprint=fingerprint,
                subject_type=original.subject_type,
                subject_id=original.subject_id,
            )
            Account.objects.filter(pk=hold.account_id).update(balance=F("balance") + amount)
            _entries(
                txn,
                [(system_account_id(Account.Kind.REVENUE), -amount), (hold.account_id, amount)],
            )
            return txn

        return _once(scope, idempotency_key, fingerprint, post)


def capture_refunded(*, capture: LedgerTransaction) -> int:
    """Micro-credits of a charge given back so far: its reversal, or the partial refunds of
    its subject (``capture_refund``'s adjustments from revenue)."""
    revenue = system_account_id(Account.Kind.REVENUE)
    total = 0
    for txn_id in LedgerTransaction.objects.filter(reversal_of=capture).values_list(
        "pk", flat=True
    ):
        total += -sum(
            Entry.objects.filter(transaction_id=txn_id, account_id=revenue).values_list(
                "amount", flat=True
            )
        )
    total += -sum(
        Entry.objects.filter(
            transaction__kind=LedgerTransaction.Kind.ADJUSTMENT,
            transaction__subject_type=capture.subject_type,
            transaction__subject_id=capture.subject_id,
            account_id=revenue,
        ).values_list("amount", flat=True)
    )
    return total
