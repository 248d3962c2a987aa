"""Catalog editing, and support's task list and task page (issue 15): computed filters for the
tasks that need a look, and one read-only page per task with its whole timeline, result
previews, a diagnosis in words and the safe actions (tasks.admin_actions)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.contrib import admin
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.files.storage import default_storage
from django.db.models import (
    CharField,
    DateTimeField,
    DurationField,
    Exists,
    ExpressionWrapper,
    F,
    OuterRef,
    Q,
    QuerySet,
    Value,
)
from django.db.models.functions import Cast, Coalesce
from django.http import FileResponse, Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import NoReverseMatch, URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.timesince import timesince

from billing import selectors as billing_selectors
from rivya.money import format_credits
from tasks import selectors
from tasks.admin_actions import action_links, action_urls
from tasks.models import AIModel, CallbackDelivery, Dataset, DatasetFile, Task, Upload
from tasks.selectors import TASK_SUBJECT

ONE_SECOND = Value(timedelta(seconds=1), output_field=DurationField())


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


class StuckFilter(admin.SimpleListFilter):
    """WAITING or GENERATING past the model's timeout, counted from the provider's acceptance
    (from creation while never accepted), in SQL."""

    title = "stuck"
    parameter_name = "stuck"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("yes", "Past the model's timeout")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Task]) -> QuerySet[Task]:
        if self.value() != "yes":
            return queryset
        deadline = ExpressionWrapper(
            Coalesce("submitted_at", "created_at")
            + ExpressionWrapper(F("timeout_seconds") * ONE_SECOND, output_field=DurationField()),
            output_field=DateTimeField(),
        )
        return (
            queryset.filter(status__in=Task.UNFINISHED)
            .alias(deadline=deadline)
            .filter(deadline__lt=timezone.now())
        )


class ChargedWithoutOutputFilter(admin.SimpleListFilter):
    """Charged (net of refunds) with nothing to show for it: not a success, or a success with
    no results."""

    title = "charged without output"
    parameter_name = "charged_no_output"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("yes", "Charged, no output")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Task]) -> QuerySet[Task]:
        if self.value() != "yes":
            return queryset
        return queryset.filter(charged_micro__gt=F("refunded_micro")).filter(
            ~Q(status=Task.Status.SUCCESS) | Q(results=[])
        )


class OpenHoldFilter(admin.SimpleListFilter):
    """Finished tasks whose credit hold is still open: a breach of the settlement rule."""

    title = "hold still open"
    parameter_name = "open_hold"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("yes", "Terminal, hold still open")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Task]) -> QuerySet[Task]:
        if self.value() != "yes":
            return queryset
        return queryset.filter(status__in=Task.TERMINAL).filter(
            billing_selectors.open_hold_exists(
                subject_type=TASK_SUBJECT,
                subject_id=Cast(OuterRef("pk"), output_field=CharField()),
            )
        )


class RepeatedFailureFilter(admin.SimpleListFilter):
    """Failed or rejected tasks whose user had the same prompt on the same model fail at least
    once more: someone retrying something that will not work (or paying for it)."""

    title = "same prompt failed repeatedly"
    parameter_name = "repeated_failure"
    FAILED = (Task.Status.FAILED, Task.Status.REJECTED)

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("yes", "Failed 2+ times (same user, model, prompt)")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Task]) -> QuerySet[Task]:
        if self.value() != "yes":
            return queryset
        sibling = Task.objects.filter(
            user=OuterRef("user"),
            model_slug=OuterRef("model_slug"),
            prompt=OuterRef("prompt"),
            status__in=self.FAILED,
        ).exclude(pk=OuterRef("pk"))
        return queryset.filter(status__in=self.FAILED).filter(Exists(sibling))


@admin.register(Task)
class TaskAdmin(admin.ModelAdmin):
    """Support's task list and task page: read-only for everyone; what changes a task goes
    through the safe actions (tasks.admin_actions), which record who did it and why."""

    list_display = (
        "short_id",
        "user",
        "model_name",
        "status",
        "age",
        "reserved",
        "charged",
        "refunded",
        "error_code",
    )
    list_filter = (
        "status",
        StuckFilter,
        FlaggedFilter,
        ChargedWithoutOutputFilter,
        OpenHoldFilter,
        RepeatedFailureFilter,
        "category",
        "runtime",
        "single_type",
        "model_slug",
        "provider",
        "error_kind",
        ("created_at", admin.DateFieldListFilter),
    )
    search_fields = ("id", "upstream_id", "user__username", "user__email", "prompt")
    search_help_text = "Task id, upstream id, username, email or prompt text."
    list_select_related = ("user",)
    date_hierarchy = None
    ordering = ("-created_at",)
    show_full_result_count = False
    change_form_template = "admin/tasks/task/change_form.html"

    def get_queryset(self, request: HttpRequest) -> QuerySet[Task]:
        return super().get_queryset(request).select_related("user", "model")

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        return [f.name for f in Task._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Nobody edits a task here, superusers included: the page stays viewable through the
        # view permission (Django then shows it read-only without Save), and a POST to it is
        # refused. Changes go through the safe actions, which have their own permissions.
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # tasks are never hard-deleted

    # --- list columns ---------------------------------------------------------------------

    @admin.display(description="task", ordering="id")
    def short_id(self, obj: Task) -> str:
        # The full id is in the title and the link; search takes it whole.
        return format_html('<span title="{}">{}…</span>', obj.pk, str(obj.pk)[:8])

    @admin.display(description="model", ordering="model_slug")
    def model_name(self, obj: Task) -> str:
        return obj.model_slug

    @admin.display(description="age", ordering="created_at")
    def age(self, obj: Task) -> str:
        return f"{timesince(obj.created_at)} ago"

    @admin.display(description="reserved", ordering="reserved_micro")
    def reserved(self, obj: Task) -> str:
        return format_credits(obj.reserved_micro)

    @admin.display(description="charged", ordering="charged_micro")
    def charged(self, obj: Task) -> str:
        return format_credits(obj.charged_micro)

    @admin.display(description="refunded", ordering="refunded_micro")
    def refunded(self, obj: Task) -> str:
        return format_credits(obj.refunded_micro)

    # --- the task page --------------------------------------------------------------------

    def get_urls(self) -> list[URLPattern]:
        own = [
            path(
                "<path:object_id>/result/<int:n>/",
                self.admin_site.admin_view(self.result_view),
                name="tasks_task_result",
            ),
        ]
        # Before the default URLs: their "<path:object_id>/" would swallow these.
        return action_urls(self) + own + super().get_urls()

    def render_change_form(
        self,
        request: HttpRequest,
        context: dict[str, Any],
        add: bool = False,
        change: bool = False,
        form_url: str = "",
        obj: Any = None,
    ) -> Any:
        if obj is not None:
            timeline = selectors.task_support_timeline(task=obj)
            context.update(
                timeline=[(item, self._item_link(item)) for item in timeline],
                diagnosis=selectors.task_diagnosis(task=obj, timeline=timeline),
                previews=self._previews(obj),
                action_links=action_links(request, obj),
                money=[
                    ("price", format_credits(obj.price_micro)),
                    ("reserved", format_credits(obj.reserved_micro)),
                    ("charged", format_credits(obj.charged_micro)),
                    ("refunded", format_credits(obj.refunded_micro)),
                ],
            )
        context.update(
            show_save=False,
            show_save_and_continue=False,
            show_save_and_add_another=False,
            show_delete=False,
            show_delete_link=False,
        )
        return super().render_change_form(request, context, add, change, form_url, obj)

    def _previews(self, task: Task) -> list[dict[str, Any]]:
        if not task.results_available:
            return []
        previews = []
        for n, result in enumerate(task.results):
            mime = str(result.get("mime", ""))
            kind = mime.split("/", 1)[0]
            previews.append(
                {
                    "n": n,
                    "kind": kind if kind in ("image", "video", "audio") else "file",
                    "mime": mime,
                    "url": reverse("admin:tasks_task_result", args=[task.pk, n]),
                    "bytes": result.get("bytes"),
                    "width": result.get("width"),
                    "height": result.get("height"),
                    "duration_ms": result.get("duration_ms"),
                }
            )
        return previews

    def _item_link(self, item: selectors.TimelineItem) -> str:
        names = {
            "ledger": (
                "admin:billing_ledgertransaction_change",
                (item.data or {}).get("transaction_id"),
            ),
            "hold": ("admin:billing_hold_change", item.ref),
            "callback": ("admin:tasks_callbackdelivery_change", item.ref),
        }
        if item.source not in names:
            return ""
        name, pk = names[item.source]
        try:
            return reverse(name, args=[pk])
        except NoReverseMatch:
            return ""

    def result_view(self, request: HttpRequest, object_id: str, n: int) -> HttpResponse:
        """A result file of any task, for support's previews: staff with the view permission
        only (``admin_view`` sends others to the login page), served exactly as the results
        API serves its owner (the stored type, never sniffed, sandboxed)."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        try:
            task = Task.objects.filter(pk=object_id).first()
        except (ValueError, ValidationError):
            task = None
        if task is None or not task.results_available or not 0 <= n < len(task.results):
            raise Http404("No such result.")
        result = task.results[n]
        name = result["name"]
        try:
            file_path = default_storage.path(name)
        except NotImplementedError:  # object storage: a signed, expiring URL
            return HttpResponseRedirect(default_storage.url(name))
        try:
            handle = open(file_path, "rb")  # noqa: SIM115 - FileResponse closes it
        except FileNotFoundError:
            raise Http404("The result file is gone.") from None
        response = FileResponse(handle, content_type=result["mime"])
        response["X-Content-Type-Options"] = "nosniff"
        response["Content-Security-Policy"] = "sandbox; default-src 'none'"
        ext = name.rsplit(".", 1)[-1]
        response["Content-Disposition"] = f'inline; filename="{task.pk}-{n}.{ext}"'
        response["Cache-Control"] = "private, no-store"
        return response


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


class DatasetFileInline(admin.TabularInline):
    model = DatasetFile
    extra = 0
    can_delete = False
    fields = ("position", "original_name", "mime", "bytes", "duration_ms", "file", "sha256")
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Dataset)
class DatasetAdmin(admin.ModelAdmin):
    """The files sent with single tasks (read-only): a FAILED one says which file could not be
    stored and why."""

    list_display = ("id", "user", "purpose", "status", "file_count", "total_bytes", "created_at")
    list_filter = ("status", "purpose")
    search_fields = ("id", "user__username")
    list_select_related = ("user",)
    inlines = [DatasetFileInline]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        return [f.name for f in Dataset._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Upload)
class UploadAdmin(admin.ModelAdmin):
    list_display = ("id", "user", "mime", "bytes", "duration_ms", "created_at")
    search_fields = ("id", "user__username", "sha256")

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        return [f.name for f in Upload._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False
