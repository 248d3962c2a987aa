"""Thin API views: validate the transport, call a service, serialize the result."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

from django.core.cache import cache
from django.core.exceptions import RequestDataTooBig
from django.core.files.storage import default_storage
from django.core.files.uploadedfile import UploadedFile
from django.http import (
    FileResponse,
    HttpRequest,
    HttpResponse,
    HttpResponseRedirect,
    JsonResponse,
)
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import generics, permissions
from rest_framework.exceptions import ParseError
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from billing import services as billing
from rivya import key_cache
from rivya import services as services_auth
from rivya.errors import (
    MAX_JSON_DEPTH,
    DomainError,
    NotFound,
    ResultsExpired,
    ValidationFailed,
    contains_nul,
    json_depth,
)
from rivya.exceptions import domain_error_answer, error_body, json_method_not_allowed
from rivya.idempotency import json_fingerprint, recorded_headers, run_idempotent
from rivya.pagination import CursorPagination
from rivya.parsers import JSONParser
from tasks import selectors, services
from tasks.api.serializers import (
    ModelSerializer,
    TaskCreateSerializer,
    TaskSerializer,
    UploadSerializer,
)
from tasks.models import Task
from tasks.providers.base import InvalidSignature, ProviderError
from tasks.providers.registry import get_provider, known_provider

logger = logging.getLogger(__name__)


class ModelListView(generics.ListAPIView):
    """Enabled models with their parameter schema and price (public)."""

    permission_classes = [permissions.AllowAny]
    serializer_class = ModelSerializer
    pagination_class = None
    queryset = selectors.models_enabled()


def _too_large(request: Request) -> None:
    if getattr(request._request, "upload_too_large", False):
        raise DomainError("A file is over the upload limit.", code="file_too_large", status=413)


TASK_FIELDS = frozenset(
    {"model", "prompt", "params", "upload_ids", "webhook_url", "webhook_events"}
)


def _task_input(request: Request) -> dict[str, Any]:
    data = request.data
    if hasattr(data, "getlist"):  # multipart or form
        _too_large(request)
        # As for JSON: a misnamed field (``file`` for ``files``) must not silently submit, and
        # bill, a generation without it.
        unknown = sorted(set(data) - {*TASK_FIELDS, "files", "csrfmiddlewaretoken"})
        if unknown:
            raise ValidationFailed({k: ["Unknown field."] for k in unknown})
        # DRF merges the file parts into ``data``; a text value among them means the client sent
        # file names or contents as form fields, and the files would be silently lost.
        if any(not isinstance(v, UploadedFile) for v in data.getlist("files")):
            raise ValidationFailed({"files": ["Send reference files as file parts."]})
        params: Any = data.get("params") or None
        if isinstance(params, str):
            try:
                params = json.loads(params)
            except (ValueError, RecursionError):
                raise ValidationFailed({"params": ["Must be a JSON object."]}) from None
            if json_depth(params) > MAX_JSON_DEPTH:
                raise ValidationFailed({"params": [f"Nested deeper than {MAX_JSON_DEPTH} levels."]})
        return {
            "model_slug": data.get("model"),
            "prompt": data.get("prompt", ""),
            "params": params,
            "upload_ids": data.getlist("upload_ids"),
            "files": request.FILES.getlist("files"),
            "webhook_url": data.get("webhook_url", ""),
            # As repeated form fields, like upload_ids.
            "webhook_events": data.getlist("webhook_events") or None,
        }
    if not isinstance(data, dict):
        raise ValidationFailed({"non_field_errors": ["Send a JSON object."]})
    unknown = sorted(set(data) - TASK_FIELDS)
    if unknown:
        raise ValidationFailed({k: ["Unknown field."] for k in unknown})
    return _json_task_input(data)


def _json_task_input(data: dict[str, Any]) -> dict[str, Any]:
    return {
        "model_slug": data.get("model"),
        "prompt": data.get("prompt", ""),
        "params": data.get("params"),
        "upload_ids": data.get("upload_ids") or [],
        "webhook_url": data.get("webhook_url", ""),
        "webhook_events": data.get("webhook_events"),
    }


class TaskListCreateView(APIView):
    parser_classes = [JSONParser, MultiPartParser, FormParser]

    @classmethod
    def as_view(cls, **initkwargs: Any) -> Any:
        """DRF's view, with the most common request of all taken first: a JSON submit with an
        API key, with or without an ``Idempotency-Key`` (``submit_json``)."""
        drf_view = super().as_view(**initkwargs)
        probe = cls(**initkwargs)
        probe.setup(HttpRequest())  # as for every request (which lets HEAD be answered by GET)
        headers = probe.default_response_headers  # what DRF adds to each answer (Allow)

        def view(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if is_plain_json_submit(request):
                return submit_json(request, drf_view, headers)
            return drf_view(request, *args, **kwargs)

        view.cls = drf_view.cls  # type: ignore[attr-defined] - for the schema generator
        view.initkwargs = drf_view.initkwargs  # type: ignore[attr-defined]
        return csrf_exempt(view)

    @extend_schema(
        parameters=[
            OpenApiParameter("status", str),
            OpenApiParameter("category", str),
            OpenApiParameter("model", str),
            OpenApiParameter("cursor", str),
        ],
        responses=TaskSerializer(many=True),
    )
    def get(self, request: Request) -> Response:
        """The caller's generations, newest first (cursor-paginated)."""
        q = request.query_params
        status, category, model = q.get("status"), q.get("category"), q.get("model")
        errors = selectors.history_filter_errors(status=status, category=category, model=model)
        if errors:
            raise ValidationFailed(errors)
        qs = selectors.history_for_user(
            user=request.user, status=status, category=category, model=model
        )
        paginator = CursorPagination()
        page = paginator.paginate_queryset(qs, request, view=self)
        return paginator.get_paginated_response(TaskSerializer(page, many=True).data)

    @extend_schema(
        request=TaskCreateSerializer,
        responses={
            202: TaskSerializer,
            402: OpenApiResponse(TaskSerializer, "insufficient credits: the FAILED task"),
        },
    )
    def post(self, request: Request) -> Response:
        """Submit a generation (JSON with ``upload_ids``, or multipart with ``files``)."""

        def create() -> Response:
            outcome = services.task_submit(user=request.user, **_task_input(request))
            body = TaskSerializer(outcome.task).data
            if not outcome.accepted:
                return Response(body, status=402)
            return Response(body, status=202, headers={"Location": body["poll_url"]})

        return run_idempotent(request, create)


