"""Request middleware: refuse oversized bodies from ``Content-Length`` before anything reads
them; answer a request whose database connection was lost with a 503 that says so."""

from __future__ import annotations

import logging
from collections.abc import Callable

from django.conf import settings
from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.template.loader import render_to_string

from rivya.exceptions import error_body

logger = logging.getLogger(__name__)

DATABASE_RETRY_AFTER_S = 2


class RequestSizeLimitMiddleware:
    """413 for a body over MAX_REQUEST_BYTES, decided from the header alone (Django's own
    limits do not bound file parts); streamed uploads are bounded again per file by
    ``tasks.uploads.LimitedUploadHandler``."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        raw = request.META.get("CONTENT_LENGTH") or "0"
        try:
            length = int(raw)
        except ValueError:
            return JsonResponse(
                error_body("bad_content_length", "Content-Length is not a number."), status=400
            )
        if length > settings.MAX_REQUEST_BYTES:
            return JsonResponse(
                error_body(
                    "request_too_large",
                    f"The request body is {length} bytes; the limit is "
                    f"{settings.MAX_REQUEST_BYTES}. Send smaller files.",
                ),
                status=413,
            )
        return self.get_response(request)


class DatabaseUnavailableMiddleware:
    """A request whose database connection failed under it (PostgreSQL restarted, failed over,
    or terminated the backend) is answered 503 ``database_unavailable`` with ``Retry-After``,
    not a bare 500: the client learns that trying again is right. Its transaction rolled back,
    unless the connection was lost in the very commit; a retry with the same
    ``Idempotency-Key`` is safe either way. The connection is replaced before the next request
    (Django closes an unusable one when a request ends). ``docs/reliability.md``, pg-terminate.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if not isinstance(exception, OperationalError | InterfaceError):
            return None
        logger.error(
            "database unavailable answering %s %s: %s",
            request.method,
            request.path,
            exception,
            exc_info=exception,
        )
        response: HttpResponse
        if request.path.startswith("/api/"):
            response = JsonResponse(
                error_body(
                    "database_unavailable",
                    "The request could not be completed: the service lost its database "
                    "connection. Send it again in a moment; with the same Idempotency-Key it "
                    "runs at most once.",
                    "infra",
                ),
                status=503,
            )
        else:
            response = HttpResponse(render_to_string("503.html", request=None), status=503)
        response["Retry-After"] = str(DATABASE_RETRY_AFTER_S)
        return response
