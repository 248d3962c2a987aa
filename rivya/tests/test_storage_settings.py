"""Storage by configuration (issue 17): STORAGE_BACKEND picks the filesystem or a django-storages
cloud backend, STORAGE_OPTIONS its options; anything else refuses to start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def storages_with(**env: str) -> subprocess.CompletedProcess[str]:
    code = (
        "import django, json; django.setup(); from django.conf import settings; "
        "print(json.dumps(settings.STORAGES['default']))"
    )
    return subprocess.run(  # noqa: S603 - our own interpreter and settings
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "rivya.settings", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("backend", "cls"),
    [
        ("filesystem", "django.core.files.storage.FileSystemStorage"),
        ("s3", "storages.backends.s3.S3Storage"),
        ("gcs", "storages.backends.gcloud.GoogleCloudStorage"),
        ("azure", "storages.backends.azure_storage.AzureStorage"),
    ],
)
def test_the_backend_and_its_options_come_from_the_environment(backend: str, cls: str) -> None:
    options = {"bucket_name": "rivya-media"} if backend != "filesystem" else {}
    done = storages_with(STORAGE_BACKEND=backend, STORAGE_OPTIONS=json.dumps(options))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"BACKEND": cls, "OPTIONS": options}


def test_an_unknown_backend_refuses_to_start() -> None:
    done = storages_with(STORAGE_BACKEND="floppy")
    assert done.returncode != 0
    assert "STORAGE_BACKEND must be one of" in done.stderr
