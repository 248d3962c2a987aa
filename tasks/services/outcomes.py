"""Terminal outcomes: SUCCESS, FAILED, REJECTED, each settled in its own transaction."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from django.db import transaction
from django.utils import timezone

from notifications.models import Notification
from rivya.faults import fault_point
from tasks.models import Task
from tasks.pricing import success_charge
from tasks.services import enqueue
from tasks.services.common import (
    S,
    notify_user,
    policy_percent,
    record_event,
    result_ttl,
    settle_task,
    task_webhook_event,
    transition_task,
)


@dataclass(frozen=True)
class StoredOutput:
    name: str
    mime: str
    bytes: int
    width: int | None
    height: int | None
    duration_ms: int | None


def _result_dict(o: StoredOutput) -> dict[str, Any]:
    return {
        "name": o.name,
        "mime": o.mime,
        "bytes": o.bytes,
        "width": o.width,
        "height": o.height,
        "duration_ms": o.duration_ms,
    }


def task_succeed(*, task_id: Any, outputs: Sequence[StoredOutput], notify: bool = True) -> bool:
    """GENERATING → SUCCESS with the stored outputs; capture the price (or, for K of N outputs,
    floor(price × K / N) when the model's policy allows partial success; N is the task's own
    ``num_outputs``, never the provider's report of it: ``tasks.pricing.success_charge``).
    Returns True if this call finished the task; False (and nothing written) if another outcome
    won. ``notify`` False: no notification (a single task whose requester got the answer)."""
    now = timezone.now()
    with transaction.atomic():
        task = Task.objects.select_related("user").get(pk=task_id)
        got = len(outputs)
        charge, wanted = success_charge(
            price_micro=task.price_micro,
            params=task.params,
            policy=task.billing_policy,
            delivered=got,
        )
        if not transition_task(
            task_id,
            [S.GENERATING],
            S.SUCCESS,
            results=[_result_dict(o) for o in outputs],
            finished_at=now,
            started_at=task.started_at or now,
            expires_at=now + result_ttl(task),
            charged_micro=charge,
            refunded_micro=task.reserved_micro - charge,
            outputs_requested=wanted,
            next_poll_at=None,
        ):
            return False
        settle_task(task, charge, f"{task.model_slug} generation")
        fault_point("in_outcome_transaction", task_id)
        record_event(
            task_id,
            "succeeded",
            f"{got} of {wanted} output(s) stored.",
            outputs=got,
            requested=wanted,
        )
        record_event(
            task_id,
            "credits_captured",
            "Partial success: charged for the outputs delivered." if got < wanted else "",
            amount_micro=charge,
            released_micro=task.reserved_micro - charge,
        )
        if notify:
            notify_user(
                task,
                Notification.Kind.GENERATION_SUCCESS,
                "Your generation is ready",
                f"{task.model_slug}: {got} result(s) ready"
                + (
                    f" ({wanted - got} could not be produced; you were charged only for "
                    "what was delivered)"
                    if got < wanted
                    else ""
                )
                + ".",
            )
        task_webhook_event(task, "completed")
    return True


FAILURE_TITLES = {
    S.FAILED: (Notification.Kind.GENERATION_FAILED, "Your generation failed"),
    S.REJECTED: (Notification.Kind.GENERATION_REJECTED, "Your request was rejected"),
}


def task_fail(
    *,
    task_id: Any,
    code: str,
    message: str,
    kind: str,
    status: str = S.FAILED,
    sources: Sequence[str] = Task.UNFINISHED,
    charge_policy: bool = True,
    cancel_upstream: bool = False,
    notify: bool = True,
) -> bool:
    """→ FAILED or REJECTED with the error; release the hold, or capture the share the model's
    policy charges for failures after upstream acceptance (REJECTED never charges; nor does a
    failure with ``charge_policy`` False). With ``cancel_upstream``, the provider is asked after
    commit to stop the task's job (we give up on a job that may still be running), and the
    cancel sweep retries it if that message is lost. ``notify`` False: no notification (a
    single task whose requester got the error in the response). Returns True if this call
    finished the task."""
    now = timezone.now()
    with transaction.atomic():
        task = Task.objects.select_related("user").get(pk=task_id)
        percent = policy_percent(task, "failure_charge_percent")
        accepted = task.submitted_at is not None
        charge = (
            task.reserved_micro * percent // 100
            if status == S.FAILED and accepted and percent and charge_policy
            else 0
        )
        if not transition_task(
            task_id,
            sources,
            status,
            error_code=code[:64],
            error_message=message,
            error_kind=kind,
            finished_at=now,
            expires_at=now + result_ttl(task),
            charged_micro=charge,
            refunded_micro=task.reserved_micro - charge,
            next_poll_at=None,
            **({"cancel_requested_at": now} if cancel_upstream and task.upstream_id else {}),
        ):
            return False
        settle_task(task, charge, f"{task.model_slug}: failure charge ({percent}%)")
        if cancel_upstream and task.upstream_id:
            upstream_id = task.upstream_id
            transaction.on_commit(
                lambda: enqueue.cancel_upstream(task_id, upstream_id), robust=True
            )
        record_event(task_id, status.lower(), message, code=code, error_kind=kind)
        record_event(
            task_id,
            "credits_captured" if charge else "credits_released",
            f"Billing policy: {percent}% of the price is charged for failures after the "
            "provider accepted the job."
            if charge
            else "Refunded in full.",
            amount_micro=charge or task.reserved_micro,
        )
        if notify:
            notif_kind, title = FAILURE_TITLES.get(status, FAILURE_TITLES[S.FAILED])
            refund = (
                "Your credits were refunded."
                if not charge
                else (f"Per this model's billing policy {percent}% was charged.")
            )
            notify_user(task, notif_kind, title, f"{task.model_slug}: {message} {refund}")
        # REJECTED too: its error says why.
        task_webhook_event(task, "failed")
    return True
