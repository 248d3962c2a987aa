"""Validation errors name the field the client sent (issue 13): ``file`` on POST /api/v1/uploads/,
``files`` on a multipart task submit."""

from __future__ import annotations

import io
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from PIL import Image

from rivya.errors import ValidationFailed
from tasks.media import MediaInfo
from tasks.models import Task, Upload
from tasks.validation import FileCheck, check_files

pytestmark = pytest.mark.django_db

UPLOADS = "/api/v1/uploads/"
TASKS = "/api/v1/tasks/"

BAD_FILES = {
    "unsupported_file_type": b"<html><body>hi</body></html>",
    "empty_file": b"",
}


@pytest.fixture(autouse=True)
def media_root(settings: Any, tmp_path: Any) -> None:
    settings.MEDIA_ROOT = str(tmp_path / "media")


def png_header_claiming(width: int, height: int) -> bytes:
    image = io.BytesIO()
    Image.new("RGB", (width, height)).save(image, "PNG")
    return image.getvalue()


@pytest.mark.parametrize(("code", "data"), BAD_FILES.items(), ids=list(BAD_FILES))
def test_upload_errors_name_the_file_field(api: Any, code: str, data: bytes) -> None:
    # Given a file the content check refuses, sent as the upload's multipart field ``file``
    response = api.post(
        UPLOADS, {"file": SimpleUploadedFile("x.png", data, "image/png")}, format="multipart"
    )

    # Then the error is about ``file``, the field the client sent
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == code
    assert set(error["fields"]) == {"file"}
    assert error["fields"]["file"][0].startswith("x.png: ")
    assert Upload.objects.count() == 0


def test_upload_over_the_pixel_limit_names_the_file_field(api: Any, settings: Any) -> None:
    settings.MAX_IMAGE_PIXELS = 100

    response = api.post(
        UPLOADS,
        {"file": SimpleUploadedFile("big.png", png_header_claiming(20, 20), "image/png")},
        format="multipart",
    )

    assert response.status_code == 400, response.content
    assert set(response.json()["error"]["fields"]) == {"file"}
    assert Upload.objects.count() == 0


@pytest.mark.parametrize(("code", "data"), BAD_FILES.items(), ids=list(BAD_FILES))
def test_task_submit_errors_still_name_the_files_field(
    catalog: None, funded: Any, api_for: Any, queued: Any, code: str, data: bytes
) -> None:
    # Given the same file sent with a generation, as the submit's multipart field ``files``
    response = api_for(funded(10)).post(
        TASKS,
        {
            "model": "sandbox-image",
            "prompt": "a fox",
            "files": [SimpleUploadedFile("x.png", data, "image/png")],
        },
        format="multipart",
    )

    # Then the error is about ``files``
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == code
    assert set(error["fields"]) == {"files"}
    assert Task.objects.count() == 0


# --- the model's file rules -----------------------------------------------------------------


def _check(rules: dict[str, Any], files: list[FileCheck], **field: str) -> dict[str, list[str]]:
    with pytest.raises(ValidationFailed) as refused:
        check_files(rules, files, **field)
    return refused.value.fields


def test_file_rules_name_the_field_they_are_given() -> None:
    html = FileCheck(
        "x.txt",
        MediaInfo(mime="text/html", kind="text", width=None, height=None, duration_ms=None),
        10,
    )

    missing = _check({"min": 1, "max": 1}, [], field="file")
    refused_type = _check({"max": 1, "accept": ["image/png"]}, [html], field="file")

    assert set(missing) == {"file"}
    assert set(refused_type) == {"file.0"}


def test_file_rules_name_files_by_default() -> None:
    fields = _check({"min": 1, "max": 1}, [])

    assert set(fields) == {"files"}
