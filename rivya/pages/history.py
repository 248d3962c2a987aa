"""History: the user's tasks, and one task's page (where notifications link).

The views read through ``tasks.selectors`` and write through ``tasks.services``; what is here
is presentation: which results can still be shown, the error's kind in plain words, and the
timeline told as sentences a person understands.

A single (synchronous) task's row says what it was from its own fields ("Translation en→hi");
only its page reads the stored result back (``single_result``): a list never reads storage per
row.
"""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import path, reverse
from django.utils import timezone
from django.utils.cache import patch_vary_headers
from django.utils.http import url_has_allowed_host_and_scheme
from django.utils.text import capfirst
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from rivya.errors import NotFound, TaskFinished
from rivya.money import credits_phrase
from rivya.pages.common import FAULT, is_htmx, mark_changed, single_label, single_shown
from rivya.pages.task_display import Shown, timeline_steps
from rivya.pages.task_display import model_name as model_name_of
from tasks import selectors, services
from tasks.models import Category, Task
from tasks.single.services import single_result

# --- helpers ------------------------------------------------------------------------------


def _own_task(request: HttpRequest, task_id: uuid.UUID) -> Task:
    task = selectors.task_get_for_user(user=request.user, task_id=task_id)
    if task is None:
        raise Http404("No such task.")
    return task


def _back(request: HttpRequest, value: str | None) -> str:
    """Where to return after an action: a History address of this site, else History."""
    if (
        value
        and value.startswith("/history/")
        and url_has_allowed_host_and_scheme(value, allowed_hosts={request.get_host()})
    ):
        return value
    return reverse("history")


@dataclass
class ShownTask(Shown):
    """A task as History shows it, with a single task's label (from its own fields)."""

    @property
    def single_label(self) -> str:
        return single_label(self.task)


def _one(request: HttpRequest, task: Task, *, model_name: str | None = None) -> ShownTask:
    return ShownTask(task=task, model_name=model_name or model_name_of(task), now=timezone.now())


# --- the list -----------------------------------------------------------------------------


FILTERS = ("q", "category", "status", "model")


@login_required
@require_GET
def history(request: HttpRequest) -> HttpResponse:
    """The user's tasks, newest first, filtered, a page at a time (keyset cursors).

    ``?task=<id>``: the address notifications used before tasks had pages; redirects there."""
    if "task" in request.GET:
        try:
            task_id = uuid.UUID(request.GET["task"])
        except ValueError:
            raise Http404("No such task.") from None
        return redirect("history-task", task_id=task_id)

    values = {name: request.GET.get(name, "").strip() for name in FILTERS}
    values["status"] = values["status"].upper()
    errors = selectors.history_filter_errors(**values)
    models = list(selectors.history_filter_models().values("slug", "name", "category"))
    names = {m["slug"]: m["name"] for m in models}
    page = None
    shown: list[ShownTask] = []
    if not errors:
        page = selectors.history_page(
            user=request.user,
            cursor=request.GET.get("cursor") or None,
            **{k: v or None for k, v in values.items()},
        )
        now = timezone.now()
        shown = [
            ShownTask(task=t, model_name=names.get(t.model_slug, t.model_slug), now=now)
            for t in page.tasks
        ]
    present = {m["category"] for m in models}
    context = {
        "values": values,
        "errors": errors,
        "filtered": any(values.values()),
        "page": page,
        "shown": shown,
        "models": models,
        "categories": [c for c in Category.choices if c[0] in present] or Category.choices,
        "statuses": Task.Status.choices,
        "back": request.get_full_path(),
        "cursor": request.GET.get("cursor") or "",
    }
    partial = is_htmx(request) and request.headers.get("HX-Target") == "history-results"
    context["partial"] = partial
    template = "pages/history/_results.html" if partial else "pages/history.html"
    response = render(request, template, context, status=400 if errors else 200)
    patch_vary_headers(response, ["HX-Request", "HX-Target"])
    return response


@login_required
@require_GET
def history_row(request: HttpRequest, task_id: uuid.UUID) -> HttpResponse:
    """One task's row of the list, polled while the task runs."""
    task = _own_task(request, task_id)
    current = request.headers.get("HX-Current-URL", "")
    back = current[current.find("/history/") :] if "/history/" in current else ""
    finished_now = request.GET.get("seen") in Task.UNFINISHED and task.status in Task.TERMINAL
    response = render(
        request,
        "pages/history/_row.html",
        {"item": _one(request, task), "back": _back(request, back), "finished_now": finished_now},
    )
    if finished_now:
        mark_changed(response)  # the header's credits moved
    return response


