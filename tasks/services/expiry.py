"""Result expiry and expiry warnings."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.core.files.storage import default_storage
from django.db import transaction
from django.utils import timezone

from notifications.models import Notification
from tasks.models import Task, TaskEvent
from tasks.services.common import S, notify_user, task_webhook_event


def results_expire_due(*, limit: int = 200) -> int:
    """Purge the result files of finished tasks whose retention is over; returns how many tasks.

    Safe to run twice or concurrently: rows are claimed with SKIP LOCKED and marked in the same
    transaction that deletes their files (a crash before commit leaves them to the next run;
    deleting a missing file is a no-op).
    """
    now = timezone.now()
    with transaction.atomic():
        due = list(
            Task.objects.select_for_update(skip_locked=True)
            .filter(status=S.SUCCESS, results_expired_at__isnull=True, expires_at__lte=now)
            .order_by("expires_at")
            .only("id", "results")[:limit]
        )
        for task in due:
            for result in task.results:
                _delete_stored(result["name"])
        if due:
            Task.objects.filter(pk__in=[t.pk for t in due]).update(results_expired_at=now)
            TaskEvent.objects.bulk_create(
                [
                    TaskEvent(
                        task_id=t.pk,
                        kind="results_expired",
                        message=f"Retention over: {len(t.results)} result file(s) deleted.",
                    )
                    for t in due
                ]
            )
    return len(due)


def _delete_stored(name: str) -> None:
    default_storage.delete(name)
    try:  # filesystem storage: drop the now empty attempt and task directories too
        path = Path(default_storage.path(name)).parent
        for directory in (path, path.parent):
            directory.rmdir()
    except (NotImplementedError, OSError):
        pass


def results_warn_expiring() -> int:
    """One results-expiring notification per successful task, TASK_EXPIRY_WARNING seconds
    before its files are purged. Returns how many were sent."""
    now = timezone.now()
    soon = now + timedelta(seconds=settings.TASK_EXPIRY_WARNING)
    sent = 0
    candidates = Task.objects.select_related("user").filter(
        status=S.SUCCESS,
        results_expired_at__isnull=True,
        expiry_warned_at__isnull=True,
        deleted_at__isnull=True,
        expires_at__gt=now,
        expires_at__lte=soon,
    )[:500]
    for task in candidates:
        with transaction.atomic():
            if Task.objects.filter(pk=task.pk, expiry_warned_at__isnull=True).update(
                expiry_warned_at=now
            ):
                notify_user(
                    task,
                    Notification.Kind.RESULTS_EXPIRING,
                    "Results expiring soon",
                    f"The results of your {task.model_slug} generation will be deleted at "
                    f"{task.expires_at:%Y-%m-%d %H:%M} UTC. Download them before then.",
                )
                task_webhook_event(task, "expiring")
                sent += 1
    return sent
