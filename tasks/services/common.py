"""Helpers shared by the task services: transitions, timeline events, notifications, settlement."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from billing import selectors as billing_selectors
from billing import services as billing
from notifications import webhooks
from notifications.services import notification_create
from tasks.api.serializers import TaskSerializer
from tasks.capacity import capacity_release
from tasks.models import Task, TaskEvent

SUBJECT = "tasks.task"  # how billing and notifications refer to a task
S = Task.Status


def task_event(task_id: Any, kind: str, message: str = "", **data: Any) -> TaskEvent:
    """A timeline event of the task, not saved yet."""
    return TaskEvent(task_id=task_id, kind=kind, message=message[:2000], data=data)


def record_event(task_id: Any, kind: str, message: str = "", **data: Any) -> None:
    task_event(task_id, kind, message, **data).save(force_insert=True)


def transition_task(task_id: Any, sources: Sequence[str], target: str, **fields: Any) -> bool:
    """One conditional UPDATE: True if this call moved the task, False if another got there
    first (or the task is in a state the transition does not leave)."""
    return (
        Task.objects.filter(pk=task_id, status__in=list(sources)).update(status=target, **fields)
        == 1
    )


def task_link(task_id: Any) -> str:
    """Where a notification about the task points: its page in History. (Links stored before
    it had one, ``/history/?task=<id>``, redirect there.)"""
    return f"/history/{task_id}/"


def notify_user(task: Task, kind: str, title: str, body: str) -> None:
    notification_create(
        user=task.user,
        kind=kind,
        title=title,
        body=body,
        subject_type=SUBJECT,
        subject_id=str(task.pk),
        link=task_link(task.pk),
    )


def task_webhook_event(task: Task, name: str) -> int:
    """Record the webhook event ``task.<name>`` (``name`` one of
    ``notifications.webhooks.TASK_EVENTS``) for the account's endpoints and the task's own
    ``webhook_url``, in the transaction of the change it reports. A single task sends
    ``single.completed`` when it finishes instead (its requester got the answer in the
    response; an endpoint may still want it). The payload's ``data`` is the task in its API
    shape as it is after the change."""
    if task.single_type:
        if name not in ("completed", "failed", "cancelled"):
            return 0
        event_type = "single.completed"
    else:
        event_type = f"task.{name}"
    return webhooks.webhook_event_record(
        user_id=task.user_id,
        event_type=event_type,
        subject_type=SUBJECT,
        subject_id=task.pk,
        data=lambda: TaskSerializer.represent(Task.objects.get(pk=task.pk)),
        task_url=task.webhook_url,
        task_events=task.webhook_events,
    )


def result_ttl(task: Task) -> timedelta:
    return timedelta(seconds=task.result_ttl_seconds)


def settle_task(task: Task, charge: int, reason: str) -> None:
    """What the winner of a terminal transition does, in its transaction: give back the
    capacity slots, then capture ``charge`` of the hold (releasing the rest) or release it all.

    Lock order, as in the submit: task row → capacity rows → hold row → account row.
    """
    capacity_release(task=task)
    hold = billing_selectors.hold_for_subject(subject_type=SUBJECT, subject_id=str(task.pk))
    if hold is not None:
        if charge:
            billing.hold_capture(hold=hold, amount=charge, reason=reason)
        else:
            billing.hold_release(hold=hold)


def policy_percent(task: Task, name: str) -> int:
    """A percentage of the task's billing policy, read defensively (0-100; 0 if malformed)."""
    try:
        return min(100, max(0, int(task.billing_policy.get(name, 0) or 0)))
    except (AttributeError, TypeError, ValueError):
        return 0
