"""Request middleware: refuse oversized bodies from ``Content-Length`` before anything reads
them; answer a request whose database connection was lost with a 503 that says so."""

from __future__ import annotations

import logging
from collections.abc import Callable

from django.conf import settings
from django.db import InterfaceError, OperationalError, connection
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


# PostgreSQL's codes for "try the same transaction again": a deadlock, a serialization failure.
RETRYABLE_SQLSTATES = frozenset({"40P01", "40001"})


def database_trouble(exception: Exception) -> str | None:
    """What a database error in a request says to its client: ``database_unavailable`` when the
    connection was lost under it (a restart, a failover, a terminated backend, the network),
    ``database_conflict`` for a deadlock or a serialization failure (retrying the request is
    the remedy), None for anything else, such as a query cancelled by its timeout or an
    integrity error: those are ours to fix, and stay 500s with their traceback."""
    if isinstance(exception, InterfaceError):
        return "database_unavailable"
    if not isinstance(exception, OperationalError):
        return None
    if getattr(exception.__cause__, "pgcode", None) in RETRYABLE_SQLSTATES:
        return "database_conflict"
    if connection.connection is None or not connection.is_usable():
        return "database_unavailable"
    return None


MESSAGES = {
    "database_unavailable": "The request could not be completed: the service lost its "
    "database connection. Send it again in a moment; with the same Idempotency-Key it runs at "
    "most once.",
    "database_conflict": "The request collided with another change to the same data and was "
    "rolled back. Send it again; with the same Idempotency-Key it runs at most once.",
}


class DatabaseUnavailableMiddleware:
    """A request whose database connection failed under it (PostgreSQL restarted, failed over,
    or terminated the backend) is answered 503 ``database_unavailable`` with ``Retry-After``,
    not a bare 500: the client learns that trying again is right; a deadlock or serialization
    failure likewise, as ``database_conflict``. Its transaction rolled back, unless the
    connection was lost in the very commit; a retry with the same ``Idempotency-Key`` is safe
    either way. The connection is replaced before the next request (Django closes an unusable
    one when a request ends). ``docs/reliability.md``, pg-terminate.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        code = database_trouble(exception)
        if code is None:
            return None
        logger.error(
            "%s answering %s %s: %s",
            code,
            request.method,
            request.path,
            exception,
            exc_info=exception,
        )
        response: HttpResponse
        if request.path.startswith("/api/"):
            response = JsonResponse(error_body(code, MESSAGES[code], "infra"), status=503)
        else:
            response = HttpResponse(render_to_string("503.html", request=None), status=503)
        response["Retry-After"] = str(DATABASE_RETRY_AFTER_S)
        return response
