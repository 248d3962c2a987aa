"""One DRF exception handler: every error becomes ``{"error": {"code", "message", "kind"}}``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from django.conf import settings
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import RequestDataTooBig
from django.http import Http404, HttpRequest, JsonResponse
from django.urls import Resolver404, resolve
from django.views.decorators.csrf import csrf_exempt
from rest_framework import exceptions as drf
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from rivya.errors import DomainError

logger = logging.getLogger(__name__)

_DRF_CODES: dict[type[Exception], str] = {
    drf.ParseError: "malformed_request",
    drf.AuthenticationFailed: "authentication_failed",
    drf.NotAuthenticated: "not_authenticated",
    drf.PermissionDenied: "permission_denied",
    drf.NotFound: "not_found",
    drf.MethodNotAllowed: "method_not_allowed",
    drf.NotAcceptable: "not_acceptable",
    drf.UnsupportedMediaType: "unsupported_media_type",
    drf.Throttled: "throttled",
}


def error_body(
    code: str, message: str, kind: str = "user", fields: dict[str, Any] | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "message": message, "kind": kind}
    if fields is not None:
        body["fields"] = fields
    return {"error": body}


def _flatten(detail: Any) -> Any:
    if isinstance(detail, dict):
        return {k: _flatten(v) for k, v in detail.items()}
    if isinstance(detail, list):
        out: list[Any] = []
        for item in detail:
            flat = _flatten(item)
            out.append(flat)
        return out
    return str(detail)


def domain_error_answer(exc: DomainError) -> tuple[dict[str, Any], int, dict[str, str]]:
    """The body, status and headers of the answer to a domain error."""
    headers = {}
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:  # capacity refusals: 429 with Retry-After
        headers["Retry-After"] = str(retry_after)
    return {"error": exc.as_dict()}, exc.status, headers


def api_exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, DomainError):
        body, status, headers = domain_error_answer(exc)
        return Response(body, status=status, headers=headers)
    if isinstance(exc, RequestDataTooBig):
        # DRF reads a JSON or form body whole (and Django's multipart parser counts the non-file
        # fields) before any parser of ours sees it; left alone, Django answers an HTML 400 and
        # logs a traceback. Raised from Content-Length before reading, or while reading a body
        # that turns out longer than announced.
        return Response(request_too_large_body(), status=413)
    if isinstance(exc, Http404):
        exc = drf.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = drf.PermissionDenied()
    response = drf_exception_handler(exc, context)
    if response is None:
        return None  # a real bug: let Django log it and answer 500
    if isinstance(exc, drf.ValidationError):
        detail = _flatten(exc.detail)
        if not isinstance(detail, dict):
            detail = {"non_field_errors": detail if isinstance(detail, list) else [detail]}
        response.data = error_body(
            "validation_error", "The request is not valid.", "user", fields=detail
        )
        return response
    if not isinstance(exc, drf.APIException):
        return response
    code = next((c for klass, c in _DRF_CODES.items() if isinstance(exc, klass)), None)
    if code is None:
        code = exc.get_codes() if isinstance(exc.get_codes(), str) else "error"
    detail = exc.detail
    message = str(exc.default_detail) if isinstance(detail, dict | list) else str(detail)
    kind = "infra" if response.status_code >= 500 else "user"
    response.data = error_body(str(code), message, kind)
    return response


def request_too_large_body() -> dict[str, Any]:
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    return error_body(
        "request_too_large",
        f"The request data is over the {limit}-byte limit for JSON and form fields "
        "(MAX_JSON_BYTES). Send files as multipart file parts.",
    )


NOT_FOUND_URL_NAME = "api-not-found"


# Exempt from CSRF: it changes nothing, and a write to a mistyped URL must learn that the URL is
# wrong, in JSON, rather than get Django's HTML "CSRF verification failed" page (issue 13).
@csrf_exempt
def json_not_found(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    """404 for unknown URLs under /api/: JSON, like every other API answer, for every method."""
    message = "No such API endpoint."
    if not request.path_info.endswith("/"):
        # CommonMiddleware's APPEND_SLASH redirect never applies here (the catch-all matches the
        # slashless path), and would lose a POST's body anyway: say which URL was meant instead.
        try:
            meant = resolve(request.path_info + "/")
        except Resolver404:
            meant = None
        if meant is not None and meant.url_name != NOT_FOUND_URL_NAME:
            message = f"No such API endpoint: did you mean {request.path}/ ?"
    return JsonResponse(error_body("not_found", message), status=404)


def json_method_not_allowed(request: HttpRequest, allowed: Sequence[str]) -> JsonResponse:
    """405 for plain Django views under /api/, in the shape DRF views answer it."""
    response = JsonResponse(
        error_body("method_not_allowed", f'Method "{request.method}" not allowed.'), status=405
    )
    response["Allow"] = ", ".join(allowed)
    return response
