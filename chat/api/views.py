"""Chat API: sessions, and a turn answered as JSON or streamed as server-sent events."""

from __future__ import annotations

import asyncio
import weakref
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.handlers.asgi import ASGIRequest
from django.http import HttpRequest, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from chat import selectors, services
from chat.api.serializers import (
    ChatMessageSerializer,
    ChatSessionCreateSerializer,
    ChatSessionSerializer,
    ChatSessionUpdateSerializer,
    ChatTurnSerializer,
    message_shape,
)
from chat.streaming import Turn
from rivya.errors import ValidationFailed
from rivya.idempotency import HEADER, request_fingerprint
from rivya.pagination import CursorPagination
from rivya.parsers import JSONParser

EVENT_STREAM = "text/event-stream"


class SessionPagination(CursorPagination):
    """Newest activity first."""

    ordering = ("-updated_at", "-id")


class MessagePagination(CursorPagination):
    """In the order of the conversation."""

    ordering = ("created_at", "id")


class EventStreamRenderer(BaseRenderer):
    """Lets a client ask for ``text/event-stream``; errors stay JSON (``finalize_response``)."""

    media_type = EVENT_STREAM
    format = "sse"

    def render(
        self, data: Any, accepted_media_type: Any = None, renderer_context: Any = None
    ) -> Any:
        return JSONRenderer().render(data)


def _messages_link(link: str | None) -> str | None:
    """A page link of the session's messages, at the messages endpoint."""
    if link is None:
        return None
    parts = urlsplit(link)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/messages/"))


def _body(request: Request) -> dict[str, Any]:
    if not isinstance(request.data, dict):
        raise ValidationFailed({"non_field_errors": ["Send a JSON object."]})
    return request.data


class SessionListCreateView(APIView):
    parser_classes = [JSONParser]

    @extend_schema(
        parameters=[OpenApiParameter("cursor", str)], responses=ChatSessionSerializer(many=True)
    )
    def get(self, request: Request) -> Response:
        """The caller's chat sessions, newest activity first (cursor-paginated)."""
        paginator = SessionPagination()
        page = paginator.paginate_queryset(
            selectors.sessions_for_user(user=request.user), request, view=self
        )
        return paginator.get_paginated_response(ChatSessionSerializer(page, many=True).data)

    @extend_schema(request=ChatSessionCreateSerializer, responses={201: ChatSessionSerializer})
    def post(self, request: Request) -> Response:
        """Start a chat with a chat model (``GET /api/v1/models/``, category ``chat``)."""
        data = _body(request)
        session = services.create_session(
            user=request.user, model_slug=data.get("model"), title=data.get("title") or ""
        )
        return Response(ChatSessionSerializer(session).data, status=201)


class SessionDetailView(APIView):
    parser_classes = [JSONParser]

    @extend_schema(responses=ChatSessionSerializer)
    def get(self, request: Request, pk: str) -> Response:
        """The session, with the first page of its messages (``messages``: cursor-paginated,
        in conversation order; follow ``messages.next``)."""
        session = services.session_for_user(user=request.user, session_id=pk)
        paginator = MessagePagination()
        page = paginator.paginate_queryset(
            selectors.messages_of(session=session), request, view=self
        )
        body = dict(ChatSessionSerializer(session).data)
        body["messages"] = {
            "next": _messages_link(paginator.get_next_link()),
            "previous": _messages_link(paginator.get_previous_link()),
            "results": ChatMessageSerializer(page, many=True).data,
        }
        return Response(body)

    @extend_schema(request=ChatSessionUpdateSerializer, responses=ChatSessionSerializer)
    def patch(self, request: Request, pk: str) -> Response:
        """Rename the session."""
        session = services.session_for_user(user=request.user, session_id=pk)
        data = _body(request)
        if "title" not in data:
            raise ValidationFailed({"title": ["This field is required."]})
        session = services.rename_session(session=session, title=data["title"])
        return Response(ChatSessionSerializer(session).data)

    @extend_schema(responses={204: None})
    def delete(self, request: Request, pk: str) -> Response:
        """Delete the session (a reply still streaming runs to its end and is settled)."""
        session = services.session_for_user(user=request.user, session_id=pk)
        services.delete_session(session=session)
        return Response(status=204)


