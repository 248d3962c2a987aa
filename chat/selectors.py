"""Chat reads."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from django.db.models import Q, QuerySet

from chat.models import ChatMessage, ChatSession
from tasks.models import AIModel, Category


def sessions_for_user(*, user: Any) -> QuerySet[ChatSession]:
    return ChatSession.objects.select_related("model").filter(user=user, deleted_at=None)


def messages_of(*, session: ChatSession) -> QuerySet[ChatMessage]:
    return ChatMessage.objects.filter(session=session)


def message_for_user(*, user: Any, message_id: Any) -> ChatMessage | None:
    try:
        return (
            ChatMessage.objects.filter(user=user, session__deleted_at=None)
            .filter(pk=message_id)
            .first()
        )
    except (ValueError, TypeError):
        return None


# --- reads of the chat pages (rivya/pages/chat.py) -------------------------------------------


def chat_models() -> QuerySet[AIModel]:
    """The models a chat can be started with: enabled chat models billed per token (what
    ``services.chat_model`` accepts), cheapest last."""
    return AIModel.objects.filter(
        enabled=True, category=Category.CHAT, billing_type=AIModel.BillingType.PER_TOKEN
    ).order_by("-price_micro", "name")


def sessions_page(
    *, user: Any, before: tuple[datetime, uuid.UUID] | None = None, limit: int = 30
) -> tuple[list[ChatSession], bool]:
    """The user's sessions, newest activity first, ``limit`` at a time after the keyset
    ``before`` (a session's ``(updated_at, id)``), served by ``chat_session_user_recent``.
    Returns (sessions, whether older ones follow)."""
    qs = sessions_for_user(user=user).order_by("-updated_at", "-id")
    if before is not None:
        at, pk = before
        qs = qs.filter(Q(updated_at__lt=at) | Q(updated_at=at, pk__lt=pk))
    rows = list(qs[: limit + 1])
    return rows[:limit], len(rows) > limit


def recent_messages_of(*, session: ChatSession, limit: int) -> tuple[list[ChatMessage], bool]:
    """The session's last ``limit`` messages in conversation order, and whether earlier ones
    exist (one query on ``chat_message_session``)."""
    rows = list(
        ChatMessage.objects.filter(session=session).order_by("-created_at", "-id")[: limit + 1]
    )
    return rows[:limit][::-1], len(rows) > limit
