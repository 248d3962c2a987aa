"""The generation API through real HTTP requests: the catalog, submitting
(JSON and multipart), validation that records nothing, refusals for credits, Idempotency-Key,
uploads, size limits, history, results and the callbacks inbox.

Everything runs on real PostgreSQL with real files (Pillow PNG/JPEG, stdlib WAV); what would be
sent to Celery after commit is recorded by the ``queued`` fixture.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import uuid
import wave
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.core.cache import cache
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from PIL import Image
from rest_framework.parsers import JSONParser
from rest_framework.request import Request
from rest_framework.test import APIClient, APIRequestFactory
from standardwebhooks import Webhook

from billing import selectors as billing_selectors
from billing import services as billing
from billing.models import Hold
from notifications.models import Notification
from rivya.idempotency import request_fingerprint
from tasks import services
from tasks.api.views import REFUSED_COUNTER
from tasks.models import AIModel, CallbackDelivery, SubmitOutbox, Task, Upload
from tasks.services.dispatch import dispatch_all
from tasks.tests.lifecycle import deliver, job_event, signed_headers

pytestmark = pytest.mark.usefixtures("catalog", "media_root", "submit_path")

C = 1_000_000
S = Task.Status
MODELS = "/api/v1/models/"
TASKS = "/api/v1/tasks/"
UPLOADS = "/api/v1/uploads/"
CALLBACK = "/api/v1/callbacks/sandbox/"
SEED_SLUGS = {
    "sandbox-image",
    "sandbox-video",
    "sandbox-speech",
    "sandbox-audio-isolation",
    "sandbox-chat",
    "sandbox-chat-mini",
    "sandbox-translate",
    "sandbox-complete",
    "sandbox-tts",
    "sandbox-transcribe",
}
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@pytest.fixture
def media_root(settings: Any, tmp_path: Any) -> None:
    settings.MEDIA_ROOT = str(tmp_path / "media")


# --- helpers --------------------------------------------------------------------------------


def task_url(task_id: Any) -> str:
    return f"/api/v1/tasks/{task_id}/"


def result_url(task_id: Any, n: int) -> str:
    return f"/api/v1/tasks/{task_id}/results/{n}/"


def png(width: int = 32, height: int = 24, *, noise: bool = False) -> bytes:
    if noise:  # incompressible: the file is about 3 bytes per pixel
        image = Image.frombytes("RGB", (width, height), os.urandom(width * height * 3))
    else:
        image = Image.new("RGB", (width, height), (200, 40, 40))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def jpeg(width: int = 40, height: int = 30) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (10, 120, 200)).save(out, "JPEG")
    return out.getvalue()


def wav(seconds: float, rate: int = 8000) -> bytes:
    """A mono 16-bit PCM WAV holding a 440 Hz tone of exactly ``seconds``."""
    frames = int(rate * seconds)
    samples = (int(8000 * math.sin(2 * math.pi * 440 * i / rate)) for i in range(frames))
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"".join(struct.pack("<h", s) for s in samples))
    return out.getvalue()


def upload(name: str, data: bytes, content_type: str = "application/octet-stream") -> Any:
    return SimpleUploadedFile(name, data, content_type=content_type)


def assert_error(response: Any, status: int, code: str, kind: str = "user") -> dict[str, Any]:
    assert response.status_code == status, response.content[:500]
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert error["code"] == code
    assert error["kind"] == kind
    assert isinstance(error["message"], str)
    assert error["message"]
    return error


def assert_nothing_recorded() -> None:
    assert Task.objects.count() == 0
    assert Hold.objects.count() == 0


def held(user: Any) -> int:
    return billing_selectors.balance_for_user(user=user).held


def create(client: APIClient, **body: Any) -> Any:
    body.setdefault("model", "sandbox-image")
    body.setdefault("prompt", "a lighthouse at dusk")
    return client.post(TASKS, body, format="json")


# --- GET /api/v1/models/ --------------------------------------------------------------------


def test_models_are_public_with_schema_and_price() -> None:
    response = APIClient().get(MODELS)

    assert response.status_code == 200
    models = {m["slug"]: m for m in response.json()}
    assert set(models) == SEED_SLUGS
    image = models["sandbox-image"]
    assert (image["price"], image["price_micro"]) == ("1", C)
    assert image["billing_type"] == "per_output"
    assert (image["category"], image["runtime"]) == ("image", "async")
    width = image["params_schema"]["properties"]["width"]
    assert (width["minimum"], width["maximum"], width["default"]) == (64, 2048, 512)
    isolation = models["sandbox-audio-isolation"]
    assert (isolation["price"], isolation["price_micro"]) == ("0.05", 50_000)
    assert isolation["billing_type"] == "per_output_second"
    assert isolation["file_rules"]["min_duration_ms"] == 1000


def test_disabled_model_is_neither_listed_nor_usable(
    funded: Any, api_for: Any, queued: dict[str, list[Any]]
) -> None:
    AIModel.objects.filter(slug="sandbox-video").update(enabled=False)

    listed = {m["slug"] for m in APIClient().get(MODELS).json()}
    response = create(api_for(funded(10)), model="sandbox-video")

    assert listed == SEED_SLUGS - {"sandbox-video"}
    assert_error(response, 400, "unknown_model")
    assert_nothing_recorded()
    assert (dispatch_all(), queued["submit"]) == (0, [])


# --- POST /api/v1/tasks/ (JSON) -------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_create_answers_202_with_the_waiting_task(
    funded: Any, api_for: Any, queued: dict[str, list[Any]], ledger_ok: None
) -> None:
    user = funded(10)
    client = api_for(user)

    response = create(client, prompt="  a red fox  ", params={"num_outputs": 2, "width": 256})

    assert response.status_code == 202
    body = response.json()
    task_id = body["id"]
    assert body["status"] == "WAITING"
    assert (body["model"], body["category"]) == ("sandbox-image", "image")
    assert body["prompt"] == "a red fox"
    schema = AIModel.objects.get(slug="sandbox-image").params_schema
    assert set(body["params"]) == set(schema["properties"])  # every default filled in
    assert (body["params"]["num_outputs"], body["params"]["width"]) == (2, 256)
    assert body["params"]["height"] == 512
    assert body["params"]["sandbox_outcome"] == "success"
    assert body["credits"] == {
        "reserved": "2",
        "reserved_micro": 2 * C,
        "charged": "0",
        "charged_micro": 0,
        "refunded": "0",
        "refunded_micro": 0,
    }
    assert body["error"] is None
    assert (body["results"], body["expired"], body["upload_ids"]) == ([], False, [])
    assert body["poll_url"] == f"/api/v1/tasks/{task_id}/"
    assert response["Location"] == body["poll_url"]
    assert held(user) == 2 * C
    # In the outbox, then handed to the worker once by the dispatcher.
    assert SubmitOutbox.objects.filter(task_id=task_id).exists()
    assert (dispatch_all(), dispatch_all(), queued["submit"]) == (1, 0, [task_id])
    assert not SubmitOutbox.objects.filter(task_id=task_id).exists()

    polled = client.get(body["poll_url"])

    assert polled.status_code == 200
    assert polled.json() == body


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        pytest.param(
            {"model": "no-such-model", "prompt": "x"}, "unknown_model", "model", id="unknown-model"
        ),
        pytest.param({"prompt": "x"}, "validation_error", "model", id="missing-model"),
        pytest.param(
            {"model": 7, "prompt": "x"}, "validation_error", "model", id="model-not-a-string"
        ),
        pytest.param(
            {"model": "sandbox-chat", "prompt": "x"},
            "model_not_available",
            "model",
            id="chat-model",
        ),
        pytest.param(
            {"model": "sandbox-image", "prompt": "x", "params": {"steps": 4}},
            "validation_error",
            "params.steps",
            id="unknown-param",
        ),
        pytest.param(
            {"model": "sandbox-image", "prompt": "x", "params": {"width": 5000}},
            "validation_error",
            "params.width",
            id="width-out-of-range",
        ),
        pytest.param(
            {"model": "sandbox-image", "prompt": "x", "params": {"num_outputs": 0}},
            "validation_error",
            "params.num_outputs",
            id="num-outputs-zero",
        ),
        pytest.param(
            {"model": "sandbox-image", "prompt": "x", "params": {"width": "big"}},
            "validation_error",
            "params.width",
            id="width-wrong-type",
        ),
        pytest.param(
            {"model": "sandbox-image", "prompt": "x", "params": {"sandbox_outcome": "maybe"}},
            "validation_error",
            "params.sandbox_outcome",
            id="enum-value",
        ),
        pytest.param(
            {"model": "sandbox-image", "prompt": "x" * 2001},
            "prompt_too_long",
            "prompt",
            id="prompt-too-long",
        ),
        pytest.param({"model": "sandbox-image"}, "validation_error", "prompt", id="missing-prompt"),
        pytest.param(
            {"model": "sandbox-image", "prompt": "   "},
            "validation_error",
            "prompt",
            id="blank-prompt",
        ),
        pytest.param(
            {"model": "sandbox-image", "prompt": 42},
            "validation_error",
            "prompt",
            id="prompt-number",
        ),
        pytest.param(
            {"model": "sandbox-image", "prompt": "x", "seed": 1},
            "validation_error",
            "seed",
            id="unknown-top-level-field",
        ),
        pytest.param(
            {"model": "sandbox-image", "prompt": "x", "params": [1, 2]},
            "validation_error",
            "params",
            id="params-a-list",
        ),
        pytest.param(
            {"model": "sandbox-image", "prompt": "x", "params": "width=64"},
            "validation_error",
            "params",
            id="params-a-string",
        ),
        pytest.param(
            {"model": "sandbox-image", "prompt": "x", "upload_ids": ["not-a-uuid"]},
            "validation_error",
            "upload_ids",
            id="upload-id-not-uuid",
        ),
        pytest.param(
            {"model": "sandbox-image", "prompt": "x", "upload_ids": "abc"},
            "validation_error",
            "upload_ids",
            id="upload-ids-not-a-list",
        ),
        pytest.param(
            {"model": "sandbox-image", "prompt": "x", "upload_ids": [str(uuid.uuid4())]},
            "not_found",
            "upload_ids",
            id="upload-id-unknown",
        ),
    ],
)
def test_invalid_request_is_400_with_field_errors_and_records_nothing(
    funded: Any,
    api_for: Any,
    queued: dict[str, list[Any]],
    body: dict[str, Any],
    code: str,
    field: str,
) -> None:
    user = funded(10)

    response = api_for(user).post(TASKS, body, format="json")

    error = assert_error(response, 400, code)
    assert field in error["fields"], error
    assert all(isinstance(m, str) and m for m in error["fields"][field])
    assert_nothing_recorded()
    assert held(user) == 0
    assert (dispatch_all(), queued["submit"]) == (0, [])


def test_malformed_json_is_400_malformed_request(
    funded: Any, api_for: Any, queued: dict[str, list[Any]]
) -> None:
    response = api_for(funded(10)).post(
        TASKS, data='{"model": "sandbox-image", "prompt": ', content_type="application/json"
    )

    assert_error(response, 400, "malformed_request")
    assert_nothing_recorded()


def test_json_array_body_is_400(funded: Any, api_for: Any, queued: dict[str, list[Any]]) -> None:
    response = api_for(funded(10)).post(
        TASKS, [{"model": "sandbox-image", "prompt": "x"}], format="json"
    )

    error = assert_error(response, 400, "validation_error")
    assert "non_field_errors" in error["fields"]
    assert_nothing_recorded()


def test_someone_elses_upload_looks_like_a_missing_one(
    funded: Any, api_for: Any, queued: dict[str, list[Any]]
) -> None:
    owner, other = funded(10), funded(10)
    created = api_for(owner).post(UPLOADS, {"file": upload("ref.png", png())}, format="multipart")
    assert created.status_code == 201
    theirs, missing = created.json()["id"], str(uuid.uuid4())

    foreign = create(api_for(other), upload_ids=[theirs])
    absent = create(api_for(other), upload_ids=[missing])

    foreign_error = assert_error(foreign, 400, "not_found")
    absent_error = assert_error(absent, 400, "not_found")
    assert foreign_error["message"] == absent_error["message"]
    assert foreign_error["fields"]["upload_ids"] == [
        m.replace(missing, theirs) for m in absent_error["fields"]["upload_ids"]
    ]
    assert_nothing_recorded()


def test_anonymous_cannot_create_or_list(queued: dict[str, list[Any]]) -> None:
    anonymous = APIClient()

    assert_error(create(anonymous), 401, "not_authenticated")
    assert_error(anonymous.get(TASKS), 401, "not_authenticated")
    assert_nothing_recorded()


def test_capacity_limit_is_429_with_retry_after(
    funded: Any, api_for: Any, queued: dict[str, list[Any]], settings: Any, ledger_ok: None
) -> None:
    settings.TASK_MAX_RUNNING_PER_USER = 1
    user = funded(10)
    client = api_for(user)
    assert create(client).status_code == 202

    response = create(client)

    assert_error(response, 429, "too_many_running_tasks")
    assert int(response["Retry-After"]) > 0
    assert Task.objects.count() == 1
    assert held(user) == C


# --- insufficient credits -------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("credits", [0, 1])
def test_insufficient_credits_is_402_with_the_failed_task(
    funded: Any, api_for: Any, queued: dict[str, list[Any]], ledger_ok: None, credits: int
) -> None:
    user = funded(credits)
    client = api_for(user)

    response = create(client, params={"num_outputs": 2})

    assert response.status_code == 402
    body = response.json()
    assert body["status"] == "FAILED"
    assert body["error"]["code"] == "insufficient_credits"
    assert body["error"]["kind"] == "user"
    assert body["error"]["message"]
    assert body["credits"]["reserved_micro"] == 0
    assert body["finished_at"] is not None
    assert [t["id"] for t in client.get(TASKS).json()["results"]] == [body["id"]]
    assert client.get(body["poll_url"]).json() == body
    assert Notification.objects.filter(
        user=user, kind=Notification.Kind.INSUFFICIENT_CREDITS, subject_id=body["id"]
    ).exists()
    assert (dispatch_all(), queued["submit"]) == (0, [])
    assert Hold.objects.count() == 0
    assert held(user) == 0


# --- Idempotency-Key ------------------------------------------------------------------------


def post_with_key(client: APIClient, key: str, **body: Any) -> Any:
    body.setdefault("model", "sandbox-image")
    body.setdefault("prompt", "a lighthouse at dusk")
    return client.post(TASKS, body, format="json", headers={"Idempotency-Key": key})


@pytest.mark.django_db(transaction=True)
def test_same_key_and_body_replays_the_first_response(
    funded: Any, api_for: Any, queued: dict[str, list[Any]], ledger_ok: None
) -> None:
    user = funded(10)
    client = api_for(user)

    first = post_with_key(client, "k-1")
    second = post_with_key(client, "k-1")

    assert (first.status_code, second.status_code) == (202, 202)
    assert second.json()["id"] == first.json()["id"]
    assert second["Location"] == first["Location"] == first.json()["poll_url"]
    assert second["Idempotent-Replayed"] == "true"
    assert not first.has_header("Idempotent-Replayed")
    assert Task.objects.count() == 1
    assert Hold.objects.count() == 1
    assert held(user) == C
    assert (dispatch_all(), queued["submit"]) == (1, [first.json()["id"]])


@pytest.mark.django_db(transaction=True)
def test_twenty_concurrent_submits_with_one_key_create_one_task(
    funded: Any, api_for: Any, queued: dict[str, list[Any]], ledger_ok: None
) -> None:
    # A client that retries impatiently, or several tabs: the same key and body at once.
    from billing.tests.concurrency import run_concurrently

    user = funded(10)
    clients = [api_for(user) for _ in range(20)]

    answers = run_concurrently([lambda c=c: post_with_key(c, "k-race") for c in clients])

    statuses = [a.status_code for a in answers]
    assert set(statuses) <= {202, 409}, statuses
    assert 202 in statuses
    ids = {a.json()["id"] for a in answers if a.status_code == 202}
    assert len(ids) == 1  # every 202 is the one task (first answer or its replay)
    for refused in (a for a in answers if a.status_code == 409):
        assert refused.json()["error"]["code"] == "idempotency_in_progress"
    assert Task.objects.count() == 1
    assert Hold.objects.count() == 1
    assert held(user) == C
    assert (dispatch_all(), queued["submit"]) == (1, list(ids))


def test_same_key_with_another_body_is_422(
    funded: Any, api_for: Any, queued: dict[str, list[Any]]
) -> None:
    client = api_for(funded(10))
    assert post_with_key(client, "k-2").status_code == 202

    response = post_with_key(client, "k-2", prompt="another prompt")

    assert_error(response, 422, "idempotency_key_reused")
    assert Task.objects.count() == 1


def test_keys_are_scoped_per_user(funded: Any, api_for: Any, queued: dict[str, list[Any]]) -> None:
    alice, bob = funded(10), funded(10)

    a = post_with_key(api_for(alice), "shared-key")
    b = post_with_key(api_for(bob), "shared-key")

    assert (a.status_code, b.status_code) == (202, 202)
    assert a.json()["id"] != b.json()["id"]
    assert not b.has_header("Idempotent-Replayed")
    assert set(Task.objects.values_list("user_id", flat=True)) == {alice.pk, bob.pk}


def test_key_still_in_progress_is_409(
    funded: Any, api_for: Any, queued: dict[str, list[Any]]
) -> None:
    user = funded(10)
    body = {"model": "sandbox-image", "prompt": "a lighthouse at dusk"}
    # The first request with this key has claimed it and not finished (same fingerprint).
    raw = APIRequestFactory().post(TASKS, body, format="json")
    fingerprint = request_fingerprint(Request(raw, parsers=[JSONParser()]))
    billing.idempotency_claim(user=user, key="k-busy", fingerprint=fingerprint)

    response = post_with_key(api_for(user), "k-busy", **body)

    assert_error(response, 409, "idempotency_in_progress")
    assert_nothing_recorded()


def test_refused_request_does_not_burn_its_key(
    funded: Any, api_for: Any, queued: dict[str, list[Any]]
) -> None:
    client = api_for(funded(10))
    assert_error(post_with_key(client, "k-3", params={"width": 1}), 400, "validation_error")

    corrected = post_with_key(client, "k-3", params={"width": 64})

    assert corrected.status_code == 202
    assert not corrected.has_header("Idempotent-Replayed")
    assert Task.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_refusal_for_credits_is_replayed_not_repeated(
    funded: Any, api_for: Any, queued: dict[str, list[Any]], ledger_ok: None
) -> None:
    user = funded(0)
    client = api_for(user)

    first = post_with_key(client, "k-4")
    second = post_with_key(client, "k-4")

    assert (first.status_code, second.status_code) == (402, 402)
    assert second.json()["id"] == first.json()["id"]
    assert second["Idempotent-Replayed"] == "true"
    assert Task.objects.filter(user=user).count() == 1
    assert Notification.objects.filter(user=user).count() == 1


def test_invalid_idempotency_key_is_refused(
    funded: Any, api_for: Any, queued: dict[str, list[Any]]
) -> None:
    response = post_with_key(api_for(funded(10)), "k" * 256)

    assert_error(response, 400, "invalid_idempotency_key")
    assert_nothing_recorded()


def test_upload_with_key_is_replayed(funded: Any, api_for: Any) -> None:
    client = api_for(funded(1))
    data = png()

    def send() -> Any:
        return client.post(
            UPLOADS,
            {"file": upload("ref.png", data)},
            format="multipart",
            headers={"Idempotency-Key": "up-1"},
        )

    first, second = send(), send()

    assert (first.status_code, second.status_code) == (201, 201)
    assert second.json() == first.json()
    assert second["Idempotent-Replayed"] == "true"
    assert Upload.objects.count() == 1


def test_upload_key_reused_for_another_file_is_422(funded: Any, api_for: Any) -> None:
    client = api_for(funded(1))
    headers = {"Idempotency-Key": "up-2"}
    first = client.post(
        UPLOADS, {"file": upload("a.png", png(32, 24))}, format="multipart", headers=headers
    )
    assert first.status_code == 201

    second = client.post(
        UPLOADS, {"file": upload("a.png", png(24, 32))}, format="multipart", headers=headers
    )

    assert_error(second, 422, "idempotency_key_reused")
    assert Upload.objects.count() == 1


# --- POST /api/v1/tasks/ (multipart with files) ---------------------------------------------


def multipart(client: APIClient, model: str, *files: Any, **fields: Any) -> Any:
    data: dict[str, Any] = {"model": model, **fields}
    if files:
        data["files"] = list(files)
    return client.post(TASKS, data, format="multipart")


def test_multipart_create_with_a_png_stores_the_upload(
    funded: Any, api_for: Any, queued: dict[str, list[Any]], ledger_ok: None
) -> None:
    user = funded(10)
    data = png(48, 36)

    response = multipart(
        api_for(user),
        "sandbox-image",
        upload("ref.png", data, "image/png"),
        prompt="like this",
        params=json.dumps({"num_outputs": 2}),
    )

    assert response.status_code == 202, response.content
    body = response.json()
    assert len(body["upload_ids"]) == 1
    assert body["params"]["num_outputs"] == 2
    assert body["credits"]["reserved_micro"] == 2 * C
    stored = Upload.objects.get(pk=body["upload_ids"][0])
    assert stored.user_id == user.pk
    assert (stored.mime, stored.width, stored.height) == ("image/png", 48, 36)
    assert stored.bytes == len(data)
    assert stored.original_name == "ref.png"
    with stored.file.open("rb") as fh:
        assert fh.read() == data


def test_file_type_comes_from_content_not_name(
    funded: Any, api_for: Any, queued: dict[str, list[Any]]
) -> None:
    response = multipart(
        api_for(funded(10)),
        "sandbox-image",
        upload("photo.png", jpeg(40, 30), "image/png"),
        prompt="like this",
    )

    assert response.status_code == 202
    stored = Upload.objects.get(pk=response.json()["upload_ids"][0])
    assert (stored.mime, stored.width, stored.height) == ("image/jpeg", 40, 30)


@pytest.mark.parametrize(
    ("data", "code"),
    [
        pytest.param(b"<html><script>alert(1)</script></html>", "unsupported_file_type", id="html"),
        pytest.param(png(64, 64, noise=True)[:200], "unreadable_file", id="truncated-png"),
        pytest.param(b"", "empty_file", id="empty"),
    ],
)
def test_multipart_fake_image_is_refused_and_records_nothing(
    funded: Any, api_for: Any, queued: dict[str, list[Any]], data: bytes, code: str
) -> None:
    response = multipart(
        api_for(funded(10)), "sandbox-image", upload("x.png", data, "image/png"), prompt="x"
    )

    error = assert_error(response, 400, code)
    assert "files" in error["fields"]
    assert_nothing_recorded()
    assert Upload.objects.count() == 0


def test_multipart_too_many_files_is_refused(
    funded: Any, api_for: Any, queued: dict[str, list[Any]]
) -> None:
    response = multipart(
        api_for(funded(10)),
        "sandbox-image",
        upload("a.png", png()),
        upload("b.png", png()),
        prompt="x",
    )

    assert_error(response, 400, "too_many_files")
    assert_nothing_recorded()
    assert Upload.objects.count() == 0


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        pytest.param({"file": png()}, "file", id="file-instead-of-files"),
        pytest.param({"seed": "7"}, "seed", id="unknown-field"),
        pytest.param({"params": "{not json"}, "params", id="params-not-json"),
        pytest.param({"params": "[1, 2]"}, "params", id="params-json-list"),
    ],
)
def test_multipart_bad_fields_are_refused(
    funded: Any, api_for: Any, queued: dict[str, list[Any]], fields: dict[str, Any], field: str
) -> None:
    # A misnamed file field must not silently run (and bill) a generation without the file.
    data = {k: upload("ref.png", v) if isinstance(v, bytes) else v for k, v in fields.items()}

    response = multipart(api_for(funded(10)), "sandbox-image", prompt="like this", **data)

    error = assert_error(response, 400, "validation_error")
    assert field in error["fields"]
    assert_nothing_recorded()
    assert Upload.objects.count() == 0


def test_multipart_can_mix_upload_ids_and_files(
    funded: Any, api_for: Any, queued: dict[str, list[Any]]
) -> None:
    client = api_for(funded(10))
    # sandbox-video accepts at most one reference image: one by id plus one file is one too many.
    uploaded = client.post(UPLOADS, {"file": upload("a.png", png())}, format="multipart").json()

    both = multipart(
        client,
        "sandbox-video",
        upload("b.png", png()),
        prompt="x",
        upload_ids=[uploaded["id"]],
    )
    by_id = multipart(client, "sandbox-video", prompt="x", upload_ids=[uploaded["id"]])

    assert_error(both, 400, "too_many_files")
    assert by_id.status_code == 202
    assert by_id.json()["upload_ids"] == [uploaded["id"]]
    assert by_id.json()["credits"]["reserved_micro"] == C  # 2 s (default) x 0.5 credits


def test_audio_isolation_is_priced_from_the_measured_duration(
    funded: Any, api_for: Any, queued: dict[str, list[Any]], ledger_ok: None
) -> None:
    user = funded(10)

    response = multipart(
        api_for(user), "sandbox-audio-isolation", upload("voice.wav", wav(2.0), "audio/wav")
    )

    assert response.status_code == 202, response.content
    body = response.json()
    assert (body["credits"]["reserved"], body["credits"]["reserved_micro"]) == ("0.1", 100_000)
    assert held(user) == 100_000
    stored = Upload.objects.get(pk=body["upload_ids"][0])
    assert (stored.mime, stored.duration_ms) == ("audio/wav", 2000)


@pytest.mark.parametrize(
    ("files", "code", "field"),
    [
        pytest.param([("short.wav", wav(0.5))], "invalid_file", "files.0", id="too-short"),
        pytest.param([], "file_required", "files", id="no-file"),
        pytest.param([("a.wav", png())], "invalid_file", "files.0", id="png-not-audio"),
    ],
)
def test_audio_isolation_refuses_bad_input(
    funded: Any,
    api_for: Any,
    queued: dict[str, list[Any]],
    files: list[tuple[str, bytes]],
    code: str,
    field: str,
) -> None:
    response = multipart(
        api_for(funded(10)), "sandbox-audio-isolation", *(upload(n, d) for n, d in files)
    )

    error = assert_error(response, 400, code)
    assert field in error["fields"]
    assert_nothing_recorded()
    assert Upload.objects.count() == 0


def test_audio_shorter_than_minimum_says_so(
    funded: Any, api_for: Any, queued: dict[str, list[Any]]
) -> None:
    response = multipart(
        api_for(funded(10)), "sandbox-audio-isolation", upload("short.wav", wav(0.5))
    )

    error = assert_error(response, 400, "invalid_file")
    assert "shorter than the minimum 1.0 s" in error["fields"]["files.0"][0]


# --- POST /api/v1/uploads/ ------------------------------------------------------------------


def test_upload_then_create_by_upload_id(
    funded: Any, api_for: Any, queued: dict[str, list[Any]], ledger_ok: None
) -> None:
    user = funded(10)
    client = api_for(user)
    data = png(50, 40)

    uploaded = client.post(UPLOADS, {"file": upload("ref.png", data)}, format="multipart")

    assert uploaded.status_code == 201
    body = uploaded.json()
    assert (body["mime"], body["bytes"]) == ("image/png", len(data))
    assert (body["width"], body["height"], body["duration_ms"]) == (50, 40, None)
    assert body["original_name"] == "ref.png"

    response = create(client, upload_ids=[body["id"]])

    assert response.status_code == 202
    assert response.json()["upload_ids"] == [body["id"]]
    assert Upload.objects.count() == 1  # referenced, not copied


def test_another_user_cannot_use_my_upload(
    funded: Any, api_for: Any, queued: dict[str, list[Any]]
) -> None:
    owner, other = funded(10), funded(10)
    upload_id = (
        api_for(owner).post(UPLOADS, {"file": upload("ref.png", png())}, format="multipart").json()
    )["id"]

    response = create(api_for(other), upload_ids=[upload_id])

    assert_error(response, 400, "not_found")
    assert_nothing_recorded()
    assert held(other) == 0


def test_uploaded_audio_prices_audio_isolation(
    funded: Any, api_for: Any, queued: dict[str, list[Any]], ledger_ok: None
) -> None:
    client = api_for(funded(10))
    uploaded = client.post(UPLOADS, {"file": upload("v.wav", wav(3.0))}, format="multipart")
    assert uploaded.status_code == 201
    assert uploaded.json()["duration_ms"] == 3000

    response = create(
        client, model="sandbox-audio-isolation", prompt="", upload_ids=[uploaded.json()["id"]]
    )

    assert response.status_code == 202
    assert response.json()["credits"]["reserved_micro"] == 150_000


def test_upload_without_file_is_400(funded: Any, api_for: Any) -> None:
    response = api_for(funded(1)).post(UPLOADS, {"name": "x"}, format="multipart")

    error = assert_error(response, 400, "validation_error")
    assert "file" in error["fields"]
    assert Upload.objects.count() == 0


def test_upload_of_html_is_refused(funded: Any, api_for: Any) -> None:
    response = api_for(funded(1)).post(
        UPLOADS, {"file": upload("x.png", b"<html><body>hi</body></html>")}, format="multipart"
    )

    assert_error(response, 400, "unsupported_file_type")
    assert Upload.objects.count() == 0


# --- size limits ----------------------------------------------------------------------------


def test_body_over_max_request_bytes_is_413(
    funded: Any, api_for: Any, queued: dict[str, list[Any]], settings: Any
) -> None:
    settings.MAX_REQUEST_BYTES = 1000
    client = api_for(funded(10))

    too_big = create(client, prompt="x" * 1500)
    small = create(client, prompt="x" * 10)

    error = assert_error(too_big, 413, "request_too_large")
    assert "1000" in error["message"]
    assert small.status_code == 202
    assert Task.objects.count() == 1


def test_max_request_bytes_boundary_and_bad_content_length(
    funded: Any, api_for: Any, queued: dict[str, list[Any]], settings: Any
) -> None:
    settings.MAX_REQUEST_BYTES = 1000
    client = api_for(funded(10))

    def body(size: int) -> str:
        text = json.dumps({"model": "sandbox-image", "prompt": ""})
        return text.replace('"prompt": ""', '"prompt": "' + "x" * (size - len(text)) + '"')

    at_limit = client.post(TASKS, data=body(1000), content_type="application/json")
    over = client.post(TASKS, data=body(1001), content_type="application/json")
    garbled = client.post(
        TASKS, data=body(100), content_type="application/json", CONTENT_LENGTH="lots"
    )

    assert at_limit.status_code == 202
    assert_error(over, 413, "request_too_large")
    assert_error(garbled, 400, "bad_content_length")
    assert Task.objects.count() == 1


class _UnreadableBody:
    """A request body that must not be read: reading it is the failure."""

    def __init__(self) -> None:
        self.reads = 0

    def read(self, *args: Any) -> bytes:
        self.reads += 1
        raise AssertionError("the body of an oversized request was read")

    readline = read


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        (TASKS, "application/json"),
        (TASKS, "multipart/form-data; boundary=x"),
        (UPLOADS, "multipart/form-data; boundary=x"),
    ],
)
def test_oversized_request_is_refused_before_its_body_is_read(
    funded: Any, api_for: Any, settings: Any, path: str, content_type: str
) -> None:
    # Given a client announcing a 10 GB body it would stream slowly
    settings.MAX_REQUEST_BYTES = 1000
    body = _UnreadableBody()

    response = api_for(funded(10)).post(
        path,
        data=b"",
        content_type=content_type,
        CONTENT_LENGTH=str(10 * 1024**3),
        **{"wsgi.input": body},
    )

    # Then the answer comes from the header alone
    assert_error(response, 413, "request_too_large")
    assert body.reads == 0
    assert Task.objects.count() == 0


def test_upload_body_over_max_request_bytes_is_413(
    funded: Any, api_for: Any, settings: Any
) -> None:
    settings.MAX_REQUEST_BYTES = 1000

    response = api_for(funded(1)).post(
        UPLOADS, {"file": upload("big.png", png(64, 64, noise=True))}, format="multipart"
    )

    assert_error(response, 413, "request_too_large")
    assert Upload.objects.count() == 0


@pytest.mark.parametrize("idempotency_key", [None, "big-1"])
def test_task_file_over_max_upload_bytes_is_413(
    funded: Any,
    api_for: Any,
    queued: dict[str, list[Any]],
    settings: Any,
    idempotency_key: str | None,
) -> None:
    settings.MAX_UPLOAD_BYTES = 10_000
    settings.MAX_REQUEST_BYTES = 10 * 2**20
    data = png(100, 100, noise=True)
    assert len(data) > 10_000
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}

    response = api_for(funded(10)).post(
        TASKS,
        {"model": "sandbox-image", "prompt": "x", "files": [upload("big.png", data)]},
        format="multipart",
        headers=headers,
    )

    assert_error(response, 413, "file_too_large")
    assert_nothing_recorded()
    assert Upload.objects.count() == 0


@pytest.mark.parametrize("idempotency_key", [None, "big-2"])
def test_upload_over_max_upload_bytes_is_413(
    funded: Any, api_for: Any, settings: Any, idempotency_key: str | None
) -> None:
    settings.MAX_UPLOAD_BYTES = 10_000
    settings.MAX_REQUEST_BYTES = 10 * 2**20
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    client = api_for(funded(1))

    response = client.post(
        UPLOADS,
        {"file": upload("big.png", png(100, 100, noise=True))},
        format="multipart",
        headers=headers,
    )
    small = client.post(UPLOADS, {"file": upload("small.png", png())}, format="multipart")

    assert_error(response, 413, "file_too_large")
    assert small.status_code == 201
    assert Upload.objects.count() == 1


def test_upload_limit_boundary(funded: Any, api_for: Any, settings: Any) -> None:
    settings.MAX_UPLOAD_BYTES = 10_000
    client = api_for(funded(1))
    image = png()
    # Bytes after a PNG's end are ignored by decoders: a real PNG of any exact size.
    exact = image + b"\0" * (10_000 - len(image))

    at_limit = client.post(UPLOADS, {"file": upload("a.png", exact)}, format="multipart")
    over = client.post(UPLOADS, {"file": upload("b.png", exact + b"\0")}, format="multipart")

    assert at_limit.status_code == 201
    assert at_limit.json()["bytes"] == 10_000
    assert_error(over, 413, "file_too_large")
    assert Upload.objects.count() == 1


# --- GET /api/v1/tasks/ (history) and /api/v1/tasks/<id>/ -----------------------------------


def submit(user: Any, slug: str = "sandbox-image", **params: Any) -> Task:
    return services.task_submit(user=user, model_slug=slug, prompt="a fox", params=params).task


def ids(response: Any) -> list[str]:
    assert response.status_code == 200
    return [t["id"] for t in response.json()["results"]]


def test_history_is_newest_first_and_only_mine(
    funded: Any, api_for: Any, queued: dict[str, list[Any]]
) -> None:
    me, someone = funded(10), funded(10)
    mine = [submit(me) for _ in range(3)]
    theirs = submit(someone)

    response = api_for(me).get(TASKS)

    assert ids(response) == [str(t.pk) for t in reversed(mine)]
    assert str(theirs.pk) not in ids(response)
    assert ids(api_for(someone).get(TASKS)) == [str(theirs.pk)]


def test_history_pages_with_cursors(
    funded: Any, api_for: Any, queued: dict[str, list[Any]]
) -> None:
    user = funded(10)
    expected = [str(submit(user).pk) for _ in range(5)][::-1]
    client = api_for(user)

    first = client.get(TASKS, {"page_size": 2}).json()
    second = client.get(first["next"]).json()
    third = client.get(second["next"]).json()
    back = client.get(second["previous"]).json()

    assert set(first) == {"next", "previous", "results"}
    assert first["previous"] is None
    assert second["previous"] is not None
    assert third["next"] is None
    pages = [[t["id"] for t in p["results"]] for p in (first, second, third)]
    assert pages == [expected[0:2], expected[2:4], expected[4:5]]
    assert [t["id"] for t in back["results"]] == expected[0:2]


def test_history_filters(funded: Any, api_for: Any, queued: dict[str, list[Any]]) -> None:
    user = funded(3)
    image_1 = submit(user)
    image_2 = submit(user)
    speech = submit(user, "sandbox-speech", duration_s=2)  # 0.2 credits
    refused = submit(user, num_outputs=4)  # 4 credits > 0.8 available
    assert refused.status == S.FAILED
    client = api_for(user)

    def listed(**query: str) -> list[str]:
        return ids(client.get(TASKS, query))

    assert listed(status="FAILED") == [str(refused.pk)]
    assert listed(status="waiting") == [str(t.pk) for t in (speech, image_2, image_1)]
    assert listed(category="audio") == [str(speech.pk)]
    assert listed(model="sandbox-image") == [str(t.pk) for t in (refused, image_2, image_1)]
    assert listed(status="WAITING", model="sandbox-image") == [str(image_2.pk), str(image_1.pk)]
    assert listed(status="SUCCESS") == []
    assert listed(model="sandbox-video") == []


def test_someone_elses_task_is_404(funded: Any, api_for: Any, queued: dict[str, list[Any]]) -> None:
    owner, other = funded(10), funded(10)
    task = submit(owner)
    client = api_for(other)

    assert_error(client.get(task_url(task.pk)), 404, "not_found")
    assert_error(client.get(task_url(uuid.uuid4())), 404, "not_found")
    assert_error(client.get("/api/v1/tasks/not-a-uuid/"), 404, "not_found")
    assert_error(client.get(result_url(task.pk, 0)), 404, "not_found")
    assert api_for(owner).get(task_url(task.pk)).status_code == 200


def test_deleted_task_is_gone_for_its_owner(
    funded: Any, api_for: Any, queued: dict[str, list[Any]]
) -> None:
    user = funded(10)
    kept, deleted = submit(user), submit(user)
    Task.objects.filter(pk=deleted.pk).update(deleted_at=timezone.now())
    client = api_for(user)

    assert ids(client.get(TASKS)) == [str(kept.pk)]
    assert_error(client.get(task_url(deleted.pk)), 404, "not_found")


def test_result_of_unfinished_task_is_404(
    funded: Any, api_for: Any, queued: dict[str, list[Any]]
) -> None:
    user = funded(10)
    task = submit(user)

    assert_error(api_for(user).get(result_url(task.pk, 0)), 404, "not_found")


def count_queries(client: APIClient, url: str) -> int:
    with CaptureQueriesContext(connection) as ctx:
        response = client.get(url)
    assert response.status_code == 200
    return len(ctx)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("credits", [10, 0], ids=["accepted", "refused-for-credits"])
def test_the_plain_json_submit_answers_as_the_drf_view_does(
    funded: Any, api_for: Any, credits: int
) -> None:
    # A JSON submit with an API key is served without DRF's request machinery
    # (``views.submit_json``); with a query string the same request goes through DRF's view.
    # Both answer the same status, headers and body, but for the task's own id and times,
    # with an Idempotency-Key or without.
    client = api_for(funded(credits))
    body = {"model": "sandbox-image", "prompt": "a fox", "params": {"width": 256}}

    def keyed(key: str) -> dict[str, str]:
        return {"Idempotency-Key": key}

    plain = client.post(TASKS, body, format="json")
    drf = client.post(f"{TASKS}?via=drf", body, format="json")
    plain_keyed = client.post(TASKS, body, format="json", headers=keyed("k-plain"))
    drf_keyed = client.post(f"{TASKS}?via=drf", body, format="json", headers=keyed("k-drf"))

    def shape(response: Any) -> tuple[int, dict[str, str], dict[str, Any]]:
        answer = response.json()
        task_id = answer["id"]
        headers = {k: v.replace(task_id, "<id>") for k, v in response.headers.items()}
        volatile = ("id", "created_at", "finished_at", "expires_at", "poll_url")
        return response.status_code, headers, {k: v for k, v in answer.items() if k not in volatile}

    assert shape(plain) == shape(drf) == shape(plain_keyed) == shape(drf_keyed)
    assert plain.status_code == (202 if credits else 402)
    assert plain.headers["Content-Type"] == "application/json"
    assert Task.objects.count() == 4


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("first", ["plain", "drf"])
def test_a_keyed_json_submit_stores_the_record_drf_would_and_either_view_replays_it(
    funded: Any, api_for: Any, submit_path: str, first: str, ledger_ok: None
) -> None:
    # On the one-statement path the plain view stores the key's record with the task
    # (``services.task_submit_in_one_statement``); DRF's view claims it, then completes it.
    # Either way the record is the same, and a retry through the other view replays the first
    # answer.
    from billing.models import IdempotencyRecord

    user = funded(10)
    client = api_for(user)
    body = {"model": "sandbox-image", "prompt": "a fox", "params": {"width": 256}}
    plain_url, drf_url = TASKS, f"{TASKS}?via=drf"
    urls = [plain_url, drf_url] if first == "plain" else [drf_url, plain_url]
    headers = {"Idempotency-Key": "k-either"}

    answer = client.post(urls[0], body, format="json", headers=headers)
    record = IdempotencyRecord.objects.get(user=user, key="k-either")
    retry = client.post(urls[1], body, format="json", headers=headers)
    other = client.post(drf_url, body, format="json", headers={"Idempotency-Key": "k-other"})

    assert answer.status_code == retry.status_code == other.status_code == 202
    assert retry.json() == answer.json()
    assert retry["Location"] == answer["Location"] == answer.json()["poll_url"]
    assert retry["Idempotent-Replayed"] == "true"
    assert not answer.has_header("Idempotent-Replayed")
    assert record.status == IdempotencyRecord.Status.COMPLETED
    assert record.response_status == 202
    assert record.response_body == answer.json()
    assert record.response_headers == {"Location": answer["Location"]}
    reference = IdempotencyRecord.objects.get(user=user, key="k-other")  # always DRF's
    assert record.fingerprint == reference.fingerprint
    assert record.expires_at - record.locked_at == reference.expires_at - reference.locked_at
    assert Task.objects.filter(user=user).count() == 2
    assert held(user) == 2 * C


@pytest.mark.django_db(transaction=True)
def test_only_the_plain_json_submit_skips_drf(
    funded: Any, api_for: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The plain request takes ``submit_json``; anything DRF would negotiate or decode otherwise
    # goes to DRF's view, and answers as it always has (a 406 records nothing).
    from tasks.api import views

    taken: list[str] = []
    plain = views.submit_json

    def spy(request: Any, *args: Any) -> Any:
        taken.append(request.META.get("HTTP_ACCEPT", ""))
        return plain(request, *args)

    monkeypatch.setattr(views, "submit_json", spy)
    client = api_for(funded(10))
    body = {"model": "sandbox-image", "prompt": "a fox"}

    assert client.post(TASKS, body, format="json").status_code == 202
    assert (
        client.post(TASKS, body, format="json", HTTP_ACCEPT="application/json").status_code == 202
    )
    keyed = client.post(TASKS, body, format="json", headers={"Idempotency-Key": "k-plain"})
    html = client.post(TASKS, body, format="json", HTTP_ACCEPT="text/html")
    other_type = client.post(TASKS, json.dumps(body), content_type="application/json-patch+json")

    assert len(taken) == 3  # with an Idempotency-Key too
    assert keyed.status_code == 202
    assert (html.status_code, html.json()["error"]["code"]) == (406, "not_acceptable")
    assert other_type.status_code == 415
    assert Task.objects.count() == 3


@pytest.mark.django_db(transaction=True)
def test_the_task_representation_is_what_drf_would_build_from_the_fields(
    funded: Any, sandbox: Any
) -> None:
    # ``TaskSerializer.represent`` builds the answer by hand (it is on every submit's path);
    # DRF's generic ModelSerializer, from the declared fields, must give the same, whatever
    # the task's state.
    from rest_framework import serializers

    from tasks.api.serializers import TaskSerializer
    from tasks.tests.lifecycle import run_to_end, submit

    user = funded(10)
    waiting = submit(user)
    done = run_to_end(submit(user))
    failed = run_to_end(submit(user, sandbox_outcome="fail"))
    expired = run_to_end(submit(user))
    Task.objects.filter(pk=expired.pk).update(results_expired_at=timezone.now())
    tasks = [Task.objects.get(pk=t.pk) for t in (waiting, done, failed, expired)]
    assert [t.status for t in tasks] == ["WAITING", "SUCCESS", "FAILED", "SUCCESS"]
    assert done.results
    assert failed.error_code

    for task in tasks:
        generic = serializers.ModelSerializer.to_representation(TaskSerializer(), task)
        assert TaskSerializer.represent(task) == dict(generic)
        assert list(TaskSerializer.represent(task)) == TaskSerializer.Meta.fields


def test_detail_and_history_use_a_constant_number_of_queries(
    funded: Any,
    api_for: Any,
    queued: dict[str, list[Any]],
    settings: Any,
    django_assert_max_num_queries: Any,
) -> None:
    settings.TASK_MAX_RUNNING_PER_USER = 100
    user = funded(100)
    client = api_for(user)
    first = submit(user)
    client.get(TASKS)  # the API key's once-a-minute "last used" write happens here
    detail_with_one = count_queries(client, task_url(first.pk))
    history_with_one = count_queries(client, TASKS)

    for _ in range(29):
        submit(user)

    with django_assert_max_num_queries(detail_with_one):
        assert client.get(task_url(first.pk)).status_code == 200
    with django_assert_max_num_queries(history_with_one):
        assert len(ids(client.get(TASKS))) == 30
    # The API key lookup and one read: nothing per task, no COUNT(*).
    assert detail_with_one <= 2
    assert history_with_one <= 2


# --- results (through the real lifecycle against the sandbox process) ------------------------


@pytest.mark.usefixtures("sandbox")
def test_result_is_served_as_the_verified_file(
    funded: Any, api_for: Any, queued: dict[str, list[Any]], ledger_ok: None
) -> None:
    user = funded(10)
    client = api_for(user)
    task_id = create(client, params={"width": 64, "height": 80}).json()["id"]
    services.task_send_upstream(task_id=task_id)
    services.task_refresh(task_id=task_id)

    task = client.get(task_url(task_id)).json()

    assert task["status"] == "SUCCESS"
    assert task["credits"]["charged_micro"] == C
    assert len(task["results"]) == 1
    result = task["results"][0]
    assert result["url"] == result_url(task_id, 0)
    assert (result["mime"], result["width"], result["height"]) == ("image/png", 64, 80)

    response = client.get(result["url"])

    assert response.status_code == 200
    assert response["Content-Type"] == "image/png"
    assert response["X-Content-Type-Options"] == "nosniff"
    assert "sandbox" in response["Content-Security-Policy"]
    data = b"".join(response.streaming_content)  # the test client closes it when exhausted
    assert len(data) == result["bytes"]
    with Image.open(io.BytesIO(data)) as image:
        assert (image.format, image.size) == ("PNG", (64, 80))

    assert_error(client.get(result_url(task_id, 1)), 404, "not_found")
    assert_error(client.get(result_url(task_id, 5)), 404, "not_found")
    stranger = api_for(funded(1))
    assert_error(stranger.get(result["url"]), 404, "not_found")
    assert_error(stranger.get(task_url(task_id)), 404, "not_found")

    Task.objects.filter(pk=task_id).update(results_expired_at=timezone.now())

    assert_error(client.get(result["url"]), 410, "results_expired")
    expired = client.get(task_url(task_id)).json()
    assert (expired["expired"], expired["results"]) == (True, [])
    assert_error(stranger.get(result["url"]), 404, "not_found")


# --- POST /api/v1/callbacks/<provider>/ -----------------------------------------------------


@pytest.fixture
def webhook(settings: Any) -> Webhook:
    settings.SANDBOX_WEBHOOK_SECRET = SECRET
    return Webhook(SECRET)


def refused_count() -> int:
    return int(cache.get(REFUSED_COUNTER.format(provider="sandbox")) or 0)


def test_callback_without_signature_is_401_and_stores_nothing(webhook: Webhook) -> None:
    before = refused_count()

    response = deliver(job_event(), {})

    assert_error(response, 401, "invalid_signature", kind="provider")
    assert CallbackDelivery.objects.count() == 0
    assert refused_count() == before + 1


def test_callback_with_wrong_signature_is_401(webhook: Webhook) -> None:
    body = job_event()
    other = Webhook("whsec_" + "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFB")

    wrong_secret = deliver(body, signed_headers(other, body))
    tampered = deliver(job_event(status="failed"), signed_headers(webhook, body))
    reserialized = deliver(json.dumps(json.loads(body), indent=2), signed_headers(webhook, body))

    for response in (wrong_secret, tampered, reserialized):
        assert_error(response, 401, "invalid_signature", kind="provider")
    assert CallbackDelivery.objects.count() == 0


def test_callback_body_over_the_json_limit_is_413(webhook: Webhook, settings: Any) -> None:
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 100
    body = job_event("job_" + "x" * 200)

    response = deliver(body, signed_headers(webhook, body))

    assert_error(response, 413, "request_too_large")
    assert CallbackDelivery.objects.count() == 0


def test_callback_for_unknown_provider_is_404(webhook: Webhook) -> None:
    body = job_event()

    response = deliver(body, signed_headers(webhook, body), provider="acme")

    assert_error(response, 404, "not_found")
    assert CallbackDelivery.objects.count() == 0


def test_signed_callback_that_is_not_a_job_event_is_400(webhook: Webhook) -> None:
    body = json.dumps({"type": "ping"})

    response = deliver(body, signed_headers(webhook, body))

    assert_error(response, 400, "invalid_callback", kind="provider")
    assert CallbackDelivery.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_signed_callback_is_stored_once_and_processed_after_commit(
    webhook: Webhook, queued: dict[str, list[Any]]
) -> None:
    body = job_event("job_abc")
    headers = signed_headers(webhook, body, msg_id="msg_abc")

    first = deliver(body, headers)
    again = deliver(body, headers)

    assert first.status_code == 200
    assert first.json() == {"received": True, "duplicate": False, "id": first.json()["id"]}
    assert again.status_code == 200
    assert again.json() == {"received": True, "duplicate": True, "id": first.json()["id"]}
    delivery = CallbackDelivery.objects.get()
    assert (delivery.provider, delivery.event_id, delivery.upstream_id) == (
        "sandbox",
        "msg_abc",
        "job_abc",
    )
    assert delivery.status == CallbackDelivery.Status.PENDING
    assert queued["callback"] == [delivery.pk]


def test_callback_signed_with_one_of_several_signatures_is_accepted(
    webhook: Webhook, queued: dict[str, list[Any]]
) -> None:
    # Secret rotation: the header may carry several "v1,<sig>" entries.
    body = job_event()
    headers = signed_headers(webhook, body)
    headers["webhook-signature"] = "v1,bm90LXRoZS1yaWdodC1vbmU= " + headers["webhook-signature"]

    response = deliver(body, headers)

    assert response.status_code == 200
    assert CallbackDelivery.objects.count() == 1


@pytest.mark.parametrize("age", [timedelta(minutes=10), timedelta(minutes=-10)])
def test_callback_outside_the_timestamp_tolerance_is_401(webhook: Webhook, age: timedelta) -> None:
    body = job_event()

    response = deliver(body, signed_headers(webhook, body, at=datetime.now(UTC) - age))

    assert_error(response, 401, "invalid_signature", kind="provider")
    assert CallbackDelivery.objects.count() == 0


# --- API keys copied by the process (rivya.key_cache) ---------------------------------------


def client_and_key(user: Any) -> tuple[APIClient, str]:
    """An API client for ``user`` with a new key, and that key."""
    from rivya.services import api_key_create

    raw = str(api_key_create(user=user).raw)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    return client, raw


def revoke_or_deactivate(user: Any, raw: str, how: str) -> None:
    from rivya.services import api_key_revoke

    if how == "revoked":
        api_key_revoke(user=user, prefix=raw.split("_")[1])
    else:
        type(user).objects.filter(pk=user.pk).update(is_active=False)


@pytest.mark.django_db(transaction=True)  # as in production: no outer transaction
@pytest.mark.parametrize("how", ["revoked", "deactivated"])
@pytest.mark.parametrize("keyed", [False, True], ids=["plain", "with-idempotency-key"])
def test_a_copied_key_is_refused_on_the_next_submit_after_it_is_revoked(
    funded: Any, submit_path: str, how: str, keyed: bool
) -> None:
    # The process keeps a copy of the key after its first submit; the accept statement checks
    # it, so a key revoked (or its user deactivated) in between still gets a 401 at once.
    from rivya import key_cache

    user = funded(10)
    client, raw = client_and_key(user)
    for n in range(2):
        assert post_with_key(client, f"k-copy-{n}").status_code == 202
    assert key_cache.copied_key(raw) is not None
    revoke_or_deactivate(user, raw, how)

    body = {"model": "sandbox-image", "prompt": "a lighthouse at dusk"}
    headers = {"Idempotency-Key": "k-after"} if keyed else {}
    response = client.post(TASKS, body, format="json", headers=headers)

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "authentication_failed"
    assert Task.objects.filter(user=user).count() == 2
    assert held(user) == 2 * C
    assert key_cache.copied_key(raw) is None


@pytest.mark.parametrize(
    ("credits", "body", "status"),
    [
        (10, {"model": "sandbox-image", "prompt": "x", "params": {"width": 1}}, 400),
        (0, {"model": "sandbox-image", "prompt": "x"}, 402),
    ],
    ids=["invalid", "insufficient-credits"],
)
@pytest.mark.parametrize("revoked", [False, True], ids=["key-valid", "key-revoked"])
def test_a_copied_key_answers_a_refusal_only_after_looking_the_key_up(
    funded: Any,
    submit_path: str,
    credits: int,
    body: dict[str, Any],
    status: int,
    revoked: bool,
) -> None:
    # Only an accepted submit is answered on the copy's word (the statement checked the key);
    # a refusal is given after the key is looked up again: 401 for a revoked key, not 400/402.
    from rivya import key_cache
    from rivya.services import api_key_authenticate

    user = funded(credits)
    client, raw = client_and_key(user)
    key_cache.remember(api_key_authenticate(raw=raw))  # as a first submit leaves it
    assert key_cache.copied_key(raw) is not None
    if revoked:
        revoke_or_deactivate(user, raw, "revoked")
    before = Task.objects.count()

    response = client.post(TASKS, body, format="json")

    assert response.status_code == (401 if revoked else status)
    assert Task.objects.count() == before + (1 if status == 402 and not revoked else 0)


@pytest.mark.parametrize("prefix", ["/", "/rivya/"])
@pytest.mark.parametrize("zone", ["UTC", "Asia/Kolkata"])
def test_the_hand_built_urls_and_times_are_what_drf_and_django_give(prefix: str, zone: str) -> None:
    # TaskSerializer.represent builds the poll URL from a reversed template and formats times
    # with the time zone looked up once: the same as reverse() under any script prefix, and as
    # DRF's DateTimeField in any current time zone.
    import datetime as dt
    import uuid

    from django.urls import get_script_prefix, reverse, set_script_prefix
    from django.utils import timezone
    from rest_framework.serializers import DateTimeField

    from tasks.api.serializers import api_time, task_detail_url

    task_id = uuid.uuid4()
    when = dt.datetime(2026, 11, 28, 13, 5, 7, 123456, tzinfo=dt.UTC)
    before = get_script_prefix()
    set_script_prefix(prefix)
    try:
        with timezone.override(zone):
            assert task_detail_url(task_id) == reverse("api-task-detail", args=[task_id])
            assert task_detail_url(task_id).startswith(prefix)
            shown = api_time(when, timezone.get_current_timezone())
            assert shown == DateTimeField().to_representation(when)
    finally:
        set_script_prefix(before)
    assert shown.endswith("Z") == (zone == "UTC")
