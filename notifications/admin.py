from __future__ import annotations

from django.contrib import admin

from notifications.models import Notification


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
