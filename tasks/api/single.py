"""``POST /api/v1/single/<type>/``: a single task run inside the request (docs/single.md).

``single_view`` (async, served by Django's ASGI handler under ``make run``, rivya/asgi.py) takes a
gate slot once the caller has authenticated, then runs the three phases of
``tasks.single.services``: the database phases on a small pool of threads of their own
(``SINGLE_DB_THREADS``, each keeping its connection), the provider call on the event loop, so a
request waiting for its provider holds no thread and no database connection. The work is
shielded from the client: one that hangs up does not stop a task half-way (it finishes, is
settled and shows in History).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.files.uploadedfile import UploadedFile
from django.core.handlers.asgi import ASGIRequest
from django.db import close_old_connections
from django.http import HttpRequest, JsonResponse
from django.urls import reverse
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    inline_serializer,
)
from rest_framework import serializers
from rest_framework.authentication import SessionAuthentication
from rest_framework.exceptions import APIException
from rest_framework.parsers import MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.settings import api_settings
from rest_framework.views import APIView

from rivya.errors import DomainError, ValidationFailed
from rivya.exceptions import error_body, json_method_not_allowed
from rivya.idempotency import HEADER, request_fingerprint
from rivya.parsers import JSONParser
from tasks.api.serializers import ErrorSerializer, TaskSerializer
from tasks.models import Task
from tasks.single.gate import retry_after_s, single_gate
from tasks.single.registry import REGISTRY, get_service
from tasks.single.services import (
    SingleStart,
    single_execute,
    single_finish,
    single_result,
    single_start,
)

logger = logging.getLogger(__name__)

S = Task.Status


def outcome_status(task: Task) -> int:
    """The HTTP status that tells a client how its single task ended."""
    if task.status == S.SUCCESS:
        return 200
    if task.status == S.REJECTED:
        return 422
    if task.status == S.CANCELLED:
        return 409
    if task.error_code == "insufficient_credits":
        return 402
    if task.error_code == "upstream_timeout":
        return 504
    return 502 if task.error_kind == "provider" else 503


def outcome_body(task: Task, result: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{task_id, status, result, credits, poll_url}``, and ``error`` unless it succeeded.
    ``result`` None: read back from the stored result."""
    shaped = TaskSerializer(task).data
    body: dict[str, Any] = {"task_id": str(task.pk), "status": task.status}
    if task.status == S.SUCCESS:
        if result is None:
            result = single_result(task)
        if result is None:  # its result has expired (or its file is gone)
            body["result"] = None
            body["expired"] = task.results_expired_at is not None
        else:
            result = dict(result)
            if task.results and task.results[0].get("mime") != "application/json":
                result["url"] = reverse("api-task-result", args=[task.pk, 0])
            body["result"] = result
    else:
        body["result"] = None
        body["error"] = shaped["error"] or {
            "code": "task_cancelled" if task.status == S.CANCELLED else "failed",
            "message": "The task was cancelled." if task.status == S.CANCELLED else "",
            "kind": "user",
        }
    body["credits"] = shaped["credits"]
    body["poll_url"] = shaped["poll_url"]
    return body


def start_response(start: SingleStart) -> Response:
    """Phase 1's answer when there is nothing to run in this request."""
    task = start.task
    if start.deferred:  # answered 202 the first time: the task as it is now
        body = TaskSerializer(task).data
        response = Response(body, status=202, headers={"Location": body["poll_url"]})
        if start.replayed:
            response["Idempotent-Replayed"] = "true"
        return response
    if task.status in Task.UNFINISHED:  # a replay while the first request still runs
        return Response(
            {
                **error_body(
                    "idempotency_in_progress",
                    "The request with this idempotency key is still running; retry shortly.",
                ),
                "task_id": str(task.pk),
                "status": task.status,
            },
            status=409,
        )
    response = Response(outcome_body(task), status=outcome_status(task))
    if start.replayed:
        response["Idempotent-Replayed"] = "true"
    return response


