"""Support's safe actions on a task, as admin views (issue 15). The task page
(tasks/admin.py) shows ``action_links(request, task)`` and includes ``action_urls(model_admin)``
in its ``get_urls``.

Each view: GET shows a form (a reason, a one-time token, and the action's own fields); POST
carries the action out through ``tasks.services`` and returns to the task page. A staff member
without the action's permission gets 403 on both; an action that does not apply to the task now
is refused with its reason (409, the form shown again), never a 500.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django import forms
from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse

from rivya.errors import DomainError
from rivya.money import format_credits, parse_credits
from tasks import services
from tasks.models import Task

S = Task.Status


@dataclass(frozen=True)
class ActionLink:
    label: str  # e.g. "Re-check upstream now"
    url: str  # the action's form (GET shows it; POST with a reason carries it out)
    danger: bool = False


class ActionForm(forms.Form):
    reason = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 3, "cols": 60}),
        max_length=400,
        help_text="Recorded on the task's timeline (and in the ledger where credits move).",
    )
    token = forms.UUIDField(widget=forms.HiddenInput)


class FailForm(ActionForm):
    kind = forms.ChoiceField(
        choices=[("provider", "Provider failure"), ("infra", "Our infrastructure")],
        initial="provider",
        label="Failure kind",
    )


class RefundForm(ActionForm):
    amount = forms.CharField(
        required=False,
        max_length=24,
        label="Amount (credits)",
        help_text="Leave empty to refund everything left of the charge.",
    )

    def clean_amount(self) -> int | None:
        text = (self.cleaned_data.get("amount") or "").strip()
        if not text:
            return None
        try:
            return parse_credits(text)
        except DomainError as exc:
            raise forms.ValidationError(exc.message) from exc


@dataclass(frozen=True)
class Action:
    name: str  # URL name suffix and path segment
    label: str
    permission: str
    statuses: tuple[str, ...]
    form: type[ActionForm]
    run: Callable[..., services.SupportOutcome]
    danger: bool = False
    explain: str = ""

    def applies(self, task: Task) -> bool:
        if task.status not in self.statuses:
            return False
        if self.name == "refund":
            return services.task_refundable(task) > 0
        return True


def _run_fail(task: Task, user: Any, data: dict[str, Any]) -> services.SupportOutcome:
    return services.task_support_fail(
        task_id=task.pk,
        actor=user,
        reason=data["reason"],
        token=str(data["token"]),
        kind=data["kind"],
    )


def _run_refund(task: Task, user: Any, data: dict[str, Any]) -> services.SupportOutcome:
    return services.task_support_refund(
        task_id=task.pk,
        actor=user,
        reason=data["reason"],
        token=str(data["token"]),
        amount=data["amount"],
    )


def _simple(func: Callable[..., services.SupportOutcome], **extra: Any) -> Callable[..., Any]:
    def run(task: Task, user: Any, data: dict[str, Any]) -> services.SupportOutcome:
        return func(
            task_id=task.pk, actor=user, reason=data["reason"], token=str(data["token"]), **extra
        )

    return run


ACTIONS: dict[str, Action] = {
    a.name: a
    for a in (
        Action(
            "recheck",
            "Re-check upstream now",
            "tasks.recheck_task",
            Task.UNFINISHED,
            ActionForm,
            _simple(services.task_support_recheck),
            explain="A GENERATING task asks the provider for its job's status now; a WAITING "
            "task is sent again with the same key (the provider answers with its job if it "
            "has one).",
        ),
        Action(
            "cancel",
            "Cancel",
            "tasks.cancel_task",
            Task.UNFINISHED,
            ActionForm,
            _simple(services.task_support_cancel),
            danger=True,
            explain="The task is cancelled, its credits released per the model's cancel "
            "policy, the provider asked to stop the job, and the user notified.",
        ),
        Action(
            "fail",
            "Mark failed with a refund",
            "tasks.refund_task",
            Task.UNFINISHED,
            FailForm,
            _run_fail,
            danger=True,
            explain="The task becomes FAILED (support_failed), refunded in full whatever the "
            "model's failure policy; the provider is asked to stop the job; the user is "
            "notified.",
        ),
        Action(
            "refund",
            "Refund",
            "tasks.refund_task",
            Task.TERMINAL,
            RefundForm,
            _run_refund,
            danger=True,
            explain="Gives back all or part of what the task was charged, in the ledger, with "
            "you as actor and your reason.",
        ),
        Action(
            "resubmit",
            "Resubmit (the user pays)",
            "tasks.resubmit_task",
            (S.FAILED,),
            ActionForm,
            _simple(services.task_support_resubmit),
            explain="A new task for the user with the same model, prompt, params and uploads; "
            "the user's credits are held for it as for any task.",
        ),
        Action(
            "resubmit_free",
            "Resubmit at our cost",
            "tasks.resubmit_task_free",
            (S.FAILED,),
            ActionForm,
            _simple(services.task_support_resubmit, at_our_cost=True),
            explain="First a recorded grant to the user of the new task's price, then the "
            "same resubmission.",
        ),
    )
}


def _allowed(request: HttpRequest, action: Action) -> bool:
    user = request.user
    return bool(user.is_active and user.is_staff and user.has_perm(action.permission))


def _url(action: Action, task_id: Any) -> str:
    return reverse(f"admin:tasks_task_{action.name}", args=[task_id])


def action_links(request: HttpRequest, task: Any) -> list[ActionLink]:
    """The actions this staff member may take on this task now (by permission and status)."""
    return [
        ActionLink(action.label, _url(action, task.pk), action.danger)
        for action in ACTIONS.values()
        if _allowed(request, action) and action.applies(task)
    ]


def _change_url(task: Task) -> str:
    return reverse("admin:tasks_task_change", args=[task.pk])


def _view(model_admin: Any, action: Action) -> Callable[..., HttpResponse]:
    def view(request: HttpRequest, task_id: Any) -> HttpResponse:
        if not _allowed(request, action):
            raise PermissionDenied
        task = get_object_or_404(Task.objects.select_related("user"), pk=task_id)
        refused = ""
        status = 200
        if request.method == "POST":
            form = action.form(request.POST)
            if form.is_valid():
                try:
                    outcome = action.run(task, request.user, form.cleaned_data)
                except DomainError as exc:
                    refused, status = exc.message, 409
                else:
                    level = messages.SUCCESS if outcome.done else messages.WARNING
                    messages.add_message(request, level, f"{action.label}: {outcome.message}")
                    return HttpResponseRedirect(_change_url(task))
            else:
                status = 400
        else:
            form = action.form(initial={"token": uuid.uuid4()})
            if not action.applies(task):
                refused, status = (
                    f"This action does not apply to the task now ({task.status}).",
                    409,
                )
        context = {
            **model_admin.admin_site.each_context(request),
            "opts": Task._meta,
            "title": f"{action.label}: task {task.pk}",
            "action": action,
            "task": task,
            "form": form,
            "refused": refused,
            "refundable": format_credits(services.task_refundable(task))
            if action.name == "refund"
            else None,
            "change_url": _change_url(task),
        }
        return TemplateResponse(request, "admin/tasks/action_form.html", context, status=status)

    view.__name__ = f"task_{action.name}_view"
    return view


def action_urls(model_admin: Any) -> list[URLPattern]:
    """The action views, wrapped in ``model_admin.admin_site.admin_view``."""
    return [
        path(
            f"<uuid:task_id>/{action.name}/",
            model_admin.admin_site.admin_view(_view(model_admin, action)),
            name=f"tasks_task_{action.name}",
        )
        for action in ACTIONS.values()
    ]
