"""Chat sessions and their messages (``docs/chat.md``).

A turn is a user message and the assistant message that answers it. The assistant message
carries the turn's money: what was held (``reserved_micro``), captured (``charged_micro``) and
given back (``refunded_micro``), and what the provider reported beyond the hold
(``uncollected_micro``, never charged). Rows are never hard-deleted: a deleted session keeps its
messages, because the ledger refers to them (``chat.message``).
"""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q

from tasks.models import AIModel


class ChatSession(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="chat_sessions"
    )
    model = models.ForeignKey(AIModel, on_delete=models.PROTECT, related_name="chat_sessions")
    title = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    # Last activity (a turn started or the session was renamed): the list is newest first.
    updated_at = models.DateTimeField(auto_now_add=True)
    deleted_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "chat_session"
        indexes = [
            models.Index(
                fields=["user", "-updated_at", "-id"],
                name="chat_session_user_recent",
                condition=Q(deleted_at=None),
            )
        ]

    def __str__(self) -> str:
        return self.title or f"chat {self.pk}"


class ChatMessage(models.Model):
    """One message of a session. Assistant messages go STREAMING → COMPLETE / FAILED, once,
    through conditional UPDATEs in ``chat.services``; user messages are COMPLETE from the start."""

    class Role(models.TextChoices):
        USER = "user", "User"
        ASSISTANT = "assistant", "Assistant"

    class Status(models.TextChoices):
        STREAMING = "STREAMING", "Streaming"
        COMPLETE = "COMPLETE", "Complete"
        FAILED = "FAILED", "Failed"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    # No index of its own: chat_message_session (session, …) serves lookups by session.
    session = models.ForeignKey(
        ChatSession, on_delete=models.PROTECT, related_name="messages", db_index=False
    )
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="chat_messages"
    )
    role = models.CharField(max_length=16, choices=Role.choices)
    content = models.TextField(blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.COMPLETE)
    # The user message this assistant message answers.
    reply_to = models.OneToOneField(
        "self", on_delete=models.PROTECT, null=True, blank=True, related_name="reply"
    )
    # Snapshot of the model and its prices when the turn started.
    model_slug = models.CharField(max_length=100, blank=True)
    params = models.JSONField(default=dict, blank=True)
    input_price_micro = models.BigIntegerField(default=0)
    output_price_micro = models.BigIntegerField(default=0)
    max_tokens_requested = models.PositiveIntegerField(null=True, blank=True)
    max_tokens = models.PositiveIntegerField(null=True, blank=True)
    input_tokens_estimate = models.PositiveIntegerField(default=0)
    input_tokens = models.PositiveIntegerField(null=True, blank=True)
    output_tokens = models.PositiveIntegerField(null=True, blank=True)
    # True: the provider reported the usage billed; False: counted locally (docs/chat.md).
    usage_reported = models.BooleanField(null=True, blank=True)
    finish_reason = models.CharField(max_length=16, blank=True)
    reserved_micro = models.BigIntegerField(default=0)
    charged_micro = models.BigIntegerField(default=0)
    refunded_micro = models.BigIntegerField(default=0)
    uncollected_micro = models.BigIntegerField(default=0)
    # History left out to fit the context window (oldest first), and what was sent.
    context_dropped = models.PositiveIntegerField(default=0)
    context_messages = models.PositiveIntegerField(default=0)
    error_code = models.CharField(max_length=64, blank=True)
    error_message = models.TextField(blank=True)
    error_kind = models.CharField(max_length=16, blank=True)
    tool_calls = models.JSONField(default=list, blank=True)
    task_ids = models.JSONField(default=list, blank=True)
    idempotency_key = models.CharField(max_length=255, null=True, blank=True)
    request_fingerprint = models.CharField(max_length=64, blank=True)
    # When the client went away mid-stream (closed the connection or pressed Stop); the turn
    # still ran to its end upstream and was settled.
    client_gone_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "chat_message"
        ordering = ["created_at", "id"]
        indexes = [
            models.Index(fields=["session", "created_at", "id"], name="chat_message_session"),
            models.Index(
                fields=["created_at"],
                name="chat_message_streaming",
                condition=Q(status="STREAMING"),
            ),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["user", "idempotency_key"],
                name="chat_message_idempotency_key",
                condition=Q(idempotency_key__isnull=False),
            ),
            models.CheckConstraint(
                name="chat_message_money",
                condition=Q(reserved_micro__gte=0)
                & Q(charged_micro__gte=0)
                & Q(refunded_micro__gte=0)
                & Q(uncollected_micro__gte=0)
                & Q(charged_micro__lte=models.F("reserved_micro")),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.role} message {self.pk}"

    @property
    def is_finished(self) -> bool:
        return self.status != self.Status.STREAMING
