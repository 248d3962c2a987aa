"""Ledger in the admin: read-only to everyone, superusers included; staff adjust credits only
through a form that calls ``billing.services.adjust`` (actor and reason recorded).

Amounts are shown in credits, with the micro-credits on hover (lists) or beside them (detail
pages); accounts by their user's name; a transaction's subject links to its admin page."""

from __future__ import annotations

import uuid
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import Prefetch, Q, QuerySet, Sum
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect
from django.template.response import TemplateResponse
from django.urls import NoReverseMatch, path, reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from billing import services
from billing.models import Account, Entry, Hold, LedgerTransaction
from rivya.errors import DomainError
from rivya.money import format_credits, parse_credits

# Subjects of holds and transactions ("tasks.task", "<uuid>") whose admin page we can link to.
SUBJECT_ADMIN_URLS = {
    "tasks.task": "admin:tasks_task_change",
    "chat.message": "admin:chat_chatmessage_change",
}


def credits_html(micro: int | None) -> SafeString:
    """An amount for a list column: credits, with the exact micro-credits on hover."""
    micro = int(micro or 0)
    return format_html(
        '<span title="{} micro-credits">{}</span>', f"{micro:,}", format_credits(micro)
    )


def credits_detail(micro: int | None) -> str:
    """An amount for a detail page: credits and the exact micro-credits."""
    micro = int(micro or 0)
    return f"{format_credits(micro)} credits ({micro:,} micro-credits)"


def account_label(account: Account) -> str:
    """A user account by its user's name; a system account by its kind ("issuance")."""
    if account.kind == Account.Kind.USER and account.user is not None:
        return account.user.get_username()
    return account.kind


def account_link(account: Account | None) -> SafeString | str:
    """A user account links to its user's admin page (balance, tasks, ledger); a system account
    to its own page. Needs ``account__user`` selected with the row."""
    if account is None:
        return "-"
    if account.kind == Account.Kind.USER and account.user_id:
        url = reverse("admin:rivya_user_change", args=[account.user_id])
    else:
        url = reverse("admin:billing_account_change", args=[account.pk])
    return format_html('<a href="{}">{}</a>', url, account_label(account))


def subject_link(subject_type: str, subject_id: str) -> SafeString | str:
    """A hold's or transaction's subject, linked to its admin page when it has one."""
    if not subject_type:
        return "-"
    url_name = SUBJECT_ADMIN_URLS.get(subject_type)
    if url_name:
        try:
            url = reverse(url_name, args=[subject_id])
        except NoReverseMatch:
            pass
        else:
            return format_html('<a href="{}">{} {}</a>', url, subject_type, subject_id)
    return f"{subject_type} {subject_id}"


def change_link(url_name: str, obj: Any) -> SafeString | str:
    if obj is None:
        return "-"
    return format_html('<a href="{}">{}</a>', reverse(url_name, args=[obj.pk]), obj)


class ReadOnlyAdmin(admin.ModelAdmin):
    """No add, change or delete for anyone, superusers included: the change view shows the
    fields read-only with no Save button, and a POST to it answers 403."""

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
        "account",
        "balance_credits",
        "held_credits",
        "available_credits",
        "adjust_link",
    )
    list_filter = ("kind",)
    search_fields = ("user__username", "user__email")
    list_select_related = ("user",)
    fields = (
        "kind",
        "account",
        "balance_detail",
        "held_detail",
        "available_detail",
        "created_at",
        "adjust_link",
    )
    readonly_fields = fields

    @admin.display(description="account", ordering="user__username")
    def account(self, obj: Account) -> SafeString | str:
        return account_link(obj)

    @admin.display(description="balance", ordering="balance")
    def balance_credits(self, obj: Account) -> SafeString:
        return credits_html(obj.balance)

    @admin.display(description="held", ordering="held")
    def held_credits(self, obj: Account) -> SafeString:
        return credits_html(obj.held)

    @admin.display(description="available")
    def available_credits(self, obj: Account) -> SafeString:
        return credits_html(obj.available)

    @admin.display(description="balance")
    def balance_detail(self, obj: Account) -> str:
        return credits_detail(obj.balance)

    @admin.display(description="held")
    def held_detail(self, obj: Account) -> str:
        return credits_detail(obj.held)

    @admin.display(description="available")
    def available_detail(self, obj: Account) -> str:
        return credits_detail(obj.available)

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
    fields = ("entry", "account_name", "amount_credits", "created_at")
    readonly_fields = fields
    extra = 0
    can_delete = False

    def get_queryset(self, request: HttpRequest) -> QuerySet[Entry]:
        return super().get_queryset(request).select_related("account__user")

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="entry")
    def entry(self, obj: Entry) -> SafeString | str:
        return change_link("admin:billing_entry_change", obj)

    @admin.display(description="account")
    def account_name(self, obj: Entry) -> SafeString | str:
        return account_link(obj.account)

    @admin.display(description="amount")
    def amount_credits(self, obj: Entry) -> str:
        return credits_detail(obj.amount)


def _transaction_accounts(txn: LedgerTransaction) -> SafeString:
    """The accounts a transaction touches (its entries prefetched with their accounts)."""
    return format_html_join(", ", "{}", ((account_link(e.account),) for e in txn.entries.all()))


