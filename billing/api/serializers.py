from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from billing.models import Entry
from rivya.money import format_credits


class CreditsSerializer(serializers.Serializer):
    balance = serializers.SerializerMethodField()
    balance_micro = serializers.IntegerField(source="balance")
    held = serializers.SerializerMethodField()
    held_micro = serializers.IntegerField(source="held")
    available = serializers.SerializerMethodField()
    available_micro = serializers.IntegerField(source="available")

    def get_balance(self, obj: Any) -> str:
        return format_credits(obj.balance)

    def get_held(self, obj: Any) -> str:
        return format_credits(obj.held)

    def get_available(self, obj: Any) -> str:
        return format_credits(obj.available)


def _subject(entry: Entry, subject_type: str) -> str | None:
    txn = entry.transaction
    return txn.subject_id if txn.subject_type == subject_type and txn.subject_id else None


class LedgerEntrySerializer(serializers.ModelSerializer):
    kind = serializers.CharField(source="transaction.kind")
    amount = serializers.SerializerMethodField()
    amount_micro = serializers.IntegerField(source="amount")
    reason = serializers.CharField(source="transaction.reason")
    transaction_id = serializers.IntegerField()
    task_id = serializers.SerializerMethodField()
    chat_message_id = serializers.SerializerMethodField()

    class Meta:
        model = Entry
        fields = [
            "id",
            "created_at",
            "kind",
            "amount",
            "amount_micro",
            "transaction_id",
            "task_id",
            "chat_message_id",
            "reason",
        ]

    def get_amount(self, obj: Entry) -> str:
        return format_credits(obj.amount)

    @extend_schema_field(serializers.CharField(allow_null=True))
    def get_task_id(self, obj: Entry) -> str | None:
        return _subject(obj, "tasks.task")

    @extend_schema_field(serializers.CharField(allow_null=True))
    def get_chat_message_id(self, obj: Entry) -> str | None:
        return _subject(obj, "chat.message")
