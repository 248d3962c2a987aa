"""Reads of notifications."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet

from notifications.models import Notification


def notifications_for_user(*, user: Any, unread_only: bool = False) -> QuerySet[Notification]:
    qs = Notification.objects.filter(user=user)
    if unread_only:
        qs = qs.filter(read_at__isnull=True)
    return qs.order_by("-created_at", "-id")


def notification_get_for_user(*, user: Any, notification_id: Any) -> Notification | None:
    return Notification.objects.filter(user=user, pk=notification_id).first()


def unread_count(*, user: Any) -> int:
    return Notification.objects.filter(user=user, read_at__isnull=True).count()


def notifications_center(*, user: Any, limit: int = 100) -> tuple[list[Notification], bool]:
    """The Notifications Center's list: every unread notification first, then the newest read
    ones, newest first within each, at most ``limit`` in all. Returns (notifications, more):
    ``more`` when some were left out (older read ones, or unread beyond ``limit``).

    Two queries, each served by an index (the partial unread one, then ``user, -created_at``),
    rather than one ORDER BY over a computed "is unread" that would sort all of the user's rows.
    """
    unread = list(notifications_for_user(user=user, unread_only=True)[: limit + 1])
    if len(unread) > limit:
        return unread[:limit], True
    room = limit - len(unread)
    read = list(notifications_for_user(user=user).filter(read_at__isnull=False)[: room + 1])
    return unread + read[:room], len(read) > room


def notifications_for_subject(*, subject_type: str, subject_id: Any) -> QuerySet[Notification]:
    """Every notification about a subject (any user's), oldest first. One query."""
    return Notification.objects.filter(
        subject_type=subject_type, subject_id=str(subject_id)
    ).order_by("created_at", "id")
