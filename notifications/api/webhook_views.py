"""``/api/v1/webhooks/…``: the account's signing secret, its endpoints, and the messages sent
(with their attempts), each resendable. Every lookup is the caller's own: another account's id
is "not found"."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import generics, serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from notifications import selectors, webhooks
from notifications.models import WebhookEndpoint, WebhookMessage
from rivya.errors import NotFound, ValidationFailed


class EndpointSerializer(serializers.ModelSerializer):
    class Meta:
        model = WebhookEndpoint
        fields = [
            "id",
            "url",
            "description",
            "event_types",
            "enabled",
            "disabled_reason",
            "failing_since",
            "created_at",
            "updated_at",
        ]


class EndpointWithSecretSerializer(EndpointSerializer):
    secret = serializers.CharField(help_text="shown once: on creation and on rotation")

    class Meta(EndpointSerializer.Meta):
        fields = [*EndpointSerializer.Meta.fields, "secret"]


class EndpointInputSerializer(serializers.Serializer):
    """For the schema; the service checks every field and answers field errors."""

    url = serializers.CharField()
    description = serializers.CharField(required=False, allow_blank=True)
    event_types = serializers.ListField(
        child=serializers.ChoiceField(choices=list(webhooks.EVENT_TYPES)), required=False
    )
    enabled = serializers.BooleanField(required=False)


class AttemptSerializer(serializers.Serializer):
    number = serializers.IntegerField()
    trigger = serializers.CharField()
    url = serializers.CharField()
    started_at = serializers.DateTimeField()
    status_code = serializers.IntegerField(allow_null=True)
    succeeded = serializers.BooleanField()
    latency_ms = serializers.IntegerField()
    response_body = serializers.CharField()
    error = serializers.CharField()


class MessageSerializer(serializers.ModelSerializer):
    webhook_id = serializers.CharField(help_text="the webhook-id header of every attempt")
    endpoint_id = serializers.UUIDField(allow_null=True)
    task_id = serializers.SerializerMethodField()

    class Meta:
        model = WebhookMessage
        fields = [
            "id",
            "webhook_id",
            "event_id",
            "event_type",
            "endpoint_id",
            "for_task_url",
            "url",
            "task_id",
            "status",
            "attempts",
            "next_attempt_at",
            "last_status_code",
            "last_error",
            "created_at",
            "finished_at",
            "payload",
        ]

    def get_task_id(self, obj: WebhookMessage) -> str | None:
        return obj.subject_id if obj.subject_type == "tasks.task" else None


class MessageDetailSerializer(MessageSerializer):
    attempts_made = AttemptSerializer(many=True)

    class Meta(MessageSerializer.Meta):
        fields = [*MessageSerializer.Meta.fields, "attempts_made"]


def _object(request: Request) -> dict[str, Any]:
    if not isinstance(request.data, dict):
        raise ValidationFailed({"non_field_errors": ["Send a JSON object."]})
    return dict(request.data)


_secret = inline_serializer(
    "WebhookSecret",
    {
        "secret": serializers.CharField(),
        "previous_valid_until": serializers.DateTimeField(allow_null=True),
    },
)


def _secret_answer(row: Any) -> dict[str, Any]:
    return {
        "secret": row.secret,
        "previous_valid_until": row.previous_until if row.previous_secret else None,
    }


class WebhookSecretView(APIView):
    """The account's default signing secret (created on first read): it signs deliveries to a
    task's own ``webhook_url``."""

    @extend_schema(responses=_secret)
    def get(self, request: Request) -> Response:
        return Response(_secret_answer(webhooks.account_secret(user=request.user)))


class WebhookSecretRotateView(APIView):
    """A new default secret; the previous one keeps signing beside it during the overlap."""

    @extend_schema(request=None, responses=_secret)
    def post(self, request: Request) -> Response:
        row = webhooks.secret_rotate(webhooks.account_secret(user=request.user))
        return Response(_secret_answer(row))