def is_plain_json_submit(request: HttpRequest) -> bool:
    """A JSON body in UTF-8, an API key, and nothing for DRF to negotiate (no ``Accept`` other
    than JSON or anything, no ``?format=``)."""
    meta = request.META
    return (
        request.method == "POST"
        and request.content_type == "application/json"
        and request.content_params.get("charset", "utf-8").lower() in ("utf-8", "utf8")
        and meta.get("HTTP_ACCEPT", "*/*") in ("*/*", "application/json")
        and not meta.get("QUERY_STRING")
        and meta.get("HTTP_AUTHORIZATION", "").startswith("Bearer ")
    )


def submit_json(request: HttpRequest, drf_view: Any, headers: dict[str, str]) -> HttpResponse:
    """``POST /api/v1/tasks/`` for a JSON body and an API key, without DRF's request and
    response machinery (about a third of a submit's CPU): the same key check, parser, service,
    representation and renderer, so the answer is byte for byte DRF's. Whatever is not the
    plain case (a key that does not authenticate, a body that does not parse) is handed to DRF's
    view before anything is done, and it answers as it always has.

    If this process holds a copy of the key (``rivya.key_cache``), the submit is first tried
    by the one statement alone, which checks the key; an accepted submit is answered at once.
    Anything else is answered only after the key is looked up in the database again.

    With an ``Idempotency-Key``, only an accepted submit is answered here: its key's record is
    stored by the statement that stores the task. Everything else (a replay, a key in use, a
    refusal, a request that is not valid) is handed to DRF's view, which claims the key and
    answers as it always has: nothing was written here."""
    raw = request.META["HTTP_AUTHORIZATION"][7:]
    try:
        data = JSONParser().parse(io.BytesIO(request.body))
    except (ParseError, RequestDataTooBig):
        return drf_view(request)
    if not isinstance(data, dict) or set(data) - TASK_FIELDS:
        return drf_view(request)
    copied = key_cache.copied_key(raw)
    if copied is not None:
        answer = _accepted_at_once(request, headers, copied, data, checked=True)
        if answer is not None:
            return answer
    api_key = services_auth.api_key_authenticate(raw=raw)
    if api_key is None:
        key_cache.forget(raw)
        return drf_view(request)
    key_cache.remember(api_key)
    if "HTTP_IDEMPOTENCY_KEY" in request.META:
        # Tried once already with the copy: whatever stopped it, DRF's view answers.
        answer = None if copied else _accepted_at_once(request, headers, api_key, data)
        return answer or drf_view(request)
    try:
        outcome = services.task_submit(user=api_key.user, **_json_task_input(data))
    except DomainError as exc:
        body, status, extra = domain_error_answer(exc)
        return _json_answer(body, status, {**headers, **extra})
    body = TaskSerializer.represent(outcome.task)
    if not outcome.accepted:
        return _json_answer(body, 402, headers)
    return _json_answer(body, 202, {**headers, "Location": body["poll_url"]})


