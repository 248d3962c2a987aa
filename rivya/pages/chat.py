"""Chat: the user's chat sessions, and one conversation with its streamed replies.

The views read through ``chat.selectors`` (and ``chat.services.session_for_user``) and write
through ``chat.services``. A turn is not sent through these views: the page's script
(``static/js/chat.js``) streams it from the API (``POST /api/v1/chat/sessions/<id>/messages/``
as server-sent events) and, once the turn has settled (or after Stop), swaps in the message as
``chat_message`` renders it: the same template on page load, after a stream and after Stop.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import path, reverse
from django.utils import timezone
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from chat import selectors, services
from chat.api.serializers import notices_of
from chat.models import ChatMessage, ChatSession
from rivya.errors import NotFound, ValidationFailed
from rivya.money import format_credits
from rivya.pages import forms
from rivya.pages.common import fault, mark_changed, price_label
from rivya.pages.task_display import Shown as ShownTask
from rivya.pages.task_display import model_name
from tasks import selectors as task_selectors
from tasks.models import AIModel, Task

SESSIONS_PER_PAGE = 30
SIDEBAR_SESSIONS = 12
SHOWN_MESSAGES = 100
# The knobs that shape a streamed reply come first in the Testing section.
TESTING_FIRST = (
    "sandbox_reply_tokens",
    "sandbox_token_delay_ms",
    "sandbox_latency_ms",
    "sandbox_outcome",
)
# The message partial's address with this id stands for any message (chat.js fills it in).
ANY_MESSAGE = uuid.UUID(int=0)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


# --- what the pages show ---------------------------------------------------------------------


@dataclass(frozen=True)
class ModelChoice:
    """A chat model to start a chat with: its price in words and its limits."""

    model: AIModel
    price: str
    limits: services.ChatLimits

    @property
    def sizes(self) -> str:
        return (
            f"Context {self.limits.context_window:,} tokens; "
            f"replies up to {self.limits.max_output_tokens:,} tokens."
        )


def _model_choice(model: AIModel) -> ModelChoice:
    return ModelChoice(model=model, price=price_label(model), limits=services.chat_limits(model))


@dataclass(frozen=True)
class Shown:
    """One message as the conversation shows it."""

    message: ChatMessage
    # The tasks of the page's tool calls, fetched once for all its messages (None: this
    # message's own are fetched when shown).
    tasks: Mapping[str, Task] | None = None

    @property
    def is_assistant(self) -> bool:
        return self.message.role == ChatMessage.Role.ASSISTANT

    @property
    def streaming(self) -> bool:
        return not self.message.is_finished

    @property
    def stopped(self) -> bool:
        return self.message.client_gone_at is not None

    @property
    def fault(self) -> str:
        return fault(self.message.error_kind)

    @property
    def notices(self) -> list[str]:
        return notices_of(self.message) if self.is_assistant else []

    @property
    def cut(self) -> bool:
        """The reply ended at its length limit (max_tokens, or the turn's time limit)."""
        return self.message.finish_reason == "length"

    @property
    def tools(self) -> list[ToolShown]:
        """The tools the model called, each with its task as History shows it (live)."""
        records = self.message.tool_calls or []
        if not records:
            return []
        tasks = self.tasks
        if tasks is None:
            tasks = task_selectors.tasks_get_for_user(
                user_id=self.message.user_id, task_ids=self.message.task_ids or []
            )
        now = timezone.now()
        return [
            ToolShown(
                record=record,
                task=(
                    ShownTask(task=tasks[record["task_id"]], model_name=record["model"], now=now)
                    if record.get("task_id") in tasks
                    else None
                ),
            )
            for record in records
        ]

    @property
    def credits(self) -> dict[str, str]:
        m = self.message
        return {
            "reserved": format_credits(m.reserved_micro),
            "charged": format_credits(m.charged_micro),
            "refunded": format_credits(m.refunded_micro),
            "uncollected": format_credits(m.uncollected_micro),
        }


@dataclass(frozen=True)
class ToolShown:
    """A tool call in the conversation: what the model asked for, and its task."""

    record: dict[str, Any]
    task: ShownTask | None

    @property
    def prompt(self) -> str:
        arguments = self.record.get("arguments")
        return str(arguments.get("prompt", "")) if isinstance(arguments, dict) else ""

    @property
    def error(self) -> dict[str, str] | None:
        return self.record.get("error")


def _own_session(request: HttpRequest, session_id: uuid.UUID) -> ChatSession:
    """The signed-in user's session; another user's, a deleted or a missing one is the 404."""
    try:
        return services.session_for_user(user=request.user, session_id=session_id)
    except NotFound:
        raise Http404("No such chat.") from None


def _cursor_of(session: ChatSession) -> str:
    """The keyset of the next page: the last session's (updated_at, id)."""
    return f"{(session.updated_at - _EPOCH) // _MICROSECOND}_{session.pk}"


def _parse_cursor(value: str) -> tuple[datetime, uuid.UUID] | None:
    """A cursor made by ``_cursor_of``; anything else (crafted, cut) gives the first page."""
    at, _, pk = value.partition("_")
    try:
        return _EPOCH + int(at) * _MICROSECOND, uuid.UUID(pk)
    except (ValueError, OverflowError):
        return None


def _back(request: HttpRequest, value: str | None, default: str) -> str:
    """Where to return after an action: a chat address of this site, else ``default``."""
    if (
        value
        and value.startswith("/chat/")
        and url_has_allowed_host_and_scheme(value, allowed_hosts={request.get_host()})
    ):
        return value
    return default


def _list_page(
    request: HttpRequest,
    *,
    errors: dict[str, list[str]] | None = None,
    chosen: str = "",
    title: str = "",
    status: int = 200,
) -> HttpResponse:
    cursor = request.GET.get("cursor") or ""
    before = _parse_cursor(cursor) if cursor else None
    sessions, more = selectors.sessions_page(
        user=request.user, before=before, limit=SESSIONS_PER_PAGE
    )
    choices = [_model_choice(m) for m in selectors.chat_models()]
    if not any(c.model.slug == chosen for c in choices):
        chosen = choices[0].model.slug if choices else ""
    errors = errors or {}
    context = {
        "sessions": sessions,
        "older": _cursor_of(sessions[-1]) if more and sessions else "",
        "paged": before is not None,
        "choices": choices,
        "chosen": chosen,
        "title": title,
        "model_errors": errors.get("model", []),
        "title_errors": errors.get("title", []),
    }
    return render(request, "pages/chat.html", context, status=status)


# --- views -----------------------------------------------------------------------------------


@login_required
@require_GET
def chat_list(request: HttpRequest) -> HttpResponse:
    """The user's chats, newest activity first (keyset pages), and the form to start one."""
    return _list_page(request)


@login_required
@require_POST
def chat_new(request: HttpRequest) -> HttpResponse:
    """Start a chat with the chosen model; its page opens."""
    slug, title = request.POST.get("model", ""), request.POST.get("title", "")
    try:
        session = services.create_session(user=request.user, model_slug=slug, title=title)
    except ValidationFailed as exc:
        return _list_page(request, errors=exc.fields, chosen=slug, title=title, status=400)
    return redirect("chat-session", session_id=session.pk)


@login_required
@require_GET
def chat_session(request: HttpRequest, session_id: uuid.UUID) -> HttpResponse:
    """One conversation: its last messages, the message box (with max_tokens, the model's
    parameters and the sandbox's testing knobs) and the other chats."""
    session = _own_session(request, session_id)
    model = session.model
    shown_messages, earlier = selectors.recent_messages_of(session=session, limit=SHOWN_MESSAGES)
    tasks = task_selectors.tasks_get_for_user(
        user_id=request.user.pk, task_ids=[t for m in shown_messages for t in m.task_ids or []]
    )
    fields = forms.param_fields(model.params_schema)
    options, testing = forms.split_testing(fields, TESTING_FIRST)
    others, _ = selectors.sessions_page(user=request.user, limit=SIDEBAR_SESSIONS)
    context = {
        "session": session,
        "model": model,
        "choice": _model_choice(model),
        "items": [Shown(m, tasks) for m in shown_messages],
        "earlier": earlier,
        "fields": options,
        "testing_fields": testing,
        # How chat.js reads the parameter inputs back into params (types only, as
        # forms.params_from_form does; the service checks the rest).
        "param_specs": [
            {"name": f.name, "widget": f.widget, "kind": f.kind, "options": list(f.options)}
            for f in fields
        ],
        "stream_url": reverse("api-chat-messages", args=[session.pk]),
        "message_url": reverse("chat-message", args=[session.pk, ANY_MESSAGE]),
        "any_message": str(ANY_MESSAGE),
        "others": others,
    }
    return render(request, "pages/chat/session.html", context)


@login_required
@require_GET
def chat_message(
    request: HttpRequest, session_id: uuid.UUID, message_id: uuid.UUID
) -> HttpResponse:
    """One message of the user's conversation, as the page shows it: swapped in by chat.js when
    a turn has settled, and polled while it streams. ``?seen=STREAMING``: the page shows it
    streaming; while it still does the answer is 204 (nothing to swap); once settled it also
    refreshes the header (the credits moved)."""
    message = selectors.message_for_user(user=request.user, message_id=message_id)
    if message is None or message.session_id != session_id:
        raise Http404("No such message.")
    seen = request.GET.get("seen")
    if seen == message.status and not message.is_finished:
        return HttpResponse(status=204)
    # The chat is named after its first message: the page's heading follows it (chat.js).
    response = render(
        request,
        "pages/chat/_message.html",
        {"item": Shown(message), "session_title": message.session.title},
    )
    if message.is_finished and seen == ChatMessage.Status.STREAMING:
        mark_changed(response)
    return response


@login_required
@require_GET
def chat_tool_task(request: HttpRequest, task_id: uuid.UUID) -> HttpResponse:
    """A task a chat tool created, as the conversation shows it: polled while it runs."""
    task = task_selectors.task_get_for_user(user=request.user, task_id=task_id)
    if task is None:
        raise Http404("No such task.")
    shown = ShownTask(task=task, model_name=model_name(task), now=timezone.now())
    return render(request, "pages/chat/_tool_task.html", {"shown": shown})


@login_required
@require_POST
def chat_rename(request: HttpRequest, session_id: uuid.UUID) -> HttpResponse:
    """Rename a chat; back where the form was (the list or the conversation)."""
    session = _own_session(request, session_id)
    back = _back(request, request.POST.get("next"), reverse("chat-session", args=[session.pk]))
    try:
        services.rename_session(session=session, title=request.POST.get("title", ""))
    except ValidationFailed as exc:
        problems = [m for ms in exc.fields.values() for m in ms]
        messages.error(request, "The chat was not renamed: " + " ".join(problems))
    else:
        messages.success(request, "Renamed.")
    return redirect(back)


@login_required
@require_http_methods(["GET", "POST"])
def chat_delete(request: HttpRequest, session_id: uuid.UUID) -> HttpResponse:
    """GET: the confirmation; POST: delete the chat (a reply still streaming runs to its end
    and is settled) and go back to the list."""
    session = _own_session(request, session_id)
    if request.method == "GET":
        back = _back(request, request.GET.get("next"), reverse("chat"))
        return render(request, "pages/chat/delete.html", {"session": session, "back": back})
    services.delete_session(session=session)
    messages.success(request, f"Deleted “{session.title or 'Untitled chat'}”.")
    return redirect("chat")


urlpatterns = [
    path("chat/", chat_list, name="chat"),
    path("chat/new/", chat_new, name="chat-new"),
    path("chat/<uuid:session_id>/", chat_session, name="chat-session"),
    path(
        "chat/<uuid:session_id>/messages/<uuid:message_id>/",
        chat_message,
        name="chat-message",
    ),
    path("chat/tasks/<uuid:task_id>/", chat_tool_task, name="chat-tool-task"),
    path("chat/<uuid:session_id>/rename/", chat_rename, name="chat-rename"),
    path("chat/<uuid:session_id>/delete/", chat_delete, name="chat-delete"),
]