class SingleTaskView(APIView):
    parser_classes = [JSONParser, MultiPartParser]

    @extend_schema(
        operation_id="single_create",
        parameters=[
            OpenApiParameter("single_type", str, OpenApiParameter.PATH, enum=sorted(REGISTRY)),
            OpenApiParameter(HEADER, str, location=OpenApiParameter.HEADER),
            OpenApiParameter(
                "Prefer",
                str,
                location=OpenApiParameter.HEADER,
                description="`respond-async`: run in the background, answer 202 with the task",
            ),
        ],
        request={
            "application/json": inline_serializer(
                "SingleRequest",
                {
                    "model": serializers.CharField(required=False),
                    "text": serializers.CharField(required=False),
                    "source_language": serializers.CharField(required=False),
                    "target_language": serializers.CharField(required=False),
                    "prompt": serializers.CharField(required=False),
                    "max_tokens": serializers.IntegerField(required=False),
                    "voice": serializers.CharField(required=False),
                    "params": serializers.JSONField(required=False),
                },
            ),
            "multipart/form-data": inline_serializer(
                "SingleMultipartRequest",
                {
                    "model": serializers.CharField(required=False),
                    "files": serializers.ListField(child=serializers.FileField()),
                    "language": serializers.CharField(required=False),
                    "prompt": serializers.CharField(required=False),
                    "params": serializers.CharField(required=False),
                },
            ),
        },
        responses={
            200: OpenApiResponse(
                inline_serializer(
                    "SingleOutcome",
                    {
                        "task_id": serializers.UUIDField(),
                        "status": serializers.CharField(),
                        "result": serializers.JSONField(allow_null=True),
                        "error": ErrorSerializer(required=False),
                        "credits": serializers.JSONField(),
                        "poll_url": serializers.CharField(),
                    },
                ),
                "the result; the same shape with `error` for 402, 422, 502, 503, 504",
            ),
            202: OpenApiResponse(TaskSerializer, "Prefer: respond-async: the task to poll"),
            429: OpenApiResponse(description="the gate is full: retry after Retry-After"),
        },
    )
    def post(self, request: Request, single_type: str) -> Response:
        """Run a transcription, completion, translation or text-to-speech task and answer with
        its result. Credits are held before the provider is called and settled on the outcome:
        a failure refunds them."""
        request.data  # noqa: B018 - parses the body: only then is an oversized file known
        if getattr(request._request, "upload_too_large", False):
            raise DomainError("A file is over the upload limit.", code="file_too_large", status=413)
        data, files = _body(request)
        key = request.headers.get(HEADER)
        start = single_start(
            user=request.user,
            single_type=single_type,
            data=data,
            files=files,
            prefer_async="respond-async" in request.headers.get("Prefer", "").lower(),
            idempotency_key=key,
            fingerprint=request_fingerprint(request) if key is not None else "",
        )
        response = start_response(start) if start.run is None else Response(status=200)
        response.single_start = start  # type: ignore[attr-defined]
        return response


def _body(request: Request) -> tuple[dict[str, Any], list[Any]]:
    data = request.data
    if not hasattr(data, "getlist"):  # JSON
        if not isinstance(data, dict) or not data:
            raise ValidationFailed({"body": ["Send a JSON object (or multipart with files)."]})
        return dict(data), []
    files = request.FILES.getlist("files")
    other_files = sorted(set(request.FILES) - {"files"})
    if other_files:
        raise ValidationFailed(
            {k: ["Send files in the multipart field `files`."] for k in other_files}
        )
    if any(not isinstance(v, UploadedFile) for v in data.getlist("files")):
        raise ValidationFailed({"files": ["Send files as file parts."]})
    fields = {k: data.get(k) for k in data if k not in request.FILES and k != "files"}
    if not fields and not files:
        raise ValidationFailed({"body": ["The request is empty."]})
    return fields, files


_single_drf_view = SingleTaskView.as_view()

_EXECUTORS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, ThreadPoolExecutor] = (
    weakref.WeakKeyDictionary()
)


