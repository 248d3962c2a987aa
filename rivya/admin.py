from __future__ import annotations

from django.contrib import admin
from django.contrib.auth.admin import UserAdmin

from rivya.models import ApiKey, User


@admin.register(User)
class RivyaUserAdmin(UserAdmin):
    pass


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ("prefix", "user", "name", "created_at", "last_used_at", "revoked_at")
    search_fields = ("prefix", "user__username", "name")
    readonly_fields = ("user", "prefix", "key_hash", "created_at", "last_used_at")
    fields = ("user", "name", "prefix", "created_at", "last_used_at", "revoked_at")

    def has_add_permission(self, request: object) -> bool:
        return False  # keys are created by their owner (account page) or create_api_key
