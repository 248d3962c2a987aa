"""Durable notifications: what happened to the user's work and money, kept until read."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q


class Notification(models.Model):
    class Kind(models.TextChoices):
        GENERATION_SUCCESS = "generation_success", "Generation finished"
        GENERATION_FAILED = "generation_failed", "Generation failed"
        GENERATION_REJECTED = "generation_rejected", "Generation rejected"
        GENERATION_CANCELLED = "generation_cancelled", "Generation cancelled"
        INSUFFICIENT_CREDITS = "insufficient_credits", "Not enough credits"
        RESULTS_EXPIRING = "results_expiring", "Results expiring soon"
        CREDITS = "credits", "Credits"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    # No index of its own: notification_user_recent (user, …) serves lookups by user.
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        related_name="notifications",
        db_index=False,
    )
    kind = models.CharField(max_length=32, choices=Kind.choices)
    title = models.CharField(max_length=200)
    body = models.TextField(blank=True)
    # What it is about, by generic reference (notifications imports no task model).
    subject_type = models.CharField(max_length=64, blank=True)
    subject_id = models.CharField(max_length=64, blank=True)
    link = models.CharField(max_length=500, blank=True)
    read_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        constraints = [
            # One notification per outcome of a subject: a duplicated callback or a retried
            # worker cannot notify twice.
            models.UniqueConstraint(
                fields=["user", "kind", "subject_type", "subject_id"],
                condition=~Q(subject_id=""),
                name="notification_once_per_subject_outcome",
            ),
        ]
        indexes = [
            models.Index(fields=["user", "-created_at"], name="notification_user_recent"),
            models.Index(
                fields=["user"], condition=Q(read_at__isnull=True), name="notification_user_unread"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.kind} for {self.user_id}: {self.title}"
