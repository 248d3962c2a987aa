"""Users and API keys in the admin, and the admin's branding ("Rivya support").

A user's page answers support's first questions at a glance: their credits (balance, held,
available), their recent tasks and their recent ledger entries, each linked to its admin page.
Each panel is one query, whatever the number of tasks or entries."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.contrib.auth.admin import UserAdmin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.template.loader import render_to_string
from django.utils.safestring import SafeString, mark_safe

from billing import selectors as billing_selectors
from billing.admin import credits_html, subject_link
from billing.models import Account
from chat.models import ChatSession
from rivya.models import ApiKey, User
from tasks.models import Task

admin.site.site_header = "Rivya support"
admin.site.site_title = "Rivya support"
admin.site.index_title = "Support"

RECENT_TASKS = 20
RECENT_ENTRIES = 20
RECENT_CHATS = 10


@admin.register(User)
class RivyaUserAdmin(UserAdmin):
    list_display = (*UserAdmin.list_display, "available_credits")
    list_select_related = ("credit_account",)
    fieldsets = (
        (None, {"fields": ("username", "password")}),
        (
            "Credits and activity",
            {"fields": ("credits", "recent_tasks", "recent_chats", "recent_entries")},
        ),
        *UserAdmin.fieldsets[1:],
    )
    readonly_fields = ("credits", "recent_tasks", "recent_chats", "recent_entries")

    def get_queryset(self, request: HttpRequest) -> QuerySet[User]:
        return super().get_queryset(request).select_related("credit_account")

    @admin.display(description="available credits")
    def available_credits(self, obj: User) -> SafeString | str:
        account = _account(obj)
        return credits_html(account.available) if account else "-"

    @admin.display(description="credits")
    def credits(self, obj: User) -> SafeString:
        return _render("credits", account=_account(obj))

    @admin.display(description=f"recent tasks (last {RECENT_TASKS})")
    def recent_tasks(self, obj: User) -> SafeString:
        # Support sees every task, the ones the user deleted from their history included.
        tasks = list(Task.objects.filter(user=obj).order_by("-created_at", "-id")[:RECENT_TASKS])
        return _render("recent_tasks", tasks=tasks, limit=RECENT_TASKS)

    @admin.display(description=f"recent chats (last {RECENT_CHATS})")
    def recent_chats(self, obj: User) -> SafeString:
        sessions = list(
            ChatSession.objects.filter(user=obj)
            .select_related("model")
            .order_by("-updated_at", "-id")[:RECENT_CHATS]
        )
        return _render("recent_chats", sessions=sessions, limit=RECENT_CHATS)

    @admin.display(description=f"recent ledger entries (last {RECENT_ENTRIES})")
    def recent_entries(self, obj: User) -> SafeString:
        entries = [
            (entry, subject_link(entry.transaction.subject_type, entry.transaction.subject_id))
            for entry in billing_selectors.ledger_for_user(user=obj)[:RECENT_ENTRIES]
        ]
        return _render("recent_entries", entries=entries, limit=RECENT_ENTRIES)


def _account(user: User) -> Account | None:
    """The user's credit account, selected with the user (None before any ledger operation)."""
    try:
        return user.credit_account
    except Account.DoesNotExist:
        return None


def _render(name: str, **context: Any) -> SafeString:
    # The template autoescapes; its output is safe HTML.
    return mark_safe(render_to_string(f"admin/rivya/user/{name}.html", context))  # noqa: S308


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ("prefix", "user", "name", "created_at", "last_used_at", "revoked_at")
    search_fields = ("prefix", "user__username", "name")
    readonly_fields = ("user", "prefix", "key_hash", "created_at", "last_used_at")
    fields = ("user", "name", "prefix", "created_at", "last_used_at", "revoked_at")

    def has_add_permission(self, request: object) -> bool:
        return False  # keys are created by their owner (account page) or create_api_key