def _accepted_at_once(
    request: HttpRequest,
    headers: dict[str, str],
    api_key: Any,
    data: dict[str, Any],
    *,
    checked: bool = False,
) -> HttpResponse | None:
    """The 202 of a submit accepted by the one statement alone (with its ``Idempotency-Key``
    record, if the request has one; checking the copied ``api_key``, if ``checked``), or None:
    nothing was written."""
    key = request.META.get("HTTP_IDEMPOTENCY_KEY")
    answer: dict[str, Any] = {}

    def record_for(task: Task) -> Any:
        answer["body"] = body = TaskSerializer.represent(task)
        return billing.idempotency_record_completed(
            user=api_key.user,
            key=key,
            fingerprint=json_fingerprint(request.method, request.path, data),
            status=202,
            body=body,
            headers=recorded_headers({"Location": body["poll_url"]}),
        )

    try:
        task = services.task_submit_in_one_statement(
            user=api_key.user,
            record_for=record_for if key is not None else None,
            credential=key_cache.credential(api_key) if checked else None,
            **_json_task_input(data),
        )
    except DomainError:
        return None  # answered the ordinary way (a replay or a 422 comes before a 400)
    if task is None:
        return None
    body = answer.get("body") or TaskSerializer.represent(task)
    return _json_answer(body, 202, {**headers, "Location": body["poll_url"]})


def _json_answer(body: Any, status: int, headers: dict[str, str]) -> HttpResponse:
    return HttpResponse(
        JSONRenderer().render(body),
        status=status,
        content_type="application/json",
        headers=headers,
    )


class TaskDetailView(APIView):
    @extend_schema(responses=TaskSerializer)
    def get(self, request: Request, pk: str) -> Response:
        task = selectors.task_get_for_user(user=request.user, task_id=pk)
        if task is None:
            raise NotFound("No such task.")
        return Response(TaskSerializer(task).data)

    @extend_schema(responses={204: None})
    def delete(self, request: Request, pk: str) -> Response:
        """Remove the task from your history (a running one is cancelled first, refunded)."""
        services.task_delete(user=request.user, task_id=pk)
        return Response(status=204)


class TaskCancelView(APIView):
    @extend_schema(request=None, responses={200: TaskSerializer})
    def post(self, request: Request, pk: str) -> Response:
        """Cancel a waiting or running task (credits released); repeating it is harmless; a
        finished task answers 409 ``task_finished`` with its status."""
        task = selectors.task_get_for_user(user=request.user, task_id=pk)
        if task is None:
            raise NotFound("No such task.")
        task = services.task_cancel(task_id=task.pk, actor=request.user)
        return Response(TaskSerializer(task).data)


