"""Notifications, and outbound webhooks in the support admin: endpoints, messages and their
attempts, read-only (secrets never shown), searchable by task id; messages can be resent by
staff with ``notifications.resend_webhookmessage``."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from billing.admin import ReadOnlyAdmin
from notifications import webhooks
from notifications.models import Notification, WebhookAttempt, WebhookEndpoint, WebhookMessage


@admin.register(Notification)
class NotificationAdmin(admin.ModelAdmin):
    list_display = ("created_at", "user", "kind", "title", "subject_id", "read_at")
    list_filter = ("kind",)
    search_fields = ("user__username", "subject_id", "title")
    readonly_fields = (
        "id",
        "user",
        "kind",
        "title",
        "body",
        "subject_type",
        "subject_id",
        "link",
        "created_at",
    )


@admin.register(WebhookEndpoint)
class WebhookEndpointAdmin(ReadOnlyAdmin):
    list_display = ("url", "user", "enabled", "failing_since", "event_types", "created_at")
    list_filter = ("enabled",)
    search_fields = ("=id", "url", "user__username", "user__email")
    list_select_related = ("user",)
    fields = (
        "id",
        "user",
        "url",
        "description",
        "event_types",
        "enabled",
        "disabled_reason",
        "failing_since",
        "rotated_at",
        "previous_until",
        "created_at",
        "updated_at",
    )
    readonly_fields = fields
    ordering = ("-created_at",)


class AttemptInline(admin.TabularInline):
    model = WebhookAttempt
    fields = (
        "number",
        "trigger",
        "started_at",
        "url",
        "status_code",
        "succeeded",
        "latency_ms",
        "error",
        "response_body",
    )
    readonly_fields = fields
    extra = 0
    can_delete = False
    ordering = ("number", "id")

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(WebhookMessage)
class WebhookMessageAdmin(ReadOnlyAdmin):
    list_display = (
        "created_at",
        "event_type",
        "user",
        "url",
        "status",
        "attempts",
        "last_status_code",
        "next_attempt_at",
        "subject_id",
    )
    list_filter = ("status", "event_type")
    # A task id finds every message about the task; a message id, event id or URL the rest.
    search_fields = ("=subject_id", "=id", "=event_id", "url", "user__username", "user__email")
    list_select_related = ("user",)
    fields = (
        "id",
        "webhook_id",
        "event_id",
        "event_type",
        "user",
        "endpoint",
        "for_task_url",
        "url",
        "subject_type",
        "subject_id",
        "status",
        "attempts",
        "next_attempt_at",
        "lease_until",
        "last_status_code",
        "last_error",
        "created_at",
        "finished_at",
        "payload",
    )
    readonly_fields = fields
    inlines = [AttemptInline]
    ordering = ("-created_at",)
    actions = ["resend"]

    def has_resend_permission(self, request: HttpRequest) -> bool:
        return bool(request.user.has_perm("notifications.resend_webhookmessage"))

    @admin.action(description="Resend the selected messages now", permissions=["resend"])
    def resend(self, request: HttpRequest, queryset: QuerySet[WebhookMessage]) -> None:
        count = 0
        for message in queryset:
            webhooks.webhook_resend(message=message)
            count += 1
        self.message_user(
            request,
            f"{count} message(s) queued to be sent again; their attempts appear below each.",
            messages.SUCCESS,
        )
