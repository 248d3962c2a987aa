"""Chat reads."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet

from chat.models import ChatMessage, ChatSession


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
