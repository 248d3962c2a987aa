"""Ledger in the admin: read-only to everyone; staff adjust credits only through a form that
calls ``billing.services.adjust`` (actor and reason recorded)."""

from __future__ import annotations

import uuid
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html

from billing import services
from billing.models import Account, Entry, Hold, LedgerTransaction
from rivya.errors import DomainError
from rivya.money import format_credits, parse_credits


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class AdjustForm(forms.Form):
    amount = forms.CharField(help_text="Credits, e.g. 5 or -2.5 (at most 6 decimal places).")
    reason = forms.CharField(widget=forms.Textarea(attrs={"rows": 3}), max_length=500)
    # One key per rendered form: a double-submitted form adjusts once.
    idempotency_key = forms.CharField(widget=forms.HiddenInput)

    def clean_amount(self) -> int:
        try:
            return parse_credits(self.cleaned_data["amount"], allow_negative=True)
        except DomainError as exc:
            raise forms.ValidationError(exc.message) from None


@admin.register(Account)
class AccountAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "kind",
        "user",
        "balance_credits",
        "held_credits",
        "available_credits",
        "adjust_link",
    )
    list_filter = ("kind",)
    search_fields = ("user__username", "user__email")
    list_select_related = ("user",)

    @admin.display(description="balance")
    def balance_credits(self, obj: Account) -> str:
        return format_credits(obj.balance)

    @admin.display(description="held")
    def held_credits(self, obj: Account) -> str:
        return format_credits(obj.held)

    @admin.display(description="available")
    def available_credits(self, obj: Account) -> str:
        return format_credits(obj.available)

    @admin.display(description="")
    def adjust_link(self, obj: Account) -> str:
        if obj.kind != Account.Kind.USER:
            return ""
        url = reverse("admin:billing_account_adjust", args=[obj.pk])
        return format_html('<a href="{}">Adjust credits</a>', url)

    def get_urls(self) -> list[Any]:
        return [
            path(
                "<int:pk>/adjust/",
                self.admin_site.admin_view(self.adjust_view),
                name="billing_account_adjust",
            ),
            *super().get_urls(),
        ]

    def adjust_view(self, request: HttpRequest, pk: int) -> HttpResponse:
        if (
            not request.user.has_perm("billing.add_ledgertransaction")
            and not request.user.is_superuser
        ):
            raise PermissionDenied
        account = get_object_or_404(
            Account.objects.select_related("user"), pk=pk, kind=Account.Kind.USER
        )
        form = AdjustForm(
            request.POST or None, initial={"idempotency_key": f"admin-adjust:{uuid.uuid4()}"}
        )
        if request.method == "POST" and form.is_valid():
            try:
                services.adjust(
                    user=account.user,
                    amount=form.cleaned_data["amount"],
                    actor=request.user,
                    reason=form.cleaned_data["reason"],
                    idempotency_key=form.cleaned_data["idempotency_key"],
                )
            except DomainError as exc:
                form.add_error(None, exc.message)
            else:
                messages.success(
                    request,
                    f"Adjusted {account.user} by "
                    f"{format_credits(form.cleaned_data['amount'])} credits.",
                )
                return redirect("admin:billing_account_changelist")
        context = {
            **self.admin_site.each_context(request),
            "title": f"Adjust credits: {account.user}",
            "form": form,
            "account": account,
            "opts": self.model._meta,
        }
        return TemplateResponse(request, "admin/billing/adjust.html", context)


class EntryInline(admin.TabularInline):
    model = Entry
    fields = ("account", "amount", "created_at")
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(LedgerTransaction)
class LedgerTransactionAdmin(ReadOnlyAdmin):
    list_display = ("id", "kind", "created_at", "subject_type", "subject_id", "actor", "reason")
    list_filter = ("kind",)
    search_fields = ("subject_id", "reason", "idempotency_key")
    inlines = [EntryInline]


@admin.register(Entry)
class EntryAdmin(ReadOnlyAdmin):
    list_display = ("id", "transaction", "account", "amount", "created_at")
    list_select_related = ("transaction", "account")


@admin.register(Hold)
class HoldAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "account",
        "subject_type",
        "subject_id",
        "amount",
        "captured",
        "status",
        "created_at",
        "resolved_at",
    )
    list_filter = ("status", "subject_type")
    search_fields = ("subject_id",)
