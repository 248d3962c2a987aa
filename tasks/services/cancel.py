"""Cancel and delete."""

from __future__ import annotations

import contextlib
from datetime import timedelta
from typing import Any

from django.db import transaction
from django.utils import timezone

from notifications.models import Notification
from rivya.errors import (
    NotFound,
    TaskFinished,
)
from tasks.models import Task, TaskEvent
from tasks.providers.registry import get_provider
from tasks.services import enqueue
from tasks.services.common import S, _event, _notify, _settle, _transition, _ttl, policy_percent


def task_cancel(*, task_id: Any, actor: Any = None, reason: str = "") -> Task:
    """WAITING/GENERATING → CANCELLED; credits released (or, for work the provider accepted and
    bills, the model's ``cancel_charge_percent``); the upstream cancel is requested after commit.

    Cancelling a CANCELLED task returns it unchanged; any other finished task raises
    TaskFinished (409). A result that arrives later is recorded on the timeline only.
    """
    now = timezone.now()
    with transaction.atomic():
        task = Task.objects.select_related("user").get(pk=task_id)
        who = "support" if actor is not None and actor.pk != task.user_id else "you"
        message = f"Cancelled by {who}." + (f" {reason}" if reason else "")
        if not _transition(
            task_id,
            Task.UNFINISHED,
            S.CANCELLED,
            finished_at=now,
            expires_at=now + _ttl(task),
            error_code="cancelled",
            error_message=message,
            error_kind="user",
            next_poll_at=None,
            cancel_requested_at=now,
        ):
            task.refresh_from_db()
            if task.status == S.CANCELLED:
                return task
            raise TaskFinished(
                f"This task already finished ({task.status}).", extra={"status": task.status}
            )
        # Re-read under our row lock: a concurrent submission may have stored the upstream id.
        task.refresh_from_db()
        percent = policy_percent(task, "cancel_charge_percent")
        charge = task.reserved_micro * percent // 100 if task.submitted_at and percent else 0
        Task.objects.filter(pk=task_id).update(
            charged_micro=charge, refunded_micro=task.reserved_micro - charge
        )
        _settle(task, charge, f"{task.model_slug}: cancellation charge ({percent}%)")
        _event(task_id, "cancelled", message, actor=getattr(actor, "pk", None))
        _event(
            task_id,
            "credits_captured" if charge else "credits_released",
            f"Billing policy: {percent}% of the price is charged for cancelling work the "
            "provider accepted."
            if charge
            else "Refunded in full.",
            amount_micro=charge or task.reserved_micro,
        )
        if who == "support":
            _notify(
                task,
                Notification.Kind.GENERATION_CANCELLED,
                "Your generation was cancelled",
                f"{task.model_slug}: {message} "
                + ("Your credits were refunded." if not charge else ""),
            )
        if task.upstream_id:
            transaction.on_commit(
                lambda: enqueue.cancel_upstream(task_id, task.upstream_id), robust=True
            )
    task.refresh_from_db()
    return task


def task_cancel_upstream(*, task_id: Any, upstream_id: str | None = None) -> None:
    """Ask the provider to stop a job of a finished task: its own job, or ``upstream_id`` (a job
    accepted after the task was already cancelled). Raises ProviderError (retryable or not);
    the job stopping or having finished already are both fine."""
    task = Task.objects.filter(pk=task_id).first()
    upstream_id = upstream_id or (task.upstream_id if task else None)
    if task is None or not upstream_id or task.status not in Task.TERMINAL:
        return
    get_provider(task.provider).cancel(upstream_id)
    _event(
        task_id,
        "upstream_cancel_requested",
        "The provider was asked to stop the job.",
        upstream_id=upstream_id,
    )


CANCEL_SWEEP_AFTER_S = 600  # longer than a cancel's own retries take
CANCEL_SWEEP_WINDOW_S = 24 * 3600


def task_cancel_upstream_gave_up(*, task_id: Any, upstream_id: str | None, error: str) -> None:
    """The provider kept refusing or failing the cancel: on the timeline for support (the job
    may run on; a result it delivers is recorded as late and changes nothing)."""
    task = Task.objects.filter(pk=task_id).only("pk", "upstream_id").first()
    if task is None:
        return
    _event(
        task.pk,
        "upstream_cancel_gave_up",
        f"The provider could not be asked to stop the job: {error[:300]}",
        upstream_id=upstream_id or task.upstream_id,
    )


def cancels_unsent() -> list[tuple[str, str | None]]:
    """Upstream cancels that were never carried out, neither done nor given up: their message
    was lost (the broker was down at commit). ``(task id, job id or None for the task's own)``
    for jobs of tasks whose cancel was requested (``cancel_requested_at``: cancelled, or failed
    giving up on a job that may still run) between ``CANCEL_SWEEP_WINDOW_S`` and
    ``CANCEL_SWEEP_AFTER_S`` ago, and for jobs accepted after a cancel
    (``late_upstream_acceptance``)."""
    now = timezone.now()
    window = (
        now - timedelta(seconds=CANCEL_SWEEP_WINDOW_S),
        now - timedelta(seconds=CANCEL_SWEEP_AFTER_S),
    )
    done = ["upstream_cancel_requested", "upstream_cancel_gave_up"]
    found: list[tuple[str, str | None]] = [
        (str(pk), None)
        for pk in Task.objects.filter(status__in=Task.TERMINAL, cancel_requested_at__range=window)
        .exclude(upstream_id="")
        .exclude(events__kind__in=done)
        .values_list("pk", flat=True)[:200]
    ]
    late = list(
        TaskEvent.objects.filter(
            kind="late_upstream_acceptance", created_at__range=window
        ).values_list("task_id", "data__upstream_id")[:200]
    )
    handled = set(
        TaskEvent.objects.filter(
            task_id__in={task_id for task_id, _ in late}, kind__in=done
        ).values_list("task_id", "data__upstream_id")
    )
    found += [
        (str(task_id), upstream_id)
        for task_id, upstream_id in late
        if upstream_id and (task_id, upstream_id) not in handled
    ]
    return found


def task_delete(*, user: Any, task_id: Any) -> None:
    """Remove a task from the user's history at once (a running one is cancelled first).

    Soft delete: the row, its billing and its timeline stay for support; its files follow the
    expiry rules. Raises NotFound for someone else's (or an already deleted) task.
    """
    task = Task.objects.filter(pk=task_id, user=user, deleted_at__isnull=True).first()
    if task is None:
        raise NotFound("No such task.")
    if task.status in Task.UNFINISHED:
        with contextlib.suppress(TaskFinished):  # it finished meanwhile: delete it as it is
            task_cancel(task_id=task.pk, actor=user)
    with transaction.atomic():
        if Task.objects.filter(pk=task.pk, deleted_at__isnull=True).update(
            deleted_at=timezone.now()
        ):
            _event(task.pk, "deleted", "Deleted by the user (hidden from their history).")