def _database_phase(request: HttpRequest) -> Callable[..., Any]:
    """How a database phase runs: under ASGI on this loop's pool of SINGLE_DB_THREADS threads,
    whose connections persist (checked before and after each phase, as a WSGI thread's are);
    otherwise (the test client) in the caller's thread, inside its transaction."""
    if not isinstance(request, ASGIRequest):
        return lambda fn, *args, **kwargs: sync_to_async(fn)(*args, **kwargs)
    loop = asyncio.get_running_loop()
    executor = _EXECUTORS.get(loop)
    if executor is None:
        executor = _EXECUTORS[loop] = ThreadPoolExecutor(
            settings.SINGLE_DB_THREADS, thread_name_prefix="single-db"
        )

    def in_pool(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        def run() -> Any:
            close_old_connections()
            try:
                return fn(*args, **kwargs)
            finally:
                close_old_connections()

        return loop.run_in_executor(executor, run)

    return in_pool


def gate_lease_s() -> float:
    """How long a gate slot lasts: longer than any request holding it may run (validation and
    file upload, the provider call's budget, recording the outcome)."""
    return float(settings.SINGLE_TASK_TIMEOUT_S + settings.SINGLE_DEADLINE_MARGIN_S + 60)


@csrf_exempt  # DRF's view enforces CSRF for session authentication
async def single_view(request: HttpRequest, single_type: str) -> Any:
    if request.method != "POST":
        return json_method_not_allowed(request, ["POST"])
    if get_service(single_type) is None:
        return JsonResponse(
            error_body("not_found", f"No single task type {single_type!r}."), status=404
        )
    phase = _database_phase(request)
    if not await phase(caller_known, request):
        return await phase(_single_drf_view, request, single_type=single_type)
    gate = single_gate()
    # A client that hangs up while it waits for a place just leaves (the gate gives back a
    # place taken as it is cancelled).
    slot = await gate.acquire(lease_s=gate_lease_s(), wait_s=settings.SINGLE_GATE_WAIT_S)
    if slot is None:
        wait = retry_after_s()
        response = JsonResponse(
            error_body(
                "system_busy",
                f"All {settings.SINGLE_MAX_CONCURRENT} places for single tasks are taken; "
                f"retry in {wait} s.",
                kind="infra",
            ),
            status=429,
        )
        response["Retry-After"] = str(wait)
        return response
    # From here on a client that hangs up cancels this view, not the work: the task is
    # recorded, run and settled (and shows in History). No await before this line, so the slot
    # always goes to the work, which gives it back.
    work = asyncio.ensure_future(_run(request, single_type, phase, gate, slot))
    return await asyncio.shield(work)


def caller_known(request: HttpRequest) -> bool:
    """Whether the request comes from a known caller (a signed-in session, or a valid API key),
    checked before it may wait for a gate slot: anonymous traffic never takes a place from
    paying users. It changes nothing on the request: the view then authenticates for real
    (CSRF included) and answers 401/403 for the others."""
    session_user = getattr(request, "user", None)  # AuthenticationMiddleware's (lazy)
    if session_user is not None and session_user.is_authenticated:
        return True
    bare = Request(request)  # no parsers, no authenticators: only headers are read below
    for authenticator_class in api_settings.DEFAULT_AUTHENTICATION_CLASSES:
        if issubclass(authenticator_class, SessionAuthentication):
            continue
        try:
            if authenticator_class().authenticate(bare):
                return True
        except APIException:
            return False
    return False


async def _run(
    request: HttpRequest, single_type: str, phase: Callable[..., Any], gate: Any, slot: Any
) -> Any:
    try:
        response = await phase(_single_drf_view, request, single_type=single_type)
        start: SingleStart | None = getattr(response, "single_start", None)
        if start is None or start.run is None:
            return response
        outcome = await single_execute(start.run)
        try:
            task, result = await phase(single_finish, start.run, outcome)
        except Exception:
            logger.exception("single task %s: recording the outcome failed", start.task.pk)
            return JsonResponse(
                {
                    **error_body(
                        "outcome_not_recorded",
                        "The task ran but its outcome could not be recorded. If it does not "
                        "show as finished in History within a few minutes, it is refunded.",
                        kind="infra",
                    ),
                    "task_id": str(start.task.pk),
                },
                status=503,
            )
        return JsonResponse(outcome_body(task, result), status=outcome_status(task))
    finally:
        await gate.release(slot)


# drf-spectacular documents the endpoint from the DRF view.
single_view.cls = SingleTaskView  # type: ignore[attr-defined]
single_view.initkwargs = {}  # type: ignore[attr-defined]