@admin.register(LedgerTransaction)
class LedgerTransactionAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "kind",
        "created_at",
        "total_credits",
        "accounts",
        "subject",
        "actor",
        "reason",
    )
    list_filter = ("kind",)
    list_select_related = ("actor",)
    # Support searches by the user's name or email: through the entries' accounts (the changelist
    # turns a search across entries into EXISTS, so a transaction is listed once).
    search_fields = (
        "subject_id",
        "reason",
        "idempotency_key",
        "entries__account__user__username",
        "entries__account__user__email",
    )
    fields = (
        "kind",
        "created_at",
        "total_detail",
        "accounts",
        "subject",
        "actor",
        "reason",
        "hold_link",
        "reversal_of_link",
        "reversed_by_link",
        "idempotency_scope",
        "idempotency_key",
    )
    readonly_fields = fields
    inlines = [EntryInline]

    def get_queryset(self, request: HttpRequest) -> QuerySet[LedgerTransaction]:
        return (
            super()
            .get_queryset(request)
            .select_related("actor", "hold", "reversal_of", "reversed_by")
            .annotate(total=Sum("entries__amount", filter=Q(entries__amount__gt=0)))
            .prefetch_related(
                Prefetch(
                    "entries",
                    queryset=Entry.objects.select_related("account__user").order_by("id"),
                )
            )
        )

    @admin.display(description="amount", ordering="total")
    def total_credits(self, obj: LedgerTransaction) -> SafeString:
        return credits_html(obj.total)

    @admin.display(description="amount")
    def total_detail(self, obj: LedgerTransaction) -> str:
        return credits_detail(obj.total)

    @admin.display(description="accounts")
    def accounts(self, obj: LedgerTransaction) -> SafeString:
        return _transaction_accounts(obj)

    @admin.display(description="subject", ordering="subject_id")
    def subject(self, obj: LedgerTransaction) -> SafeString | str:
        return subject_link(obj.subject_type, obj.subject_id)

    @admin.display(description="hold")
    def hold_link(self, obj: LedgerTransaction) -> SafeString | str:
        return change_link("admin:billing_hold_change", obj.hold)

    @admin.display(description="reversal of")
    def reversal_of_link(self, obj: LedgerTransaction) -> SafeString | str:
        return change_link("admin:billing_ledgertransaction_change", obj.reversal_of)

    @admin.display(description="reversed by")
    def reversed_by_link(self, obj: LedgerTransaction) -> SafeString | str:
        try:
            reversal = obj.reversed_by
        except LedgerTransaction.DoesNotExist:
            return "-"
        return change_link("admin:billing_ledgertransaction_change", reversal)


@admin.register(Entry)
class EntryAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "transaction_link",
        "account_name",
        "amount_credits",
        "subject",
        "created_at",
    )
    list_select_related = ("transaction", "account__user")
    list_filter = ("transaction__kind", "account__kind")
    search_fields = (
        "account__user__username",
        "account__user__email",
        "transaction__subject_id",
    )
    fields = (
        "transaction_link",
        "account_name",
        "amount_detail",
        "subject",
        "reason",
        "created_at",
    )
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> QuerySet[Entry]:
        return super().get_queryset(request).select_related("transaction", "account__user")

    @admin.display(description="transaction", ordering="transaction_id")
    def transaction_link(self, obj: Entry) -> SafeString | str:
        return change_link("admin:billing_ledgertransaction_change", obj.transaction)

    @admin.display(description="account", ordering="account__user__username")
    def account_name(self, obj: Entry) -> SafeString | str:
        return account_link(obj.account)

    @admin.display(description="amount", ordering="amount")
    def amount_credits(self, obj: Entry) -> SafeString:
        return credits_html(obj.amount)

    @admin.display(description="amount")
    def amount_detail(self, obj: Entry) -> str:
        return credits_detail(obj.amount)

    @admin.display(description="subject")
    def subject(self, obj: Entry) -> SafeString | str:
        return subject_link(obj.transaction.subject_type, obj.transaction.subject_id)

    @admin.display(description="reason")
    def reason(self, obj: Entry) -> str:
        return obj.transaction.reason or "-"


@admin.register(Hold)
class HoldAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "account_name",
        "subject",
        "amount_credits",
        "captured_credits",
        "status",
        "created_at",
        "resolved_at",
    )
    list_filter = ("status", "subject_type")
    list_select_related = ("account__user",)
    search_fields = ("subject_id", "account__user__username", "account__user__email")
    fields = (
        "account_name",
        "subject",
        "amount_detail",
        "captured_detail",
        "status",
        "created_at",
        "resolved_at",
    )
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> QuerySet[Hold]:
        return super().get_queryset(request).select_related("account__user")

    @admin.display(description="account", ordering="account__user__username")
    def account_name(self, obj: Hold) -> SafeString | str:
        return account_link(obj.account)

    @admin.display(description="subject", ordering="subject_id")
    def subject(self, obj: Hold) -> SafeString | str:
        return subject_link(obj.subject_type, obj.subject_id)

    @admin.display(description="amount", ordering="amount")
    def amount_credits(self, obj: Hold) -> SafeString:
        return credits_html(obj.amount)

    @admin.display(description="captured", ordering="captured")
    def captured_credits(self, obj: Hold) -> SafeString:
        return credits_html(obj.captured)

    @admin.display(description="amount")
    def amount_detail(self, obj: Hold) -> str:
        return credits_detail(obj.amount)

    @admin.display(description="captured")
    def captured_detail(self, obj: Hold) -> str:
        return credits_detail(obj.captured)
