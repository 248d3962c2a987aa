"""Writes for notifications."""

from __future__ import annotations

from typing import Any

from django.utils import timezone

from notifications.models import Notification


def notification_create(
    *,
    user: Any,
    kind: str,
    title: str,
    body: str = "",
    subject_type: str = "",
    subject_id: str = "",
    link: str = "",
) -> Notification | None:
    """Create a notification; at most one per (user, kind, subject).

    Meant to run inside the transaction of the state change it reports, so it commits (or rolls
    back) with it. Returns None when that notification already exists.
    """
    notification = Notification(
        user=user,
        kind=kind,
        title=title[:200],
        body=body,
        subject_type=subject_type,
        subject_id=str(subject_id),
        link=link[:500],
    )
    if not subject_id:
        notification.save()
        return notification
    # INSERT ... ON CONFLICT DO NOTHING: the unique constraint, not a prior SELECT, decides.
    # The new row has a fresh uuid4 key, so it exists afterwards only if it was inserted.
    Notification.objects.bulk_create([notification], ignore_conflicts=True)
    return notification if Notification.objects.filter(pk=notification.pk).exists() else None


def notification_mark_read(*, user: Any, notification_id: Any) -> int:
    """Mark one of the user's notifications read; returns 1 if it was unread, else 0."""
    return Notification.objects.filter(user=user, pk=notification_id, read_at__isnull=True).update(
        read_at=timezone.now()
    )


def notification_mark_all_read(*, user: Any) -> int:
    return Notification.objects.filter(user=user, read_at__isnull=True).update(
        read_at=timezone.now()
    )
