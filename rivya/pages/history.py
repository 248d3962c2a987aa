"""History: the user's tasks, and one task's page (where notifications link).

The views read through ``tasks.selectors`` and write through ``tasks.services``; what is here
is presentation: which results can still be shown, the error's kind in plain words, and the
timeline told as sentences a person understands.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
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
from rivya.money import format_credits
from rivya.pages.common import FAULT, fault, is_htmx, mark_changed
from tasks import selectors, services
from tasks.models import AIModel, Category, Task, TaskEvent

# --- presentation -------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    n: int
    url: str
    mime: str
    bytes: int | None
    width: int | None
    height: int | None
    duration_ms: int | None

    @property
    def kind(self) -> str:
        kind = self.mime.split("/", 1)[0]
        return kind if kind in ("image", "video", "audio") else "file"

    @property
    def describe(self) -> str:
        """'PNG image, 512 × 512, 34 KB' (what a download link says it gets)."""
        parts = [f"{self.mime.split('/', 1)[-1].upper()} {self.kind}"]
        if self.width and self.height:
            parts.append(f"{self.width} × {self.height}")
        if self.duration_ms:
            parts.append(f"{self.duration_ms / 1000:g} s")
        if self.bytes:
            parts.append(_size(self.bytes))
        return ", ".join(parts)


def _size(n: int) -> str:
    for unit in ("bytes", "KB", "MB"):
        if n < 1024 or unit == "MB":
            return f"{n:g} {unit}" if unit == "bytes" else f"{n:.1f} {unit}".replace(".0 ", " ")
        n /= 1024  # type: ignore[assignment]
    return ""  # pragma: no cover


@dataclass
class Shown:
    """A task as History shows it."""

    task: Task
    model_name: str
    now: datetime
    results: list[Result] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.task.status == Task.Status.SUCCESS and not self.expired:
            self.results = [
                Result(
                    n=n,
                    url=reverse("api-task-result", args=[self.task.pk, n]),
                    mime=str(r.get("mime") or "application/octet-stream"),
                    bytes=r.get("bytes"),
                    width=r.get("width"),
                    height=r.get("height"),
                    duration_ms=r.get("duration_ms"),
                )
                for n, r in enumerate(self.task.results)
            ]

    @property
    def running(self) -> bool:
        return self.task.status in Task.UNFINISHED

    @property
    def expired(self) -> bool:
        """Its files are gone, or going (past ``expires_at``, before the purge's next run)."""
        task = self.task
        if task.status != Task.Status.SUCCESS:
            return False
        return task.results_expired_at is not None or (
            task.expires_at is not None and task.expires_at <= self.now
        )

    @property
    def expired_on(self) -> datetime | None:
        return self.task.results_expired_at or self.task.expires_at

    @property
    def keeps_results(self) -> bool:
        return self.task.status == Task.Status.SUCCESS and not self.expired

    @property
    def images(self) -> list[Result]:
        return [r for r in self.results if r.kind == "image"]

    @property
    def players(self) -> list[Result]:
        return [r for r in self.results if r.kind in ("audio", "video")]

    @property
    def error_kind(self) -> str:
        """Whose fault the failure was, in plain words (a cancel is nobody's fault)."""
        task = self.task
        if task.status == Task.Status.CANCELLED or not task.error_code:
            return ""
        return capfirst(fault(task.error_kind))

    @property
    def when(self) -> str:
        return _when(self.task.created_at, self.now)

    @property
    def keeps_for(self) -> str:
        """How long results are kept once finished ('7 days', '12 hours')."""
        seconds = self.task.result_ttl_seconds or 0
        if seconds >= 86400:
            days = round(seconds / 86400, 1)
            return f"{days:g} day" + ("" if days == 1 else "s")
        hours = max(1, round(seconds / 3600))
        return f"{hours} hour" + ("" if hours == 1 else "s")

    @property
    def outcome(self) -> str:
        """One sentence saying where the task stands (announced when it changes)."""
        task = self.task
        match task.status:
            case Task.Status.WAITING:
                return "Waiting: being sent to the provider."
            case Task.Status.GENERATING:
                return "Generating: the provider is working on it."
            case Task.Status.SUCCESS:
                n = len(task.results)
                return "Finished: your result is ready." if n == 1 else f"Finished: {n} results."
            case Task.Status.CANCELLED:
                return "Cancelled." + (
                    f" {_credits(task.refunded_micro)} returned." if task.refunded_micro else ""
                )
        refund = f" {_credits(task.refunded_micro)} returned." if task.refunded_micro else ""
        return f"{task.get_status_display()}: {task.error_message}{refund}"

    @property
    def summary(self) -> str:
        """The short line next to the status badge (details are in the cards below)."""
        task = self.task
        if self.running:
            return self.outcome
        if task.status == Task.Status.SUCCESS:
            n = len(task.results)
            made = "1 result" if n == 1 else f"{n} results"
            return f"Finished: {made}" + (", since expired." if self.expired else ".")
        if task.charged_micro:
            charged, returned = _credits(task.charged_micro), format_credits(task.refunded_micro)
            return f"{charged} charged, {returned} returned."
        if task.refunded_micro:
            return f"Nothing charged: {_credits(task.refunded_micro)} returned."
        return "Nothing charged."

    @property
    def category_label(self) -> str:
        return Category(self.task.category).label if self.task.category in Category else ""


def _when(at: datetime, now: datetime) -> str:
    seconds = (now - at).total_seconds()
    if seconds < 45:
        return "just now"
    if seconds < 3600:
        minutes = round(seconds / 60)
        return f"{minutes} min ago"
    if seconds < 6 * 3600:
        hours = int(seconds // 3600)
        return f"{hours} h ago"
    if at.date() == now.date():
        return f"today {at:%H:%M}"
    if at.year == now.year:
        return f"{at:%b} {at.day}, {at:%H:%M}"
    return f"{at:%b} {at.day} {at.year}, {at:%H:%M}"


def _credits(micro: int) -> str:
    amount = format_credits(micro)
    return f"{amount} credit" if amount == "1" else f"{amount} credits"


def _times(n: int) -> str:
    return "once" if n == 1 else "twice" if n == 2 else f"{n} times"


@dataclass(frozen=True)
class Step:
    """One line of the timeline: a sentence, when (a span for grouped events), and its tone."""

    text: str
    at: datetime
    until: datetime | None = None
    tone: str = ""  # ok, bad, warn, or neutral


# Events that repeat while a task runs: consecutive ones are told as one line.
GROUPED = frozenset(
    {
        "polled",
        "poll_failed",
        "callback",
        "submit_error",
        "upstream_not_found",
        "download_failed",
    }
)
# What a provider's job state means, as the end of "Checked with the provider: ...".
JOB_STATES = {
    "queued": "the job was waiting its turn",
    "running": "the job was running",
    "succeeded": "the job was done",
    "failed": "the job had failed",
    "rejected": "the job was refused",
    "cancelled": "the job was cancelled",
}
# Events that say nothing a person needs (workers coordinating among themselves).
SILENT = frozenset({"outputs_busy"})


def _sentence(kind: str, events: Sequence[TaskEvent]) -> tuple[str, str]:
    """The plain-words sentence (and tone) of a run of ``len(events)`` events of ``kind``."""
    last, n = events[-1], len(events)
    data = last.data if isinstance(last.data, dict) else {}
    amount = data.get("amount_micro") or 0
    match kind:
        case "created":
            price = data.get("price_micro") or 0
            return (
                f"You asked for this generation; its price is {_credits(price)}."
                if price
                else "You asked for this generation (free of charge).",
                "",
            )
        case "credits_held":
            return f"{_credits(amount)} set aside from your balance until it finishes.", ""
        case "free":
            return "This model is free: no credits were set aside.", ""
        case "submitted":
            return "Sent to the provider, which accepted the job.", ""
        case "polled":
            if n == 1:
                state = JOB_STATES.get(str(data.get("state") or ""), "")
                return "Checked with the provider" + (f": {state}." if state else "."), ""
            return f"Checked with the provider {_times(n)}.", ""
        case "callback":
            return (
                "The provider reported back."
                if n == 1
                else f"The provider reported back {_times(n)}."
            ), ""
        case "poll_failed":
            return (
                f"Could not reach the provider to check on the job ({_times(n)}); we kept trying.",
                "warn",
            )
        case "callback_failed":
            return (
                "A message from the provider could not be read; we checked by asking instead.",
                "",
            )
        case "submit_error":
            return (
                f"Sending the job to the provider failed ({_times(n)}); we tried again.",
                "warn",
            )
        case "submit_unconfirmed":
            return (
                "The provider could not say whether it received the job. We will ask again; "
                "your credits stay set aside until it is known.",
                "warn",
            )
        case "submit_stuck":
            return (
                "The provider never answered. Our support team will check it; your credits stay "
                "set aside until then.",
                "warn",
            )
        case "upstream_job_absent":
            return "The provider confirmed it never started the job.", ""
        case "upstream_not_found":
            return f"The provider did not recognise the job ({_times(n)}).", "warn"
        case "timeout_unconfirmed":
            return (
                "It ran past the model's time limit; we are waiting for the provider to confirm "
                "it stopped before refunding.",
                "warn",
            )
        case "download_failed":
            return f"Fetching the results from the provider failed ({_times(n)}); retrying.", "warn"
        case "succeeded":
            got, wanted = data.get("outputs"), data.get("requested")
            if got is not None and wanted and got < wanted:
                return f"Finished: {got} of {wanted} results were made.", "ok"
            return (
                "Finished: your result is ready."
                if got == 1
                else f"Finished: your {got} results are ready."
                if got
                else "Finished."
            ), "ok"
        case "credits_captured":
            released = data.get("released_micro") or 0
            text = f"{_credits(amount)} charged."
            if released:
                text += f" {_credits(released)} returned to you for what was not delivered."
            elif last.message and "policy" in last.message.lower():
                text = f"{_credits(amount)} charged, as this model's billing policy says."
            return text, ""
        case "credits_released":
            return f"{_credits(amount)} returned to your balance: you paid nothing.", "ok"
        case "failed":
            return f"It failed: {last.message}" if last.message else "It failed.", "bad"
        case "rejected":
            return (
                f"The request was rejected: {last.message}"
                if last.message
                else "The request was rejected.",
                "bad",
            )
        case "cancelled":
            return last.message or "Cancelled.", "bad"
        case "upstream_cancel_requested":
            return "The provider was told to stop the job.", ""
        case "upstream_cancel_gave_up":
            return "The provider could not be told to stop the job; it changes nothing here.", ""
        case "late_result":
            return "A result arrived after it had finished; it changed nothing.", ""
        case "late_upstream_acceptance":
            return (
                "The provider accepted the job after it had finished here; we told it to stop.",
                "",
            )
        case "results_expired":
            return "The result files were deleted: their keeping period ended.", ""
        case "deleted":
            return "Deleted from your history.", ""
    return (last.message or kind.replace("_", " ").capitalize() + "."), ""


def timeline_steps(events: Iterable[TaskEvent]) -> list[Step]:
    """The timeline in plain words: repeated checks told once with their count, noise left out."""
    runs: list[list[TaskEvent]] = []
    for event in events:
        if event.kind in SILENT:
            continue
        if runs and event.kind in GROUPED and runs[-1][0].kind == event.kind:
            runs[-1].append(event)
        else:
            runs.append([event])
    steps = []
    for run in runs:
        text, tone = _sentence(run[0].kind, run)
        until = run[-1].created_at if len(run) > 1 else None
        steps.append(Step(text=text, at=run[0].created_at, until=until, tone=tone))
    return steps


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


def _model_name(task: Task) -> str:
    name = AIModel.objects.filter(pk=task.model_id).values_list("name", flat=True).first()
    return name or task.model_slug


def _one(request: HttpRequest, task: Task, *, model_name: str | None = None) -> Shown:
    return Shown(task=task, model_name=model_name or _model_name(task), now=timezone.now())


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
    shown: list[Shown] = []
    if not errors:
        page = selectors.history_page(
            user=request.user,
            cursor=request.GET.get("cursor") or None,
            **{k: v or None for k, v in values.items()},
        )
        now = timezone.now()
        shown = [
            Shown(task=t, model_name=names.get(t.model_slug, t.model_slug), now=now)
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
    return {
        "item": _one(request, task),
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
            f" {_credits(refunded)} returned to your balance." if refunded else ""
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