class EndpointListCreateView(generics.ListAPIView):
    serializer_class = EndpointSerializer

    def get_queryset(self) -> Any:
        return selectors.webhook_endpoints_for_user(user=self.request.user)

    @extend_schema(request=EndpointInputSerializer, responses={201: EndpointWithSecretSerializer})
    def post(self, request: Request) -> Response:
        data = _object(request)
        unknown = sorted(set(data) - {"url", "description", "event_types"})
        if unknown:
            raise ValidationFailed({k: ["Unknown field."] for k in unknown})
        endpoint = webhooks.endpoint_create(
            user=request.user,
            url=data.get("url"),
            description=data.get("description", ""),
            event_types=data.get("event_types"),
        )
        return Response(EndpointWithSecretSerializer(endpoint).data, status=201)


class EndpointDetailView(APIView):
    @extend_schema(responses=EndpointSerializer)
    def get(self, request: Request, pk: Any) -> Response:
        endpoint = webhooks.endpoint_for_user(user=request.user, endpoint_id=pk)
        return Response(EndpointSerializer(endpoint).data)

    @extend_schema(request=EndpointInputSerializer(partial=True), responses=EndpointSerializer)
    def patch(self, request: Request, pk: Any) -> Response:
        endpoint = webhooks.endpoint_for_user(user=request.user, endpoint_id=pk)
        endpoint = webhooks.endpoint_update(endpoint=endpoint, changes=_object(request))
        return Response(EndpointSerializer(endpoint).data)

    @extend_schema(responses={204: None})
    def delete(self, request: Request, pk: Any) -> Response:
        webhooks.endpoint_delete(
            endpoint=webhooks.endpoint_for_user(user=request.user, endpoint_id=pk)
        )
        return Response(status=204)


class EndpointRotateSecretView(APIView):
    @extend_schema(request=None, responses=EndpointWithSecretSerializer)
    def post(self, request: Request, pk: Any) -> Response:
        endpoint = webhooks.endpoint_for_user(user=request.user, endpoint_id=pk)
        return Response(EndpointWithSecretSerializer(webhooks.secret_rotate(endpoint)).data)


class MessageListView(generics.ListAPIView):
    """Messages sent (or to be sent) for the account, newest first. Filters: ``task`` (a task
    id), ``status``, ``endpoint`` (an endpoint id)."""

    serializer_class = MessageSerializer

    @extend_schema(
        parameters=[
            OpenApiParameter("task", str, description="a task id"),
            OpenApiParameter("status", str, enum=list(WebhookMessage.Status.values)),
            OpenApiParameter("endpoint", str, description="an endpoint id"),
        ]
    )
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().get(request, *args, **kwargs)

    def get_queryset(self) -> Any:
        params = self.request.query_params
        status = params.get("status") or None
        if status is not None and status not in WebhookMessage.Status.values:
            raise ValidationFailed(
                {"status": [f"One of {', '.join(WebhookMessage.Status.values)}."]}
            )
        return selectors.webhook_messages_for_user(
            user=self.request.user,
            task_id=params.get("task") or None,
            status=status,
            endpoint_id=params.get("endpoint") or None,
        )


def _message(request: Request, pk: Any) -> WebhookMessage:
    message = selectors.webhook_message_get_for_user(user=request.user, message_id=pk)
    if message is None:
        raise NotFound("No such webhook message.")
    return message


class MessageDetailView(APIView):
    @extend_schema(responses=MessageDetailSerializer)
    def get(self, request: Request, pk: Any) -> Response:
        return Response(MessageDetailSerializer(_message(request, pk)).data)


class MessageResendView(APIView):
    """Send the message again now (succeeded or failed alike): a new attempt, same
    ``webhook-id``."""

    @extend_schema(request=None, responses={202: MessageSerializer})
    def post(self, request: Request, pk: Any) -> Response:
        message = webhooks.webhook_resend(message=_message(request, pk))
        return Response(MessageSerializer(message).data, status=202)
