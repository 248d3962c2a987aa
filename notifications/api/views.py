from __future__ import annotations

import uuid
from typing import Any

from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import generics, serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from notifications import selectors, services
from rivya.errors import NotFound


class NotificationSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    kind = serializers.CharField()
    title = serializers.CharField()
    body = serializers.CharField()
    task_id = serializers.SerializerMethodField()
    link = serializers.CharField()
    read = serializers.SerializerMethodField()
    read_at = serializers.DateTimeField()
    created_at = serializers.DateTimeField()

    def get_task_id(self, obj: Any) -> str | None:
        return obj.subject_id if obj.subject_type == "tasks.task" else None

    def get_read(self, obj: Any) -> bool:
        return obj.read_at is not None


class NotificationListView(generics.ListAPIView):
    """The caller's notifications, newest first; ``?unread=true`` for unread only."""

    serializer_class = NotificationSerializer

    def get_queryset(self) -> Any:
        unread = self.request.query_params.get("unread", "").lower() in ("1", "true", "yes")
        return selectors.notifications_for_user(user=self.request.user, unread_only=unread)


class NotificationReadView(APIView):
    @extend_schema(request=None, responses=NotificationSerializer)
    def post(self, request: Request, pk: uuid.UUID) -> Response:
        services.notification_mark_read(user=request.user, notification_id=pk)
        notification = selectors.notification_get_for_user(user=request.user, notification_id=pk)
        if notification is None:
            raise NotFound("No such notification.")
        return Response(NotificationSerializer(notification).data)


_count = inline_serializer("UnreadCount", {"unread": serializers.IntegerField()})


class NotificationReadAllView(APIView):
    @extend_schema(
        request=None,
        responses=inline_serializer("MarkedRead", {"marked_read": serializers.IntegerField()}),
    )
    def post(self, request: Request) -> Response:
        return Response({"marked_read": services.notification_mark_all_read(user=request.user)})


class UnreadCountView(APIView):
    @extend_schema(responses=_count)
    def get(self, request: Request) -> Response:
        return Response({"unread": selectors.unread_count(user=request.user)})
