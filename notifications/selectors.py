"""Reads of notifications."""

from __future__ import annotations

import uuid
from typing import Any

from django.db.models import Prefetch, QuerySet

from notifications.models import Notification, WebhookAttempt, WebhookEndpoint, WebhookMessage


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


# --- outbound webhooks ----------------------------------------------------------------------------


def _uuid(value: Any) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


def webhook_endpoints_for_user(*, user: Any) -> QuerySet[WebhookEndpoint]:
    return WebhookEndpoint.objects.filter(user=user).order_by("-created_at")


def webhook_messages_for_user(
    *,
    user: Any,
    task_id: Any = None,
    status: str | None = None,
    endpoint_id: Any = None,
) -> QuerySet[WebhookMessage]:
    """The user's messages, newest first; an id that is not one matches nothing."""
    found = WebhookMessage.objects.filter(user=user).order_by("-created_at")
    if task_id is not None:
        task = _uuid(task_id)
        found = (
            found.filter(subject_type="tasks.task", subject_id=str(task)) if task else found.none()
        )
    if status is not None:
        found = found.filter(status=status)
    if endpoint_id is not None:
        endpoint = _uuid(endpoint_id)
        found = found.filter(endpoint_id=endpoint) if endpoint else found.none()
    return found


def webhook_message_get_for_user(*, user: Any, message_id: Any) -> WebhookMessage | None:
    pk = _uuid(message_id)
    if pk is None:
        return None
    return (
        WebhookMessage.objects.filter(user=user, pk=pk)
        .prefetch_related(
            Prefetch("attempts_made", queryset=WebhookAttempt.objects.order_by("number", "id"))
        )
        .first()
    )
