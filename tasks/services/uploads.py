"""Uploaded reference files, checked by content."""

from __future__ import annotations

from typing import Any

from django.conf import settings

from rivya.errors import (
    ValidationFailed,
)
from tasks.media import MediaError, MediaInfo, inspect_media
from tasks.models import Upload


def inspect_upload(file: Any, *, field: str = "files") -> MediaInfo:
    """The file's type, dimensions and duration, read from its content.

    Raises ValidationFailed under ``field``, the multipart field the client sent the file in
    (``files`` on a task submit, ``file`` on an upload).
    """
    try:
        return inspect_media(file, max_pixels=settings.MAX_IMAGE_PIXELS)
    except MediaError as exc:
        raise ValidationFailed(
            {field: [f"{getattr(file, 'name', 'file')}: {exc.message}"]}, code=exc.code
        ) from None


def upload_create(*, user: Any, file: Any) -> Upload:
    """Store an uploaded reference file after checking its type by content.

    Raises ValidationFailed (unsupported, unreadable, too large).
    """
    size = file.size
    if size > settings.MAX_UPLOAD_BYTES:
        raise ValidationFailed(
            {"file": [f"Files are limited to {settings.MAX_UPLOAD_BYTES} bytes."]},
            code="file_too_large",
        )
    info = inspect_upload(file, field="file")
    import hashlib

    digest = hashlib.sha256()
    file.seek(0)
    for chunk in file.chunks():
        digest.update(chunk)
    file.seek(0)
    upload = Upload(
        user=user,
        original_name=(getattr(file, "name", "") or "").replace("\x00", "")[:255],
        mime=info.mime,
        bytes=size,
        sha256=digest.hexdigest(),
        width=info.width,
        height=info.height,
        duration_ms=info.duration_ms,
    )
    upload.file.save("file", file, save=False)
    upload.save()
    return upload
