"""Refuse oversized request bodies from ``Content-Length`` before anything reads them."""

from __future__ import annotations

from collections.abc import Callable

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse

from rivya.exceptions import error_body


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
