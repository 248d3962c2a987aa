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
        WEBHOOK_ENDPOINT_DISABLED = "webhook_endpoint_disabled", "Webhook endpoint disabled"

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


# --- outbound webhooks (docs/webhooks.md) -----------------------------------------------------


class SigningSecret(models.Model):
    """A Standard Webhooks signing secret (``whsec_…``) with the one it replaced, which keeps
    signing too until ``previous_until`` (the rotation overlap). Stored as is: signing needs
    it; never shown in the admin."""

    secret = models.CharField(max_length=100)
    previous_secret = models.CharField(max_length=100, blank=True)
    previous_until = models.DateTimeField(null=True, blank=True)
    rotated_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        abstract = True


class AccountWebhookSecret(SigningSecret):
    """The account's default secret: it signs deliveries to a task's own ``webhook_url``."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        primary_key=True,
        related_name="webhook_secret",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"webhook secret of {self.user_id}"


class WebhookEndpoint(SigningSecret):
    """A URL of the account's that receives its events (all, or ``event_types``)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(  # indexed by webhook_endpoint_recent
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        related_name="webhook_endpoints",
        db_index=False,
    )
    url = models.CharField(max_length=2000)
    description = models.CharField(max_length=200, blank=True)
    event_types = models.JSONField(default=list, blank=True, help_text="empty: every event")
    enabled = models.BooleanField(default=True)
    # Since when every delivery to it has failed (None after a success): disabled after
    # WEBHOOK_DISABLE_AFTER of it.
    failing_since = models.DateTimeField(null=True, blank=True)
    disabled_reason = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        indexes = [models.Index(fields=["user", "-created_at"], name="webhook_endpoint_recent")]

    def __str__(self) -> str:
        return self.url


class WebhookMessage(models.Model):
    """One event for one destination: the outbox row, written in the transaction of the change
    it reports, then delivered (and retried) by Celery. ``webhook-id`` is ``msg_<id hex>``, the
    same on every attempt and resend, so a receiver can drop duplicates."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"  # to be sent at next_attempt_at
        SENDING = "sending", "Sending"  # a worker holds it until lease_until
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"  # gave up: every attempt failed, or no endpoint to send to
        ABORTED = "aborted", "Stopped by the receiver"  # webhook-delivery: abort-message

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    event_id = models.CharField(max_length=40, help_text="the payload's id: one per event")
    event_type = models.CharField(max_length=40)
    user = models.ForeignKey(  # indexed by webhook_message_recent
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        related_name="webhook_messages",
        db_index=False,
    )
    endpoint = models.ForeignKey(
        WebhookEndpoint,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="messages",
        db_index=False,  # indexed by webhook_message_by_endpoint
    )
    # True: the task's own webhook_url (``url``), signed with the account's secret; False: the
    # endpoint's (its URL at the time of each attempt; not sent once the endpoint is deleted).
    for_task_url = models.BooleanField(default=False)
    url = models.CharField(max_length=2000, help_text="where it went when recorded")
    subject_type = models.CharField(max_length=64, blank=True)
    subject_id = models.CharField(max_length=64, blank=True, db_index=True)
    payload = models.JSONField()
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    lease_until = models.DateTimeField(null=True, blank=True)
    lease_token = models.UUIDField(null=True, blank=True, help_text="whose hold it is")
    # Set by a resend: the next attempt is recorded as one.
    resend_requested_at = models.DateTimeField(null=True, blank=True)
    last_status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    last_error = models.CharField(max_length=300, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        permissions = [("resend_webhookmessage", "Can resend webhook messages")]
        constraints = [
            # An event has one message per destination.
            models.UniqueConstraint(
                fields=["event_id", "endpoint"], name="webhook_message_once_per_endpoint"
            ),
            models.UniqueConstraint(
                fields=["event_id"],
                condition=Q(for_task_url=True),
                name="webhook_message_once_per_task_url",
            ),
        ]
        indexes = [
            models.Index(fields=["user", "-created_at"], name="webhook_message_recent"),
            models.Index(
                fields=["next_attempt_at"],
                condition=Q(status="pending"),
                name="webhook_message_due",
            ),
            models.Index(
                fields=["lease_until"], condition=Q(status="sending"), name="webhook_message_leased"
            ),
            models.Index(fields=["endpoint", "-created_at"], name="webhook_message_by_endpoint"),
        ]

    def __str__(self) -> str:
        return f"{self.event_type} → {self.url}"

    @property
    def webhook_id(self) -> str:
        return f"msg_{self.id.hex}"


class WebhookAttempt(models.Model):
    """One try at delivering a message: what the receiver answered, or why there was no answer."""

    class Trigger(models.TextChoices):
        SCHEDULED = "scheduled", "Scheduled"
        RESEND = "resend", "Resent"

    message = models.ForeignKey(  # indexed by webhook_attempt_once
        WebhookMessage, on_delete=models.CASCADE, related_name="attempts_made", db_index=False
    )
    number = models.PositiveIntegerField()
    trigger = models.CharField(max_length=16, choices=Trigger.choices, default=Trigger.SCHEDULED)
    url = models.CharField(max_length=2000)
    started_at = models.DateTimeField()
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    succeeded = models.BooleanField(default=False)
    latency_ms = models.PositiveIntegerField(default=0)
    response_body = models.TextField(blank=True, help_text="the first bytes of the answer")
    error = models.CharField(max_length=300, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["message", "number"], name="webhook_attempt_once")
        ]

    def __str__(self) -> str:
        return f"attempt {self.number} of {self.message_id}"