class MessageListCreateView(APIView):
    parser_classes = [JSONParser]
    renderer_classes = [JSONRenderer, EventStreamRenderer]

    @extend_schema(
        parameters=[OpenApiParameter("cursor", str)], responses=ChatMessageSerializer(many=True)
    )
    def get(self, request: Request, pk: str) -> Response:
        """The session's messages in conversation order (cursor-paginated)."""
        session = services.session_for_user(user=request.user, session_id=pk)
        paginator = MessagePagination()
        page = paginator.paginate_queryset(
            selectors.messages_of(session=session), request, view=self
        )
        return paginator.get_paginated_response(ChatMessageSerializer(page, many=True).data)

    @extend_schema(
        request=ChatTurnSerializer,
        parameters=[OpenApiParameter(HEADER, str, location=OpenApiParameter.HEADER)],
        responses={
            201: OpenApiResponse(
                ChatMessageSerializer,
                "the settled assistant message (JSON), or with `Accept: text/event-stream` "
                "server-sent events: `message`, `delta`…, `settlement` (the settled message)",
            ),
            402: OpenApiResponse(description="insufficient credits: nothing was sent upstream"),
        },
    )
    def post(self, request: Request, pk: str) -> Any:
        """Send a message and get the reply. Credits are held for the estimate first and
        settled on the usage the provider reports; a replayed ``Idempotency-Key`` is billed
        once. The reply is finished and settled even when the client goes away mid-stream."""
        data = _body(request)
        key = request.headers.get(HEADER)
        start = services.start_turn(
            user=request.user,
            session_id=pk,
            content=data.get("content"),
            max_tokens=data.get("max_tokens"),
            params=data.get("params"),
            idempotency_key=key,
            fingerprint=request_fingerprint(request) if key is not None else "",
        )
        services.release_connection()
        turn = Turn(start, message_shape)
        streaming = request.accepted_renderer.format == EventStreamRenderer.format
        if streaming:
            response = StreamingHttpResponse(turn.events(), status=201, content_type=EVENT_STREAM)
            response["Cache-Control"] = "no-cache"
            response["X-Accel-Buffering"] = "no"
        else:
            response = StreamingHttpResponse(
                turn.body(), status=201, content_type="application/json"
            )
        if start.replayed:
            response["Idempotent-Replayed"] = "true"
        response.turn = turn  # started by ``messages_view`` as soon as this view returns
        return response

    def finalize_response(self, request: Request, response: Any, *args: Any, **kwargs: Any) -> Any:
        # Errors are JSON whatever the client accepts.
        if isinstance(response, Response):
            response.accepted_renderer = JSONRenderer()
            response.accepted_media_type = "application/json"
            request.accepted_renderer = response.accepted_renderer
        return super().finalize_response(request, response, *args, **kwargs)


_messages_drf_view = MessageListCreateView.as_view()


@csrf_exempt  # DRF's view enforces CSRF for session authentication
async def messages_view(request: HttpRequest, pk: Any) -> Any:
    """``MessageListCreateView`` served so that a turn starts reading its reply the moment the
    turn is recorded, whether or not the client is still there to read the response.

    Under ASGI, Django cancels a view whose client disconnects; the DRF view (sync, in a thread)
    runs to its end regardless, and the callback starts the turn on this event loop when it
    returns. Without this, a client that leaves before the response is read would leave its
    turn unstarted, its credits held until the beat's sweep. Under WSGI (tests) the response
    body starts the turn, in the loop that reads it."""
    if not isinstance(request, ASGIRequest):  # WSGI: GET, or tests
        return await sync_to_async(_messages_drf_view)(request, pk=pk)
    # At most CHAT_START_CONCURRENCY turns are recorded at once (each needs a database
    # connection for that moment); the others wait here, holding nothing.
    starts = _turn_starts()
    await starts.acquire()
    call = asyncio.ensure_future(sync_to_async(_record_turn)(request, pk))
    call.add_done_callback(lambda _call: starts.release())
    call.add_done_callback(_start_turn)
    return await asyncio.shield(call)


_STARTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)


def _record_turn(request: HttpRequest, pk: Any) -> Any:
    """The DRF view, in this request's own thread, whose connection is closed when it is done
    (the thread ends with the request: a connection left open would linger unused)."""
    try:
        return _messages_drf_view(request, pk=pk)
    finally:
        services.release_connection()


def _turn_starts() -> asyncio.Semaphore:
    loop = asyncio.get_running_loop()
    if loop not in _STARTS:
        _STARTS[loop] = asyncio.Semaphore(settings.CHAT_START_CONCURRENCY)
    return _STARTS[loop]


def _start_turn(call: asyncio.Future[Any]) -> None:
    if call.cancelled() or call.exception() is not None:
        return
    turn = getattr(call.result(), "turn", None)
    if isinstance(turn, Turn):
        turn.run()


# drf-spectacular documents the endpoint from the DRF view.
messages_view.cls = MessageListCreateView  # type: ignore[attr-defined]
messages_view.initkwargs = {}  # type: ignore[attr-defined]
