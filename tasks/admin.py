"""Catalog editing and a read-only view of tasks for support (the full support tooling comes
with the admin issue)."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db.models import Q, QuerySet
from django.http import HttpRequest

from tasks.models import AIModel, CallbackDelivery, Task, TaskEvent, Upload


@admin.register(AIModel)
class AIModelAdmin(admin.ModelAdmin):
    list_display = (
        "slug",
        "name",
        "category",
        "provider",
        "runtime",
        "enabled",
        "direct_generation",
        "price_micro",
        "billing_type",
    )
    list_filter = ("category", "provider", "runtime", "enabled")
    search_fields = ("slug", "name", "upstream_model")


class TaskEventInline(admin.TabularInline):
    model = TaskEvent
    fields = ("created_at", "kind", "message", "data")
    readonly_fields = fields
    extra = 0
    can_delete = False
    ordering = ("created_at", "id")

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class FlaggedFilter(admin.SimpleListFilter):
    """Unfinished tasks the lifecycle flagged for support (the fields the decisions read)."""

    title = "flagged for support"
    parameter_name = "flagged"
    FLAGS = {
        "submit_stuck": ("Submit stuck (not sent again)", "submit_stuck_at"),
        "submit_unconfirmed": ("Submit unconfirmed (job may exist)", "submit_unconfirmed_at"),
        "timeout_unconfirmed": ("Past timeout, unconfirmed", "timeout_unconfirmed_at"),
    }

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("any", "Any flag")] + [(key, label) for key, (label, _) in self.FLAGS.items()]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Task]) -> QuerySet[Task]:
        value = self.value()
        if value is None:
            return queryset
        unfinished = queryset.filter(status__in=Task.UNFINISHED)
        if value == "any":
            flagged = Q()
            for _, field in self.FLAGS.values():
                flagged |= Q(**{f"{field}__isnull": False})
            return unfinished.filter(flagged)
        if value in self.FLAGS:
            return unfinished.filter(**{f"{self.FLAGS[value][1]}__isnull": False})
        return queryset


@admin.register(Task)
class TaskAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "user",
        "model_slug",
        "status",
        "created_at",
        "finished_at",
        "price_micro",
        "charged_micro",
        "error_code",
    )
    list_filter = ("status", FlaggedFilter, "category", "provider")
    search_fields = ("id", "upstream_id", "user__username", "user__email")
    list_select_related = ("user",)
    inlines = [TaskEventInline]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        return [f.name for f in Task._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # tasks are never hard-deleted


@admin.register(CallbackDelivery)
class CallbackDeliveryAdmin(admin.ModelAdmin):
    list_display = (
        "received_at",
        "provider",
        "event_id",
        "upstream_id",
        "status",
        "attempts",
        "task",
    )
    list_filter = ("provider", "status")
    search_fields = ("event_id", "upstream_id")

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        return [f.name for f in CallbackDelivery._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False


@admin.register(Upload)
class UploadAdmin(admin.ModelAdmin):
    list_display = ("id", "user", "mime", "bytes", "duration_ms", "created_at")
    search_fields = ("id", "user__username", "sha256")

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        return [f.name for f in Upload._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False