class TaskResultView(APIView):
    @extend_schema(responses={(200, "application/octet-stream"): bytes})
    def get(self, request: Request, pk: str, n: int) -> Any:
        """The n-th result file of the caller's task (streamed, or a short-lived signed URL on
        object storage)."""
        task = selectors.task_get_for_user(user=request.user, task_id=pk)
        if task is None:
            raise NotFound("No such task.")
        if task.status != Task.Status.SUCCESS:
            raise NotFound("No such result.")
        if task.results_expired_at is not None:
            raise ResultsExpired()
        if not 0 <= n < len(task.results):
            raise NotFound("No such result.")
        result = task.results[n]
        name = result["name"]
        try:
            path = default_storage.path(name)
        except NotImplementedError:  # object storage: a signed, expiring URL
            return HttpResponseRedirect(default_storage.url(name))
        ext = name.rsplit(".", 1)[-1]
        try:
            handle = open(path, "rb")  # noqa: SIM115 - FileResponse closes it
        except FileNotFoundError:  # purged a moment ago, before the task was marked
            raise ResultsExpired() from None
        response = FileResponse(handle, content_type=result["mime"])
        # Served as exactly what we verified it to be, never sniffed, never run as a page.
        response["X-Content-Type-Options"] = "nosniff"
        response["Content-Security-Policy"] = "sandbox; default-src 'none'"
        response["Content-Disposition"] = f'inline; filename="{task.pk}-{n}.{ext}"'
        response["Cache-Control"] = "private, max-age=3600"
        return response


class UploadCreateView(APIView):
    parser_classes = [MultiPartParser]

    @extend_schema(
        request={
            "multipart/form-data": {
                "type": "object",
                "properties": {"file": {"type": "string", "format": "binary"}},
            }
        },
        responses={201: UploadSerializer},
    )
    def post(self, request: Request) -> Response:
        """Upload a reference file (type checked by content)."""

        def create() -> Response:
            # Parse first: the upload handler marks an oversized file while parsing.
            file = request.FILES.get("file")
            _too_large(request)
            if file is None:
                raise ValidationFailed({"file": ["Send the file as multipart field 'file'."]})
            upload = services.upload_create(user=request.user, file=file)
            return Response(UploadSerializer(upload).data, status=201)

        return run_idempotent(request, create)


REFUSED_COUNTER = "callbacks_refused:{provider}"


@csrf_exempt
def callback_view(request: HttpRequest, provider: str) -> JsonResponse:
    """Provider callbacks: verify the raw body's signature before anything else, store the
    delivery once, answer fast; processing happens in Celery."""
    if request.method != "POST":  # require_POST would answer an empty 405, not the envelope
        return json_method_not_allowed(request, ["POST"])
    if not known_provider(provider):
        return JsonResponse(error_body("not_found", "No such provider."), status=404)
    try:
        body = request.body
    except RequestDataTooBig:
        return JsonResponse(error_body("request_too_large", "Callback body too large."), status=413)
    headers = {k.lower(): v for k, v in request.headers.items()}
    try:
        event = get_provider(provider).verify_callback(headers, body)
    except InvalidSignature as exc:
        key = REFUSED_COUNTER.format(provider=provider)
        cache.add(key, 0, timeout=None)
        try:
            cache.incr(key)
        except ValueError:
            cache.set(key, 1, timeout=None)
        logger.warning(
            "refused %s callback from %s: %s", provider, request.META.get("REMOTE_ADDR"), exc
        )
        return JsonResponse(
            error_body(
                "invalid_signature",
                "The callback signature or timestamp did not verify.",
                "provider",
            ),
            status=401,
        )
    except ProviderError as exc:  # signed, but not an event we understand
        logger.warning("unreadable %s callback: %s", provider, exc)
        return JsonResponse(error_body(exc.code, exc.message, "provider"), status=400)
    if json_depth(event.payload) > MAX_JSON_DEPTH:
        return JsonResponse(
            error_body("invalid_callback", "Callback body nested too deeply.", "provider"),
            status=400,
        )
    if (
        not event.event_id
        or len(event.event_id) > 200
        or contains_nul(event.event_id)
        or contains_nul(event.upstream_id)
    ):
        # Truncating would merge distinct deliveries under one id: refuse instead.
        return JsonResponse(
            error_body("invalid_callback", "Unusable webhook id.", "provider"), status=400
        )
    delivery, created = services.callback_receive(provider=provider, event=event)
    return JsonResponse({"received": True, "duplicate": not created, "id": delivery.pk})