# --- one task -----------------------------------------------------------------------------


def _task_context(request: HttpRequest, task: Task) -> dict[str, Any]:
    single = None
    if task.single_type and task.status == Task.Status.SUCCESS and task.results_available:
        single = single_shown(task, single_result(task))
    return {
        "item": _one(request, task),
        "single": single,
        "steps": timeline_steps(selectors.task_timeline(task=task)),
        "error_kinds": {kind: capfirst(words) for kind, words in FAULT.items()},
    }


@login_required
@require_GET
def task_page(request: HttpRequest, task_id: uuid.UUID) -> HttpResponse:
    """One task: its results, credits, error, expiry and what happened; live while it runs."""
    task = _own_task(request, task_id)
    return render(request, "pages/history/task.html", _task_context(request, task))


@login_required
@require_GET
def task_live(request: HttpRequest, task_id: uuid.UUID) -> HttpResponse:
    """The live part of a task's page, polled by htmx while the task runs (the answer for a
    finished task no longer polls). ``seen``: the status the page showed; when it changed, the
    answer announces it and refreshes the header."""
    task = _own_task(request, task_id)
    seen = request.GET.get("seen", "")
    context = _task_context(request, task)
    context["announce"] = seen != task.status and seen in Task.Status.values
    response = render(request, "pages/history/_task_live.html", context)
    if context["announce"] and task.status in Task.TERMINAL:
        mark_changed(response)
    return response


@login_required
@require_POST
def task_cancel(request: HttpRequest, task_id: uuid.UUID) -> HttpResponse:
    """Cancel a waiting or running task (credits released by the service)."""
    task = _own_task(request, task_id)
    note, ok = "", True
    try:
        task = services.task_cancel(task_id=task.pk, actor=request.user)
        refunded = task.refunded_micro
        note = "Cancelled." + (
            f" {credits_phrase(refunded)} returned to your balance." if refunded else ""
        )
    except TaskFinished:
        task.refresh_from_db()
        note, ok = f"It had already finished ({task.get_status_display().lower()}).", False
    if is_htmx(request):
        where = request.POST.get("from")
        if where == "page":
            context = _task_context(request, task)
            context.update(announce=True, note=note)
            response = render(request, "pages/history/_task_live.html", context)
        else:
            response = render(
                request,
                "pages/history/_row.html",
                {
                    "item": _one(request, task),
                    "back": _back(request, request.POST.get("next")),
                    "note": note,
                },
            )
        return mark_changed(response)
    (messages.success if ok else messages.warning)(request, note)
    return redirect(
        _back(request, request.POST.get("next") or reverse("history-task", args=[task.pk]))
    )


@login_required
@require_http_methods(["GET", "POST"])
def task_delete(request: HttpRequest, task_id: uuid.UUID) -> HttpResponse:
    """GET: the confirmation (the page used without JavaScript); POST: delete it (a running task
    is cancelled first, refunded) and go back to History."""
    task = _own_task(request, task_id)
    if request.method == "GET":
        return render(
            request,
            "pages/history/delete.html",
            {"item": _one(request, task), "back": _back(request, request.GET.get("next"))},
        )
    # Deleted meanwhile (another tab): that is the outcome the user asked for.
    with contextlib.suppress(NotFound):
        services.task_delete(user=request.user, task_id=task.pk)
    note = "Deleted from your history."
    if is_htmx(request):
        response = render(request, "pages/history/_deleted.html", {"note": note})
        return mark_changed(response)
    messages.success(request, note)
    back = _back(request, request.POST.get("next"))
    if back.startswith(reverse("history-task", args=[task.pk])):
        back = reverse("history")
    return redirect(back)


urlpatterns = [
    path("history/", history, name="history"),
    path("history/<uuid:task_id>/", task_page, name="history-task"),
    path("history/<uuid:task_id>/live/", task_live, name="history-task-live"),
    path("history/<uuid:task_id>/row/", history_row, name="history-row"),
    path("history/<uuid:task_id>/cancel/", task_cancel, name="history-cancel"),
    path("history/<uuid:task_id>/delete/", task_delete, name="history-delete"),
]
