"""An Idempotency-Key claim whose conflicting record vanishes before it is read (issue 13).

The claim INSERTs, and on a conflict reads the record that holds the key. Between the two, the
first request may abandon its claim (its work was refused or failed) or the hourly purge may
delete an expired record; the read then finds nothing. The claim must try again, not crash.
The competing call is injected exactly there: on the claim's read of the record by key.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import IntegrityError
from django.utils import timezone
from PIL import Image
from rest_framework.test import APIClient

from billing import services as billing
from billing.models import IdempotencyRecord
from rivya.errors import IdempotencyInProgress
from tasks.models import Upload

pytestmark = pytest.mark.django_db

FINGERPRINT = "f" * 64


@pytest.fixture
def before_read_by_key(monkeypatch: pytest.MonkeyPatch) -> Callable[[Callable[[], Any]], list]:
    """Run ``competitor`` once, just before the claim reads the record holding the key."""

    def install(competitor: Callable[[], Any]) -> list:
        real_get = IdempotencyRecord.objects.get
        hits: list = []

        def get(*args: Any, **kwargs: Any) -> Any:
            if not hits and "key" in kwargs:
                hits.append(kwargs["key"])
                competitor()
            return real_get(*args, **kwargs)

        monkeypatch.setattr(IdempotencyRecord.objects, "get", get)
        return hits

    return install


def test_claim_taken_again_when_the_first_request_abandons_it_meanwhile(
    user: Any, before_read_by_key: Any
) -> None:
    # Given a first request holding the key, which gives it up while our claim is mid-way
    first = billing.idempotency_claim(user=user, key="k", fingerprint=FINGERPRINT).record
    assert first is not None
    hits = before_read_by_key(lambda: billing.idempotency_abandon(record=first))

    # When a second request claims the same key
    claim = billing.idempotency_claim(user=user, key="k", fingerprint=FINGERPRINT)

    # Then it holds a fresh claim of its own, the only record of the key
    assert hits == ["k"]
    assert claim.replay is None
    assert claim.record is not None
    assert claim.record.pk != first.pk
    stored = IdempotencyRecord.objects.get(user=user, key="k")
    assert (stored.pk, stored.status) == (claim.record.pk, IdempotencyRecord.Status.IN_PROGRESS)


def test_claim_taken_again_when_the_purge_deletes_the_expired_record_meanwhile(
    user: Any, before_read_by_key: Any
) -> None:
    # Given a completed record past its 24 h, purged while our claim is mid-way
    old = billing.idempotency_claim(user=user, key="k", fingerprint=FINGERPRINT).record
    assert old is not None
    billing.idempotency_complete(record=old, status=201, body={"id": 1}, headers={})
    IdempotencyRecord.objects.filter(pk=old.pk).update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    before_read_by_key(lambda: billing.idempotency_purge_expired())

    # When a new request claims the key
    claim = billing.idempotency_claim(user=user, key="k", fingerprint=FINGERPRINT)

    # Then it runs anew: no replay of the purged response
    assert claim.replay is None
    assert claim.record is not None
    assert IdempotencyRecord.objects.get(user=user, key="k").pk == claim.record.pk


def test_claim_gives_up_with_in_progress_when_the_key_never_settles(
    user: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a key that is held at every insert and gone at every read
    def conflict(**kwargs: Any) -> Any:
        raise IntegrityError("duplicate key value violates unique constraint")

    def gone(*args: Any, **kwargs: Any) -> Any:
        raise IdempotencyRecord.DoesNotExist

    monkeypatch.setattr(IdempotencyRecord.objects, "create", conflict)
    monkeypatch.setattr(IdempotencyRecord.objects, "get", gone)

    # When a request claims it, then it is told to retry (409), after a bounded number of tries
    with pytest.raises(IdempotencyInProgress):
        billing.idempotency_claim(user=user, key="k", fingerprint=FINGERPRINT)


def test_upload_with_a_key_abandoned_mid_claim_is_created_not_500(
    user: Any, api: APIClient, before_read_by_key: Any, settings: Any, tmp_path: Any
) -> None:
    # Given an earlier upload request with the same key that gives up while ours claims it
    settings.MEDIA_ROOT = str(tmp_path / "media")
    first = billing.idempotency_claim(user=user, key="up", fingerprint=FINGERPRINT).record
    assert first is not None
    before_read_by_key(lambda: billing.idempotency_abandon(record=first))
    image = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(image, "PNG")
    file = SimpleUploadedFile("ref.png", image.getvalue(), content_type="image/png")

    # When our upload arrives with that key
    response = api.post(
        "/api/v1/uploads/", {"file": file}, format="multipart", headers={"Idempotency-Key": "up"}
    )

    # Then it is created once and its response kept for a replay
    assert response.status_code == 201, response.content
    assert not response.has_header("Idempotent-Replayed")
    assert Upload.objects.filter(user=user).count() == 1
    record = IdempotencyRecord.objects.get(user=user, key="up")
    assert record.status == IdempotencyRecord.Status.COMPLETED
    assert record.response_body["id"] == response.json()["id"]
