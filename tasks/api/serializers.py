from __future__ import annotations

import uuid
from typing import Any

from django.urls import get_script_prefix, reverse
from django.utils import timezone
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from notifications.webhooks import TASK_EVENTS
from rivya.money import format_credits
from tasks.models import AIModel, Task, Upload


class ModelSerializer(serializers.ModelSerializer):
    price = serializers.SerializerMethodField()

    class Meta:
        model = AIModel
        fields = [
            "slug",
            "name",
            "description",
            "category",
            "runtime",
            "single_type",
            "params_schema",
            "file_rules",
            "prompt_required",
            "max_prompt_length",
            "price",
            "price_micro",
            "billing_type",
            "billing_policy",
        ]

    def get_price(self, obj: AIModel) -> str:
        return format_credits(obj.price_micro)


class TaskCreateSerializer(serializers.Serializer):
    """Input of ``POST /api/v1/tasks/`` (types are checked by the service, which answers with
    field errors)."""

    model = serializers.CharField()
    prompt = serializers.CharField(required=False, allow_blank=True)
    params = serializers.JSONField(required=False)
    upload_ids = serializers.ListField(child=serializers.CharField(), required=False)
    files = serializers.ListField(
        child=serializers.FileField(), required=False, help_text="multipart only"
    )
    webhook_url = serializers.CharField(
        required=False,
        help_text="https URL the task's events are POSTed to, signed (docs/webhooks.md)",
    )
    webhook_events = serializers.ListField(
        child=serializers.ChoiceField(choices=list(TASK_EVENTS)),
        required=False,
        help_text="which events go to webhook_url (default: all)",
    )


class ErrorSerializer(serializers.Serializer):
    code = serializers.CharField()
    message = serializers.CharField()
    kind = serializers.CharField()


class CreditsOfTaskSerializer(serializers.Serializer):
    reserved = serializers.CharField()
    reserved_micro = serializers.IntegerField()
    charged = serializers.CharField()
    charged_micro = serializers.IntegerField()
    refunded = serializers.CharField()
    refunded_micro = serializers.IntegerField()


class ResultSerializer(serializers.Serializer):
    url = serializers.CharField()
    mime = serializers.CharField()
    bytes = serializers.IntegerField()
    width = serializers.IntegerField(allow_null=True)
    height = serializers.IntegerField(allow_null=True)
    duration_ms = serializers.IntegerField(allow_null=True)


_DATETIME = serializers.DateTimeField()  # formats as every DRF field does (ISO 8601, "Z")


def api_time(value: Any, tz: Any) -> str | None:
    """``_DATETIME.to_representation(value)``, with the current time zone ``tz`` looked up once
    per task rather than once per field: an aware time in ``tz``, ISO 8601, "Z" for UTC."""
    if value is None:
        return None
    if timezone.is_naive(value):
        return _DATETIME.to_representation(value)
    text = value.astimezone(tz).isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


_NO_TASK = uuid.UUID(int=0)
MAX_SCRIPT_PREFIXES = 16  # a deployment has one; more are reversed each time
_detail_urls: dict[str, str] = {}


def task_detail_url(task_id: Any) -> str:
    """``reverse("api-task-detail", args=[task_id])``, reversed once per script prefix."""
    prefix = get_script_prefix()
    template = _detail_urls.get(prefix)
    if template is None:
        template = reverse("api-task-detail", args=[_NO_TASK])
        if len(_detail_urls) < MAX_SCRIPT_PREFIXES:
            _detail_urls[prefix] = template
    return template.replace(str(_NO_TASK), str(task_id))


# A task as the API shows it. The fields below define it for the schema; the answer itself is
# built by ``represent``, without DRF's per-field machinery (it is on the path of every submit).
# ``tasks/tests/test_api.py`` checks that the two agree.
class TaskSerializer(serializers.ModelSerializer):
    model = serializers.CharField(source="model_slug")
    expired = serializers.SerializerMethodField()
    error = serializers.SerializerMethodField()
    credits = serializers.SerializerMethodField()
    results = serializers.SerializerMethodField()
    poll_url = serializers.SerializerMethodField()
    webhook_url = serializers.SerializerMethodField()

    class Meta:
        model = Task
        fields = [
            "id",
            "model",
            "category",
            "single_type",
            "status",
            "prompt",
            "params",
            "upload_ids",
            "webhook_url",
            "webhook_events",
            "created_at",
            "submitted_at",
            "started_at",
            "finished_at",
            "expires_at",
            "expired",
            "error",
            "credits",
            "results",
            "poll_url",
        ]

    def to_representation(self, instance: Task) -> dict[str, Any]:
        return self.represent(instance)

    @classmethod
    def represent(cls, task: Task) -> dict[str, Any]:
        """The task's JSON, field by field as ``Meta.fields`` lists them."""
        tz = timezone.get_current_timezone()
        return {
            "id": str(task.pk),
            "model": task.model_slug,
            "category": task.category,
            "single_type": task.single_type,
            "status": task.status,
            "prompt": task.prompt,
            "params": task.params,
            "upload_ids": task.upload_ids,
            "webhook_url": cls.get_webhook_url(task),
            "webhook_events": task.webhook_events,
            "created_at": api_time(task.created_at, tz),
            "submitted_at": api_time(task.submitted_at, tz),
            "started_at": api_time(task.started_at, tz),
            "finished_at": api_time(task.finished_at, tz),
            "expires_at": api_time(task.expires_at, tz),
            "expired": cls.get_expired(task),
            "error": cls.get_error(task),
            "credits": cls.get_credits(task),
            "results": cls.get_results(task),
            "poll_url": cls.get_poll_url(task),
        }

    @staticmethod
    @extend_schema_field(serializers.CharField(allow_null=True, help_text="null: none"))
    def get_webhook_url(obj: Task) -> str | None:
        return obj.webhook_url or None

    @staticmethod
    def get_expired(obj: Task) -> bool:
        return obj.results_expired_at is not None

    @staticmethod
    @extend_schema_field(ErrorSerializer(allow_null=True))
    def get_error(obj: Task) -> dict[str, str] | None:
        if not obj.error_code:
            return None
        return {"code": obj.error_code, "message": obj.error_message, "kind": obj.error_kind}

    @staticmethod
    @extend_schema_field(CreditsOfTaskSerializer)
    def get_credits(obj: Task) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in ("reserved", "charged", "refunded"):
            micro = getattr(obj, f"{name}_micro")
            out[name], out[f"{name}_micro"] = format_credits(micro), micro
        return out

    @staticmethod
    @extend_schema_field(ResultSerializer(many=True))
    def get_results(obj: Task) -> list[dict[str, Any]]:
        if obj.results_expired_at is not None:
            return []
        return [
            {
                "url": reverse("api-task-result", args=[obj.pk, n]),
                "mime": r.get("mime"),
                "bytes": r.get("bytes"),
                "width": r.get("width"),
                "height": r.get("height"),
                "duration_ms": r.get("duration_ms"),
            }
            for n, r in enumerate(obj.results)
        ]

    @staticmethod
    def get_poll_url(obj: Task) -> str:
        return task_detail_url(obj.pk)


class UploadSerializer(serializers.ModelSerializer):
    class Meta:
        model = Upload
        fields = [
            "id",
            "original_name",
            "mime",
            "bytes",
            "width",
            "height",
            "duration_ms",
            "created_at",
        ]
