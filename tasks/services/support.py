"""Support's safe actions on a task (the admin's task page calls these; issue 15).

Each action goes through the product's own services, needs a reason, and is recorded on the
task's timeline as ``support_<action>`` with ``{actor_id, actor, reason}``; where money moves, the
ledger transaction carries the actor and the reason too. An action that does not apply to the
task as it is now, or would break a ledger invariant, raises ``ActionRefused`` and writes nothing.

Each call carries a one-time ``token`` (the form's hidden UUID). It is claimed as an idempotency
record of the staff member (unique per user and key, completed in the transaction of the work)
and is the idempotency key of the ledger operation: a double-submitted form takes effect once, and
the second call returns ``done=False`` with the first call's message.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.db import transaction

from billing import selectors as billing_selectors
from billing import services as billing
from billing.models import LedgerTransaction
from rivya.errors import DomainError
from rivya.money import format_credits
from tasks.models import AIModel, Task, Upload
from tasks.pricing import task_price
from tasks.services import enqueue
from tasks.services.cancel import task_cancel
from tasks.services.common import SUBJECT, S, record_event
from tasks.services.outcomes import task_fail
from tasks.services.refresh import task_refresh
from tasks.services.submit import task_submit
from tasks.services.upstream import submit_attempts_limit

FAIL_KINDS = ("provider", "infra")


class ActionRefused(DomainError):
    code = "action_refused"
    message = "This action does not apply to the task as it is now."
    status = 409


@dataclass(frozen=True)
class SupportOutcome:
    done: bool  # False: this token was used already; nothing happened this time
    message: str
    new_task_id: str | None = None


def _fingerprint(action: str, task_id: Any) -> str:
    return hashlib.sha256(f"support:{action}:{task_id}".encode()).hexdigest()


def _audit(actor: Any, reason: str, token: str, **extra: Any) -> dict[str, Any]:
    return {
        "actor_id": actor.pk,
        "actor": actor.get_username(),
        "reason": reason,
        "token": token,
        **extra,
    }


def _reason(reason: str) -> str:
    reason = (reason or "").strip()
    if not reason:
        raise ActionRefused(
            "Give a reason: it is recorded with the action.", code="reason_required"
        )
    return reason


def _once(
    *,
    actor: Any,
    token: str,
    action: str,
    task_id: Any,
    work: Callable[[], SupportOutcome],
    atomic: bool = True,
) -> SupportOutcome:
    """Run ``work`` once per (staff member, token). ``atomic``: the work and the completion of
    the claim share one transaction (so "completed" means "the work committed"); else the
    work runs outside any transaction (it talks to the provider) and is safe to repeat."""
    if not token:
        raise ActionRefused("This form has no one-time token; reload it.", code="token_required")
    claim = billing.idempotency_claim(
        user=actor, key=f"support:{token}", fingerprint=_fingerprint(action, task_id)
    )
    if claim.replay is not None:
        body = claim.replay.response_body or {}
        return SupportOutcome(
            done=False,
            message=f"Already done: {body.get('message', '')}".strip(),
            new_task_id=body.get("new_task_id"),
        )
    record = claim.record
    assert record is not None  # noqa: S101 - a claim is a record or a replay

    def complete(outcome: SupportOutcome) -> None:
        billing.idempotency_complete(
            record=record,
            status=200,
            body={"message": outcome.message, "new_task_id": outcome.new_task_id},
            headers={},
        )

    try:
        if atomic:
            with transaction.atomic():
                outcome = work()
                complete(outcome)
        else:
            outcome = work()
            with transaction.atomic():
                complete(outcome)
    except BaseException:
        billing.idempotency_abandon(record=record)
        raise
    return outcome


def _locked(task_id: Any) -> Task:
    """The task row, locked for the rest of the transaction (lock order: task row first)."""
    return Task.objects.select_for_update().get(pk=task_id)


def _require(task: Task, statuses: tuple[str, ...], what: str) -> None:
    if task.status not in statuses:
        raise ActionRefused(
            f"Cannot {what}: the task is {task.status}.",
            code="not_applicable",
            extra={"status": task.status},
        )


# --- re-check -------------------------------------------------------------------------------


def task_support_recheck(*, task_id: Any, actor: Any, reason: str, token: str) -> SupportOutcome:
    """Ask the upstream about the task now: a GENERATING task is refreshed (and finished if its
    job has); a WAITING task is sent again with the same idempotency key (the provider answers
    with its job if one exists). Refused for finished tasks and for a WAITING task flagged stuck
    (it is not sent again: it may crash a worker; cancel it or mark it failed instead)."""
    reason = _reason(reason)

    def work() -> SupportOutcome:
        task = Task.objects.get(pk=task_id)
        _require(task, Task.UNFINISHED, "re-check upstream")
        if task.runtime == AIModel.Runtime.SYNC:
            raise ActionRefused(
                "A single task runs inside its request: there is no upstream job to ask about. "
                "If its process died, the reconciler refunds it at its deadline "
                f"({task.sync_deadline_at:%Y-%m-%d %H:%M:%S} UTC).",
                code="single_task",
            )
        if task.status == S.WAITING and task.submit_attempts >= submit_attempts_limit():
            raise ActionRefused(
                f"Not sent again: {task.submit_attempts} attempts got no answer (flagged stuck). "
                "Check the provider, then cancel or mark failed with a refund.",
                code="submit_stuck",
            )
        with transaction.atomic():
            record_event(
                task.pk,
                "support_recheck",
                f"Re-check upstream by {actor.get_username()}: {reason}",
                **_audit(actor, reason, token, status=task.status),
            )
            if task.status == S.WAITING:
                transaction.on_commit(lambda: enqueue.submit(task.pk), robust=True)
        if task.status == S.GENERATING:
            # Outside any transaction: this asks the provider.
            task_refresh(task_id=task.pk, reason="support")
            task.refresh_from_db()
            return SupportOutcome(True, f"Re-checked upstream: the task is now {task.status}.")
        return SupportOutcome(True, "Queued to be sent again with the same key.")

    return _once(
        actor=actor, token=token, action="recheck", task_id=task_id, work=work, atomic=False
    )


# --- cancel ---------------------------------------------------------------------------------


def task_support_cancel(*, task_id: Any, actor: Any, reason: str, token: str) -> SupportOutcome:
    """Cancel an unfinished task as ``task_cancel`` does (credits released per the model's
    cancel policy, the upstream asked to stop, the user notified). Refused once finished."""
    reason = _reason(reason)

    def work() -> SupportOutcome:
        task = _locked(task_id)
        _require(task, Task.UNFINISHED, "cancel")
        task = task_cancel(task_id=task.pk, actor=actor, reason=reason)
        record_event(
            task.pk,
            "support_cancel",
            f"Cancelled by {actor.get_username()}: {reason}",
            **_audit(actor, reason, token, refunded_micro=task.refunded_micro),
        )
        return SupportOutcome(
            True, f"Cancelled; {format_credits(task.refunded_micro)} credits released."
        )

    return _once(actor=actor, token=token, action="cancel", task_id=task_id, work=work)


# --- mark failed, refunded ------------------------------------------------------------------


def task_support_fail(
    *, task_id: Any, actor: Any, reason: str, token: str, kind: str = "provider"
) -> SupportOutcome:
    """WAITING/GENERATING → FAILED ``support_failed`` (kind ``provider`` or ``infra``), refunded
    in full whatever the failure policy; the provider is asked to stop the job (by its id, or
    by the task's key when a submit may have created one). Refused once finished."""
    reason = _reason(reason)
    if kind not in FAIL_KINDS:
        raise ActionRefused(f"The failure kind is one of {', '.join(FAIL_KINDS)}.")

    def work() -> SupportOutcome:
        task = _locked(task_id)
        _require(task, Task.UNFINISHED, "mark failed")
        task_fail(
            task_id=task.pk,
            code="support_failed",
            message=f"Stopped by support: {reason}",
            kind=kind,
            charge_policy=False,
            cancel_upstream=True,
        )
        if not task.upstream_id and task.submit_attempts:
            # No job id known, but a submit was sent: the cancel asks the provider by key.
            transaction.on_commit(lambda: enqueue.cancel_upstream(task.pk, None), robust=True)
        task.refresh_from_db()
        record_event(
            task.pk,
            "support_fail",
            f"Marked failed by {actor.get_username()}: {reason}",
            **_audit(actor, reason, token, error_kind=kind, refunded_micro=task.refunded_micro),
        )
        return SupportOutcome(
            True, f"Marked failed; {format_credits(task.refunded_micro)} credits refunded."
        )

    return _once(actor=actor, token=token, action="fail", task_id=task_id, work=work)


# --- refund a settled task ------------------------------------------------------------------


def task_charge(task: Task) -> LedgerTransaction | None:
    """The capture that charged the task, if any."""
    hold = billing_selectors.hold_for_subject(subject_type=SUBJECT, subject_id=str(task.pk))
    if hold is None:
        return None
    return LedgerTransaction.objects.filter(hold=hold, kind=LedgerTransaction.Kind.CAPTURE).first()


def task_refundable(task: Task) -> int:
    """Micro-credits of the task's charge not yet given back (0 if nothing was charged)."""
    capture = task_charge(task)
    if capture is None:
        return 0
    return task.charged_micro - billing.capture_refunded(capture=capture)


def task_support_refund(
    *, task_id: Any, actor: Any, reason: str, token: str, amount: int | None = None
) -> SupportOutcome:
    """Give back all (``amount`` None) or part of a finished task's charge
    (``billing.capture_refund``: the whole charge is its reversal; a part an adjustment from
    revenue naming the task). The task's own ``charged_micro`` stays what the hold captured
    (invariant 4); the refund lives in the ledger, with the task as subject. Refused for an
    unfinished or uncharged task and beyond what is left of the charge."""
    reason = _reason(reason)

    def work() -> SupportOutcome:
        task = _locked(task_id)
        _require(task, Task.TERMINAL, "refund a task that has not finished")
        capture = task_charge(task)
        if capture is None or not task.charged_micro:
            raise ActionRefused("Nothing to refund: this task was not charged.", code="no_charge")
        try:
            txn = billing.capture_refund(
                capture=capture,
                amount=amount,
                actor=actor,
                reason=f"Refund of task {task.pk}: {reason}",
                idempotency_key=f"support:{token}",
            )
        except DomainError as exc:
            raise ActionRefused(exc.message, code=exc.code) from exc
        refunded = sum(e.amount for e in txn.entries.all() if e.amount > 0)
        record_event(
            task.pk,
            "support_refund",
            f"{format_credits(refunded)} credits refunded by {actor.get_username()}: {reason}",
            **_audit(actor, reason, token, amount_micro=refunded, transaction_id=txn.pk),
        )
        return SupportOutcome(True, f"Refunded {format_credits(refunded)} credits.")

    return _once(actor=actor, token=token, action="refund", task_id=task_id, work=work)


# --- resubmit -------------------------------------------------------------------------------


def _price_now(task: Task) -> int:
    model = AIModel.objects.filter(slug=task.model_slug, enabled=True).first()
    if model is None:
        raise ActionRefused(f"The model {task.model_slug} is no longer available.")
    durations = list(
        Upload.objects.filter(pk__in=task.upload_ids or []).values_list("duration_ms", flat=True)
    )
    try:
        return task_price(model=model, params=task.params, durations_ms=[d or 0 for d in durations])
    except DomainError as exc:
        raise ActionRefused(exc.message, code=exc.code) from exc


def task_support_resubmit(
    *, task_id: Any, actor: Any, reason: str, token: str, at_our_cost: bool = False
) -> SupportOutcome:
    """Submit a FAILED task again as a new task for its user (same model, prompt, params and
    uploads); both timelines link to each other. The user pays, as for any task; with
    ``at_our_cost`` a recorded grant (actor, reason naming the old task, the token as its key)
    first covers the new task's price. Refused for other statuses, and when the submit is
    refused (too few credits, capacity, inputs no longer valid): then nothing is written."""
    reason = _reason(reason)
    action = "resubmit_free" if at_our_cost else "resubmit"

    def work() -> SupportOutcome:
        task = _locked(task_id)
        _require(task, (S.FAILED,), "resubmit (only a failed task is resubmitted)")
        if task.runtime == AIModel.Runtime.SYNC:
            raise ActionRefused(
                "A single task is answered inside its request: the user sends it again. Refund "
                "it instead if it was charged wrongly.",
                code="single_task",
            )
        grant_id = None
        if at_our_cost:
            price = _price_now(task)
            if price:
                grant_id = billing.grant(
                    user=task.user,
                    amount=price,
                    reason=f"Resubmit of task {task.pk} at our cost: {reason}",
                    actor=actor,
                    idempotency_key=f"support:{token}",
                ).pk
        try:
            outcome = task_submit(
                user=task.user,
                model_slug=task.model_slug,
                prompt=task.prompt,
                params=task.params,
                upload_ids=task.upload_ids,
            )
        except DomainError as exc:
            raise ActionRefused(f"The new task was refused: {exc.message}") from exc
        if not outcome.accepted:
            # Roll back the refused task too: support sees the refusal, the user nothing.
            raise ActionRefused(
                "The user has too few credits for the new task"
                + ("" if at_our_cost else " (Billing may resubmit it at our cost)")
                + ".",
                code="insufficient_credits",
            )
        new = outcome.task
        audit = _audit(actor, reason, token, at_our_cost=at_our_cost, grant_id=grant_id)
        record_event(
            task.pk,
            f"support_{action}",
            f"Resubmitted as task {new.pk} by {actor.get_username()}"
            + (" at our cost" if at_our_cost else "")
            + f": {reason}",
            new_task_id=str(new.pk),
            **audit,
        )
        record_event(
            new.pk,
            "resubmitted_from",
            f"Resubmission of task {task.pk} by {actor.get_username()}: {reason}",
            old_task_id=str(task.pk),
            **audit,
        )
        return SupportOutcome(True, f"Resubmitted as task {new.pk}.", new_task_id=str(new.pk))

    return _once(actor=actor, token=token, action=action, task_id=task_id, work=work)
