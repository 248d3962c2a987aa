"""The file upload pipeline of single tasks: validated files → a COMPLETED dataset.

A ``Dataset`` row is written PENDING first, then each file is stored (Django's default storage:
the filesystem, or S3 / GCS / Azure Blob through django-storages), then, once all are stored,
the ``DatasetFile`` rows are written and the dataset becomes COMPLETED, in one transaction. If a
file cannot be stored, the files already stored are deleted and the dataset becomes FAILED: the
request fails with ``upload_failed`` before any task or hold exists, so nothing is charged and
nothing is left in storage.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from django.core.files.storage import default_storage
from django.db import transaction
from django.utils import timezone

from rivya.errors import DomainError
from tasks.media import MediaInfo
from tasks.models import Dataset, DatasetFile

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckedFile:
    """An uploaded file whose type, size and duration were verified by content."""

    file: Any  # Django's UploadedFile
    name: str
    info: MediaInfo
    size: int


class UploadFailed(DomainError):
    code = "upload_failed"
    message = (
        "Your file could not be stored, so nothing was run and nothing was charged. Try again."
    )
    status = 503
    kind = "infra"


def dataset_path(*, user_id: Any, dataset_id: Any, position: int) -> str:
    # Never the user's file name: the dataset's directory and the file's position in it.
    return f"datasets/{user_id}/{dataset_id}/{position}"


def dataset_store(*, user: Any, purpose: str, files: Sequence[CheckedFile]) -> Dataset:
    """Store ``files`` as a dataset of ``user``.

    Before: the files passed validation. After: a COMPLETED dataset with one ``DatasetFile`` per
    file, in order. Raises UploadFailed (503, kind ``infra``) when storage refuses a file; the
    dataset is then FAILED with the reason and none of its files remain in storage.
    """
    dataset = Dataset.objects.create(
        user=user,
        purpose=purpose,
        file_count=len(files),
        total_bytes=sum(f.size for f in files),
    )
    stored: list[str] = []
    rows: list[DatasetFile] = []
    try:
        for position, checked in enumerate(files):
            digest = hashlib.sha256()
            checked.file.seek(0)
            for chunk in checked.file.chunks():
                digest.update(chunk)
            checked.file.seek(0)
            name = default_storage.save(
                dataset_path(user_id=user.pk, dataset_id=dataset.pk, position=position),
                checked.file,
            )
            stored.append(name)
            row = DatasetFile(
                dataset=dataset,
                position=position,
                original_name=(checked.name or "").replace("\x00", "")[:255],
                mime=checked.info.mime,
                bytes=checked.size,
                sha256=digest.hexdigest(),
                width=checked.info.width,
                height=checked.info.height,
                duration_ms=checked.info.duration_ms,
            )
            row.file.name = name
            rows.append(row)
    except Exception as exc:
        logger.warning("dataset %s: storing file %d failed: %s", dataset.pk, len(stored), exc)
        for name in stored:
            with contextlib.suppress(Exception):
                default_storage.delete(name)
        Dataset.objects.filter(pk=dataset.pk).update(
            status=Dataset.Status.FAILED,
            error_message=f"Storing file {len(stored) + 1} of {len(files)} failed: "
            f"{type(exc).__name__}: {exc}"[:2000],
            finished_at=timezone.now(),
        )
        raise UploadFailed() from exc
    try:
        with transaction.atomic():
            DatasetFile.objects.bulk_create(rows)
            Dataset.objects.filter(pk=dataset.pk).update(
                status=Dataset.Status.COMPLETED, finished_at=timezone.now()
            )
    except BaseException:
        for name in stored:
            with contextlib.suppress(Exception):
                default_storage.delete(name)
        raise
    dataset.refresh_from_db()
    return dataset
