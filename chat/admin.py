"""Chat sessions and messages in the support admin: read-only, each assistant turn with its
settlement (tokens, held, charged, given back, uncollected) and its hold, linked to the user."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe

from billing import selectors as billing_selectors
from billing.admin import ReadOnlyAdmin, credits_html
from chat.models import ChatMessage, ChatSession
from chat.services import SUBJECT
from tasks.models import Task


class MessageInline(admin.TabularInline):
    model = ChatMessage
    fk_name = "session"
    fields = ("message_link", "role", "status", "short_content", "charged", "created_at")
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = False
    ordering = ("created_at", "id")

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="message")
    def message_link(self, obj: ChatMessage) -> SafeString:
        url = reverse("admin:chat_chatmessage_change", args=[obj.pk])
        return format_html('<a href="{}">{}…</a>', url, str(obj.pk)[:8])

    @admin.display(description="content")
    def short_content(self, obj: ChatMessage) -> str:
        return obj.content[:120] + ("…" if len(obj.content) > 120 else "")

    @admin.display(description="charged")
    def charged(self, obj: ChatMessage) -> SafeString:
        return credits_html(obj.charged_micro)


@admin.register(ChatSession)
class ChatSessionAdmin(ReadOnlyAdmin):
    list_display = ("title_or_id", "user", "model", "created_at", "updated_at", "deleted_at")
    list_filter = ("model__slug",)
    search_fields = ("=id", "title", "user__username", "user__email")
    list_select_related = ("user", "model")
    readonly_fields = ("id", "user", "model", "title", "created_at", "updated_at", "deleted_at")
    fields = readonly_fields
    inlines = [MessageInline]
    ordering = ("-updated_at",)

    @admin.display(description="session")
    def title_or_id(self, obj: ChatSession) -> str:
        return obj.title or str(obj.pk)


@admin.register(ChatMessage)
class ChatMessageAdmin(ReadOnlyAdmin):
    list_display = (
        "short_id",
        "user",
        "role",
        "status",
        "model_slug",
        "tokens",
        "reserved",
        "charged",
        "refunded",
        "uncollected",
        "created_at",
    )
    list_filter = ("status", "role", "model_slug", "error_kind", "usage_reported")
    search_fields = ("=id", "=session__id", "user__username", "user__email", "content")
    list_select_related = ("user",)
    ordering = ("-created_at",)
    show_full_result_count = False
    fieldsets = (
        (None, {"fields": ("session_link", "user", "role", "status", "model_slug", "content")}),
        (
            "Settlement",
            {
                "fields": (
                    "settlement",
                    "hold",
                    "max_tokens_requested",
                    "max_tokens",
                    "input_tokens_estimate",
                    "input_tokens",
                    "output_tokens",
                    "usage_reported",
                    "finish_reason",
                    "input_price_micro",
                    "output_price_micro",
                )
            },
        ),
        ("Timeline", {"fields": ("timeline",)}),
        (
            "What happened",
            {
                "fields": (
                    "error_code",
                    "error_kind",
                    "error_message",
                    "context_messages",
                    "context_dropped",
                    "client_gone_at",
                    "idempotency_key",
                    "params",
                    "tool_calls",
                    "task_ids",
                    "created_at",
                    "finished_at",
                )
            },
        ),
    )

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        return [
            *(f.name for f in ChatMessage._meta.fields),
            "session_link",
            "settlement",
            "hold",
            "timeline",
        ]

    def get_queryset(self, request: HttpRequest) -> QuerySet[ChatMessage]:
        return super().get_queryset(request).select_related("user", "session")

    @admin.display(description="message", ordering="id")
    def short_id(self, obj: ChatMessage) -> SafeString:
        return format_html('<span title="{}">{}…</span>', obj.pk, str(obj.pk)[:8])

    @admin.display(description="tokens in / out")
    def tokens(self, obj: ChatMessage) -> str:
        if obj.role != ChatMessage.Role.ASSISTANT:
            return "-"
        counted = "" if obj.usage_reported is not False else " (counted)"
        return f"{obj.input_tokens or 0} / {obj.output_tokens or 0}{counted}"

    @admin.display(description="reserved")
    def reserved(self, obj: ChatMessage) -> SafeString:
        return credits_html(obj.reserved_micro)

    @admin.display(description="charged")
    def charged(self, obj: ChatMessage) -> SafeString:
        return credits_html(obj.charged_micro)

    @admin.display(description="refunded")
    def refunded(self, obj: ChatMessage) -> SafeString:
        return credits_html(obj.refunded_micro)

    @admin.display(description="uncollected")
    def uncollected(self, obj: ChatMessage) -> SafeString:
        return credits_html(obj.uncollected_micro)

    @admin.display(description="session")
    def session_link(self, obj: ChatMessage) -> SafeString:
        url = reverse("admin:chat_chatsession_change", args=[obj.session_id])
        return format_html('<a href="{}">{}</a>', url, obj.session)

    @admin.display(description="settlement")
    def settlement(self, obj: ChatMessage) -> str:
        if obj.role != ChatMessage.Role.ASSISTANT:
            return "a user message: nothing billed"
        if not obj.is_finished:
            return f"streaming: {obj.reserved_micro} µ held"
        text = (
            f"held {obj.reserved_micro} µ, charged {obj.charged_micro} µ for "
            f"{obj.input_tokens or 0} in / {obj.output_tokens or 0} out tokens "
            f"({'reported by the provider' if obj.usage_reported else 'counted by Rivya'}), "
            f"released {obj.refunded_micro} µ"
        )
        if obj.uncollected_micro:
            text += f"; {obj.uncollected_micro} µ reported beyond the hold, uncollected"
        return text

    @admin.display(description="hold")
    def hold(self, obj: ChatMessage) -> SafeString | str:
        hold = billing_selectors.hold_for_subject(subject_type=SUBJECT, subject_id=str(obj.pk))
        if hold is None:
            return "no hold"
        url = reverse("admin:billing_hold_change", args=[hold.pk])
        return format_html(
            '<a href="{}">hold {}</a>: {}, {} µ held, {} µ captured',
            url,
            hold.pk,
            hold.status,
            hold.amount,
            hold.captured,
        )

    @admin.display(description="timeline")
    def timeline(self, obj: ChatMessage) -> SafeString:
        """The turn for support: started and held, settled, then each tool the model called,
        refused with its reason or linked to the task it created (its status and credits)."""
        steps = [
            format_html("<li>{}: turn started, {} µ held</li>", obj.created_at, obj.reserved_micro)
        ]
        if obj.finished_at:
            steps.append(
                format_html(
                    "<li>{}: settled {}: {} µ charged, {} µ released</li>",
                    obj.finished_at,
                    obj.status,
                    obj.charged_micro,
                    obj.refunded_micro,
                )
            )
        ids = [r["task_id"] for r in obj.tool_calls or [] if r.get("task_id")]
        tasks = {str(t.pk): t for t in Task.objects.filter(pk__in=ids)}
        for record in obj.tool_calls or []:
            arguments = record.get("arguments")
            prompt = arguments.get("prompt", "") if isinstance(arguments, dict) else arguments
            task = tasks.get(record.get("task_id") or "")
            if task is not None:
                outcome = format_html(
                    '<a href="{}">task {}</a>: {}, {} µ held, {} µ charged, {} µ refunded',
                    reverse("admin:tasks_task_change", args=[task.pk]),
                    str(task.pk)[:8],
                    task.status,
                    task.reserved_micro,
                    task.charged_micro,
                    task.refunded_micro,
                )
            else:
                outcome = mark_safe("no task")  # noqa: S308 - a constant
            error = record.get("error")
            refused = (
                format_html(" (refused: {}: {})", error["code"], error["message"]) if error else ""
            )
            steps.append(
                format_html(
                    "<li>tool call {} <code>{}</code> “{}” ({}): {}{}</li>",
                    record.get("id", ""),
                    record.get("tool", ""),
                    str(prompt)[:200],
                    record.get("model") or "no model",
                    outcome,
                    refused,
                )
            )
        return format_html(
            '<ol class="chat-timeline">{}</ol>', format_html_join("", "{}", ((s,) for s in steps))
        )
