"""Cancel and delete."""

from __future__ import annotations

import contextlib
from datetime import timedelta
from typing import Any

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from notifications.models import Notification
from rivya.errors import (
    NotFound,
    TaskFinished,
)
from tasks.models import AIModel, Task
from tasks.providers.registry import get_provider
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
        if not transition_task(
            task_id,
            Task.UNFINISHED,
            S.CANCELLED,
            finished_at=now,
            expires_at=now + result_ttl(task),
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
        settle_task(task, charge, f"{task.model_slug}: cancellation charge ({percent}%)")
        record_event(task_id, "cancelled", message, actor=getattr(actor, "pk", None))
        record_event(
            task_id,
            "credits_captured" if charge else "credits_released",
            f"Billing policy: {percent}% of the price is charged for cancelling work the "
            "provider accepted."
            if charge
            else "Refunded in full.",
            amount_micro=charge or task.reserved_micro,
        )
        if who == "support":
            notify_user(
                task,
                Notification.Kind.GENERATION_CANCELLED,
                "Your generation was cancelled",
                f"{task.model_slug}: {message} "
                + ("Your credits were refunded." if not charge else ""),
            )
        task_webhook_event(task, "cancelled")
        if task.runtime == AIModel.Runtime.ASYNC and (task.upstream_id or task.submit_attempts):
            # A task still WAITING may have a job all the same (a submit answered unclearly):
            # the cancel then asks the provider for it by the task's key.
            transaction.on_commit(
                lambda: enqueue.cancel_upstream(task_id, task.upstream_id or None), robust=True
            )
    task.refresh_from_db()
    return task


def task_cancel_upstream(*, task_id: Any, upstream_id: str | None = None) -> None:
    """Ask the provider to stop the job of a finished task: ``upstream_id``, else the task's
    own job, else a job accepted after it finished (``late_upstream_id``), else whatever job
    the provider has under the task's key (a submit that was answered unclearly may have
    created one). Records it on the task (``upstream_cancel_done_at``): the cancel sweep then
    leaves it. Raises ProviderError (retryable or not); a job that already finished is fine.
    """
    task = Task.objects.filter(pk=task_id).first()
    if task is None or task.status not in Task.TERMINAL:
        return
    provider = get_provider(task.provider)
    target = upstream_id or task.upstream_id or task.late_upstream_id
    if not target:
        if not task.submit_attempts:
            return  # never sent: no job can exist
        job = provider.find_job(str(task.pk))
        if job is None:
            if task.submit_ambiguous_at is None:
                _cancel_done(task, "No job of this task exists upstream; nothing to stop.")
            # Else an unanswered attempt may still create it: the sweep asks again later.
            return
        target = job.upstream_id
    provider.cancel(target)
    _cancel_done(task, "The provider was asked to stop the job.", upstream_id=target)


def _cancel_done(task: Task, message: str, **data: Any) -> None:
    Task.objects.filter(pk=task.pk).update(upstream_cancel_done_at=timezone.now())
    record_event(task.pk, "upstream_cancel_requested", message, **data)


CANCEL_SWEEP_AFTER_S = 600  # longer than a cancel's own retries take
CANCEL_SWEEP_WINDOW_S = 24 * 3600


def task_cancel_upstream_gave_up(*, task_id: Any, upstream_id: str | None, error: str) -> None:
    """The provider kept refusing or failing the cancel: recorded (the sweep leaves it) and on
    the timeline for support (the job may run on; a result it delivers is recorded as late and
    changes nothing)."""
    task = Task.objects.filter(pk=task_id).only("pk", "upstream_id").first()
    if task is None:
        return
    Task.objects.filter(pk=task.pk).update(upstream_cancel_done_at=timezone.now())
    record_event(
        task.pk,
        "upstream_cancel_gave_up",
        f"The provider could not be asked to stop the job: {error[:300]}",
        upstream_id=upstream_id or task.upstream_id,
    )


def cancels_unsent() -> list[str]:
    """Finished tasks whose upstream cancel was requested (``cancel_requested_at``: cancelled,
    given up on, or a job accepted after the task finished) between ``CANCEL_SWEEP_WINDOW_S``
    and ``CANCEL_SWEEP_AFTER_S`` ago and never carried out nor given up
    (``upstream_cancel_done_at``): their message was lost (the broker was down at commit), or
    an unanswered submit may still have created a job. Only tasks that can have a job: one is
    known, or the task was sent at least once."""
    now = timezone.now()
    window = (
        now - timedelta(seconds=CANCEL_SWEEP_WINDOW_S),
        now - timedelta(seconds=CANCEL_SWEEP_AFTER_S),
    )
    return [
        str(pk)
        for pk in Task.objects.filter(
            status__in=Task.TERMINAL,
            cancel_requested_at__range=window,
            upstream_cancel_done_at__isnull=True,
        )
        .filter(~Q(upstream_id="") | ~Q(late_upstream_id="") | Q(submit_attempts__gt=0))
        .values_list("pk", flat=True)[:200]
    ]


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
            record_event(task.pk, "deleted", "Deleted by the user (hidden from their history).")
