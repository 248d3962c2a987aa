"""API shapes of chat sessions and messages (docs/api.md). Pure: no database access, so the
streaming code may shape a message inside the event loop."""

from __future__ import annotations

from typing import Any

from rest_framework import serializers

from chat.models import ChatMessage, ChatSession
from rivya.money import format_credits

MONEY = ("reserved", "charged", "refunded", "uncollected")


def credits_of(message: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in MONEY:
        micro = getattr(message, f"{name}_micro")
        out[name], out[f"{name}_micro"] = format_credits(micro), micro
    return out


def notices_of(message: ChatMessage) -> list[str]:
    """What the user should know about a turn, in words."""
    notices = []
    asked = message.max_tokens_requested
    if message.max_tokens is not None and asked is not None and message.max_tokens < asked:
        notices.append(
            f"max_tokens was lowered from {asked} to {message.max_tokens}: that is what "
            "your available credits afford."
        )
    if message.context_dropped:
        many = "s" if message.context_dropped != 1 else ""
        notices.append(
            f"{message.context_dropped} earlier message{many} did not fit the model's context "
            "and were left out."
        )
    if message.usage_reported is False and message.output_tokens:
        notices.append("The provider reported no usage: the tokens were counted by Rivya.")
    if message.uncollected_micro:
        notices.append(
            "The provider reported more usage than was held; the excess was not charged."
        )
    if message.client_gone_at:
        notices.append(
            "The reply was stopped on your screen; it ran to its end and is kept here in full."
        )
    return notices


class ToolErrorSerializer(serializers.Serializer[Any]):
    code = serializers.CharField()
    message = serializers.CharField()


class ToolCallSerializer(serializers.Serializer[Any]):
    """One tool the model called (docs/chat.md, "Tool calls")."""

    id = serializers.CharField(help_text="the provider's id of the call")
    tool = serializers.CharField(help_text="generate_image, generate_video or generate_audio")
    model = serializers.CharField(help_text="the catalog model it generates with ('' if none)")
    arguments = serializers.JSONField(
        help_text="what the model asked: an object, or the text it sent when that was not one"
    )
    task_id = serializers.CharField(
        allow_null=True, help_text="the task it created (null if refused before one was)"
    )
    error = ToolErrorSerializer(allow_null=True, help_text="why it did not generate, if so")


class ChatMessageSerializer(serializers.ModelSerializer[ChatMessage]):
    session_id = serializers.UUIDField(read_only=True)
    tool_calls = ToolCallSerializer(many=True, read_only=True)
    task_ids = serializers.ListField(
        child=serializers.CharField(),
        read_only=True,
        help_text="the ids of the tasks its tool calls created",
    )
    credits = serializers.SerializerMethodField()
    usage = serializers.SerializerMethodField()
    context = serializers.SerializerMethodField()
    error = serializers.SerializerMethodField()
    notices = serializers.SerializerMethodField()

    class Meta:
        model = ChatMessage
        fields = [
            "id",
            "session_id",
            "role",
            "content",
            "status",
            "model",
            "max_tokens",
            "max_tokens_requested",
            "finish_reason",
            "usage",
            "credits",
            "context",
            "error",
            "notices",
            "tool_calls",
            "task_ids",
            "created_at",
            "finished_at",
            "client_gone_at",
        ]

    model = serializers.CharField(source="model_slug", read_only=True)

    def get_credits(self, obj: ChatMessage) -> dict[str, Any]:
        return credits_of(obj)

    def get_usage(self, obj: ChatMessage) -> dict[str, Any] | None:
        if obj.role != ChatMessage.Role.ASSISTANT:
            return None
        return {
            "input_tokens": obj.input_tokens,
            "output_tokens": obj.output_tokens,
            "input_tokens_estimate": obj.input_tokens_estimate,
            "reported": obj.usage_reported,
        }

    def get_context(self, obj: ChatMessage) -> dict[str, Any] | None:
        if obj.role != ChatMessage.Role.ASSISTANT:
            return None
        return {
            "messages_sent": obj.context_messages,
            "messages_dropped": obj.context_dropped,
            "truncated": obj.context_dropped > 0,
        }

    def get_error(self, obj: ChatMessage) -> dict[str, str] | None:
        if not obj.error_code:
            return None
        return {"code": obj.error_code, "message": obj.error_message, "kind": obj.error_kind}

    def get_notices(self, obj: ChatMessage) -> list[str]:
        return notices_of(obj)


def message_shape(message: ChatMessage) -> dict[str, Any]:
    return dict(ChatMessageSerializer(message).data)


class ChatSessionSerializer(serializers.ModelSerializer[ChatSession]):
    model = serializers.SlugRelatedField(slug_field="slug", read_only=True)

    class Meta:
        model = ChatSession
        fields = ["id", "model", "title", "created_at", "updated_at"]


class ChatSessionCreateSerializer(serializers.Serializer[Any]):
    model = serializers.CharField()
    title = serializers.CharField(required=False, allow_blank=True)


class ChatSessionUpdateSerializer(serializers.Serializer[Any]):
    title = serializers.CharField(allow_blank=True)


class ChatTurnSerializer(serializers.Serializer[Any]):
    content = serializers.CharField()
    max_tokens = serializers.IntegerField(required=False, min_value=1)
    params = serializers.DictField(required=False)
