"""Bounding file uploads while they stream (Django's memory limit does not bound file parts).

``DATA_UPLOAD_MAX_MEMORY_SIZE`` does not apply to file parts, and Django's default handlers will
write a file of any size to disk. ``LimitedUploadHandler`` (installed by ``FILE_UPLOAD_HANDLERS``)
stops the upload as soon as one file passes ``settings.MAX_UPLOAD_BYTES`` and marks the request,
so the view answers 413 with a clear error instead of seeing a missing file or failing:

    if upload_too_large(request):
        return 413 {"error": {"code": "file_too_large", ...}}

Check the mark before anything else in the view: parsing stops at the oversized file, so fields
after it are missing from ``request.POST``/``request.data`` too. The whole body is still read
(and discarded) so the client receives the 413 instead of a connection reset; what bounds that
read is the ``Content-Length`` check against ``MAX_REQUEST_BYTES`` made before the body is read.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.files.uploadhandler import StopUpload, TemporaryFileUploadHandler
from django.http import HttpRequest

DEFAULT_MAX_UPLOAD_BYTES = 50 * 1024 * 1024
FLAG = "upload_too_large"


def max_upload_bytes() -> int:
    return int(getattr(settings, "MAX_UPLOAD_BYTES", DEFAULT_MAX_UPLOAD_BYTES))


def upload_too_large(request: Any) -> bool:
    """True when ``LimitedUploadHandler`` stopped this request's upload (Django or DRF request;
    DRF's ``Request`` forwards unknown attributes to the Django request). Only meaningful once
    ``request.FILES``/``request.data`` has been accessed, which is what runs the parser."""
    return bool(getattr(request, FLAG, False))


class LimitedUploadHandler(TemporaryFileUploadHandler):
    """Streams each file to a temporary file, as Django's default does, up to
    ``MAX_UPLOAD_BYTES`` per file; past that, deletes the partial file, sets
    ``request.upload_too_large = True`` and stops parsing the upload."""

    def __init__(self, request: HttpRequest | None = None) -> None:
        super().__init__(request)
        self.max_bytes = max_upload_bytes()

    def receive_data_chunk(self, raw_data: bytes, start: int) -> bytes | None:
        # ``start`` is the offset of this chunk within the current file, not the request.
        if start + len(raw_data) > self.max_bytes:
            if self.request is not None:
                setattr(self.request, FLAG, True)
            # The parser closes (and so deletes) the temporary file on StopUpload; with
            # connection_reset=False it drains the rest of the body so a response can be sent.
            raise StopUpload(connection_reset=False)
        return super().receive_data_chunk(raw_data, start)
