"""Reads of tasks, the catalog and uploads; every read of user data filters by the owner."""

from __future__ import annotations

import uuid
from typing import Any

from django.db.models import QuerySet

from tasks.models import AIModel, Task, TaskEvent, Upload


def models_enabled() -> QuerySet[AIModel]:
    return AIModel.objects.filter(enabled=True).order_by("category", "name")


def _uuid(value: Any) -> uuid.UUID | None:
    try:
        return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))
    except ValueError:
        return None


def task_get_for_user(*, user: Any, task_id: Any) -> Task | None:
    """The user's own, not deleted task, or None (someone else's task is 'not found')."""
    pk = _uuid(task_id)
    if pk is None:
        return None
    return Task.objects.filter(pk=pk, user=user, deleted_at__isnull=True).first()


def history_for_user(
    *, user: Any, status: str | None = None, category: str | None = None, model: str | None = None
) -> QuerySet[Task]:
    qs = Task.objects.filter(user=user, deleted_at__isnull=True)
    if status:
        qs = qs.filter(status=status.upper())
    if category:
        qs = qs.filter(category=category)
    if model:
        qs = qs.filter(model_slug=model)
    return qs.order_by("-created_at", "-id")


def task_timeline(*, task: Task) -> QuerySet[TaskEvent]:
    return TaskEvent.objects.filter(task=task).order_by("created_at", "id")


def upload_get_for_user(*, user: Any, upload_id: Any) -> Upload | None:
    pk = _uuid(upload_id)
    return Upload.objects.filter(pk=pk, user=user).first() if pk else None
