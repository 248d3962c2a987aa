"""Single (synchronous) tasks through ``POST /api/v1/single/<type>/``, on PostgreSQL, Redis (the
gate) and the sandbox process: each type's success and failure with refund, invalid payloads and
files (400, no task, no charge), a dataset whose upload fails half-way, insufficient credits,
idempotent retries, ``Prefer: respond-async``, the gate when full, and the reconciler that
refunds a task whose process died (issue 17)."""

from __future__ import annotations

import asyncio
import io
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.core.files.storage import default_storage
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils import timezone
from PIL import Image

from billing import selectors as billing_selectors
from notifications.models import Notification
from tasks.models import AIModel, Dataset, DatasetFile, Task
from tasks.single import services as single
from tasks.single.gate import single_gate
from tasks.tests.lifecycle import wav

pytestmark = [pytest.mark.django_db]

C = 1_000_000
URL = "/api/v1/single/{}/"


@pytest.fixture
def client(sandbox: Any, catalog: None, funded: Any, api_for: Any) -> Any:
    user = funded(10)
    api = api_for(user)
    api.user = user
    return api


def post(api: Any, single_type: str, body: Any, **headers: str) -> Any:
    return api.post(
        URL.format(single_type), json.dumps(body), content_type="application/json", headers=headers
    )


def balance(user: Any) -> int:
    return billing_selectors.balance_for_user(user=user).available


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), (200, 30, 40)).save(buf, "PNG")
    return buf.getvalue()


def no_task_no_charge(api: Any, before: int) -> None:
    assert not Task.objects.filter(user=api.user).exists()
    assert balance(api.user) == before


# --- each type's success --------------------------------------------------------------------


def test_translation_answers_with_the_result_and_charges_per_character(
    client: Any, ledger_ok: None
) -> None:
    text = "hello friend, good morning"
    response = post(
        client, "translation", {"text": text, "source_language": "en", "target_language": "hi"}
    )
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["status"] == "SUCCESS"
    assert body["result"]["text"]
    assert body["result"]["text"] != text
    assert body["result"]["target_language"] == "hi"
    price = 20 * len(text)
    assert body["credits"]["charged_micro"] == price
    task = Task.objects.get(pk=body["task_id"])
    assert (task.status, task.runtime, task.single_type, task.category) == (
        "SUCCESS",
        "sync",
        "translation",
        "text",
    )
    assert task.sync_deadline_at is not None
    assert task.finished_at is not None
    assert balance(client.user) == 10 * C - price
    # In History like any other task, its result a stored JSON document.
    listed = client.get("/api/v1/tasks/").json()["results"]
    assert [t["id"] for t in listed] == [str(task.pk)]
    assert listed[0]["single_type"] == "translation"
    stored = client.get(listed[0]["results"][0]["url"])
    assert stored.status_code == 200
    assert json.loads(b"".join(stored.streaming_content))["text"] == body["result"]["text"]
    # The requester got the answer: no notification for it.
    assert not Notification.objects.filter(subject_id=str(task.pk)).exists()


def test_completion_with_images_stores_a_dataset(client: Any, ledger_ok: None) -> None:
    files = [SimpleUploadedFile(f"p{i}.png", png(), "image/png") for i in range(2)]
    response = client.post(
        URL.format("completion"),
        {"prompt": "describe these", "max_tokens": "5", "files": files},
        format="multipart",
    )
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["result"]["finish_reason"] == "length"
    assert body["result"]["usage"]["output_tokens"] == 5
    task = Task.objects.get(pk=body["task_id"])
    assert task.params["max_tokens"] == 5
    dataset = task.dataset
    assert dataset is not None
    assert dataset.status == Dataset.Status.COMPLETED
    stored = list(dataset.files.order_by("position"))
    assert [f.mime for f in stored] == ["image/png", "image/png"]
    assert all(default_storage.exists(f.file.name) for f in stored)
    assert task.charged_micro == C // 20


def test_text_to_speech_returns_playable_audio_and_transcription_reads_it_back(
    client: Any, ledger_ok: None
) -> None:
    text = "the quick brown fox jumps over the lazy dog"
    spoken = post(client, "text_to_speech", {"text": text, "voice": "meera"})
    assert spoken.status_code == 200, spoken.content
    result = spoken.json()["result"]
    assert result["mime"] == "audio/wav"
    assert result["voice"] == "meera"
    assert 2000 <= result["duration_ms"] <= 9000  # nine words, spoken
    audio = client.get(result["url"])
    assert audio.status_code == 200
    assert audio["Content-Type"] == "audio/wav"
    data = b"".join(audio.streaming_content)
    assert data[:4] == b"RIFF"
    assert len(data) == result["bytes"]

    heard = client.post(
        URL.format("transcription"),
        {"files": [SimpleUploadedFile("speech.wav", data, "audio/wav")], "language": "en"},
        format="multipart",
    )
    assert heard.status_code == 200, heard.content
    transcript = heard.json()["result"]
    assert transcript["text"] == text
    words = transcript["words"]
    assert [w["text"] for w in words] == text.split()
    ends = [(w["start_ms"], w["end_ms"]) for w in words]
    assert all(a < b for a, b in ends)
    assert all(ends[i][1] <= ends[i + 1][0] for i in range(len(ends) - 1))
    assert ends[-1][1] <= transcript["duration_ms"]
    task = Task.objects.get(pk=heard.json()["task_id"])
    # Billed per second of audio, from the file's measured duration.
    assert task.charged_micro == (C // 100) * -(-result["duration_ms"] // 1000)
    assert task.dataset.files.get().duration_ms == pytest.approx(result["duration_ms"], abs=50)


# --- failures refund ------------------------------------------------------------------------


BODIES = {
    "translation": {"text": "hello", "source_language": "en", "target_language": "fr"},
    "completion": {"prompt": "hello"},
    "text_to_speech": {"text": "hello there"},
}


@pytest.mark.parametrize("single_type", sorted(BODIES))
def test_a_provider_failure_refunds_in_full(client: Any, ledger_ok: None, single_type: str) -> None:
    body = {**BODIES[single_type], "params": {"sandbox_outcome": "fail"}}
    response = post(client, single_type, body)
    assert response.status_code == 502, response.content
    answer = response.json()
    assert answer["status"] == "FAILED"
    assert answer["result"] is None
    assert answer["error"]["kind"] == "provider"
    assert answer["error"]["code"] == "sandbox_failure"
    task = Task.objects.get(pk=answer["task_id"])
    assert task.charged_micro == 0
    assert task.refunded_micro == task.reserved_micro > 0
    assert balance(client.user) == 10 * C


def test_transcription_failure_and_rejection_refund(client: Any, ledger_ok: None) -> None:
    for outcome, status, state in (("fail", 502, "FAILED"), ("reject", 422, "REJECTED")):
        response = client.post(
            URL.format("transcription"),
            {
                "files": [SimpleUploadedFile("a.wav", wav(2), "audio/wav")],
                "params": json.dumps({"sandbox_outcome": outcome}),
            },
            format="multipart",
        )
        assert response.status_code == status, response.content
        assert response.json()["status"] == state
    assert balance(client.user) == 10 * C


def test_a_rejected_input_is_rejected_and_refunded(client: Any, ledger_ok: None) -> None:
    response = post(
        client, "translation", {**BODIES["translation"], "params": {"sandbox_outcome": "reject"}}
    )
    assert response.status_code == 422
    assert response.json()["status"] == "REJECTED"
    assert response.json()["error"]["kind"] == "user"
    assert balance(client.user) == 10 * C


def test_a_provider_slower_than_the_budget_times_out_and_refunds(
    client: Any, ledger_ok: None
) -> None:
    AIModel.objects.filter(slug="sandbox-translate").update(timeout_seconds=1)
    response = post(
        client,
        "translation",
        {**BODIES["translation"], "params": {"sandbox_latency_ms": 5000}},
    )
    assert response.status_code == 504, response.content
    assert response.json()["error"]["code"] == "upstream_timeout"
    assert balance(client.user) == 10 * C


# --- invalid input: 400, nothing recorded, nothing charged -----------------------------------


INVALID_JSON = [
    ("translation", {}, "body"),
    ("translation", {"text": "hi", "source_language": "en"}, "target_language"),
    ("translation", {"text": 12, "source_language": "en", "target_language": "hi"}, "text"),
    ("translation", {"text": "  ", "source_language": "en", "target_language": "hi"}, "text"),
    ("translation", {"text": "x", "source_language": "english", "target_language": "hi"}, None),
    ("translation", {"text": "x", "source_language": "en", "target_language": "en"}, None),
    ("translation", {"text": "x", "source_language": "en", "target_language": "ja"}, None),
    ("translation", {**BODIES["translation"], "colour": "red"}, "colour"),
    ("translation", {**BODIES["translation"], "model": "sandbox-image"}, "model"),
    ("translation", {**BODIES["translation"], "model": "sandbox-tts"}, "model"),
    ("translation", {**BODIES["translation"], "model": "nope"}, "model"),
    ("translation", {**BODIES["translation"], "params": {"sandbox_outcome": "?"}}, None),
    ("translation", {**BODIES["translation"], "params": [1]}, "params"),
    ("translation", {**BODIES["translation"], "text": "a\x00b"}, None),
    ("translation", {**BODIES["translation"], "text": "x" * 5001}, "prompt"),
    ("completion", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("completion", {"prompt": "x", "max_tokens": 99999}, "max_tokens"),
    ("completion", {"prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ("text_to_speech", {"text": "x", "voice": "robot"}, "voice"),
    ("text_to_speech", {"text": ["x"]}, "text"),
    ("transcription", {"language": "en"}, "files"),
]


@pytest.mark.parametrize(("single_type", "body", "field"), INVALID_JSON)
def test_invalid_json_is_a_400_with_nothing_recorded(
    client: Any, single_type: str, body: Any, field: str | None
) -> None:
    before = balance(client.user)
    response = post(client, single_type, body)
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["kind"] == "user"
    if field is not None:
        assert field in error.get("fields", {}), error
    no_task_no_charge(client, before)


def test_malformed_and_non_object_bodies_are_400(client: Any) -> None:
    for raw in (b"{not json", b"[1, 2]", b'"text"', b""):
        response = client.post(URL.format("translation"), raw, content_type="application/json")
        assert response.status_code == 400, (raw, response.content)
        assert response.json()["error"]["code"]
    no_task_no_charge(client, 10 * C)


def test_invalid_files_are_400_with_nothing_stored(client: Any) -> None:
    cases = [
        # not audio at all, whatever its name says
        ("transcription", {"files": [SimpleUploadedFile("a.wav", b"RIFF" + b"\x01" * 500)]}),
        ("transcription", {"files": [SimpleUploadedFile("a.wav", png(), "audio/wav")]}),
        # one audio file only
        (
            "transcription",
            {"files": [SimpleUploadedFile(f"{i}.wav", wav(1), "audio/wav") for i in range(2)]},
        ),
        # files where the type takes none
        ("translation", {**BODIES["translation"], "files": [SimpleUploadedFile("a.png", png())]}),
        # more images than the model takes
        (
            "completion",
            {"prompt": "x", "files": [SimpleUploadedFile(f"{i}.png", png()) for i in range(5)]},
        ),
        # audio where images are expected
        ("completion", {"prompt": "x", "files": [SimpleUploadedFile("a.wav", wav(1))]}),
    ]
    for single_type, body in cases:
        response = client.post(URL.format(single_type), body, format="multipart")
        assert response.status_code == 400, (single_type, response.content)
        assert response.json()["error"]["kind"] == "user"
    no_task_no_charge(client, 10 * C)
    assert not Dataset.objects.exists()


def test_unknown_type_and_wrong_method(client: Any) -> None:
    assert client.post(URL.format("dance"), {}, format="json").status_code == 404
    response = client.get(URL.format("translation"))
    assert response.status_code == 405
    assert response.json()["error"]["code"]


def test_anonymous_requests_are_refused(sandbox: Any, catalog: None) -> None:
    from rest_framework.test import APIClient

    response = APIClient().post(URL.format("translation"), BODIES["translation"], format="json")
    assert response.status_code in (401, 403)
    assert not Task.objects.exists()


# --- the upload pipeline ----------------------------------------------------------------------


def test_an_upload_failing_mid_dataset_leaves_nothing_and_charges_nothing(
    client: Any, settings: Any, tmp_path: Any
) -> None:
    settings.STORAGES = {
        **settings.STORAGES,
        "default": {
            "BACKEND": "tasks.tests.storages.FailOnSecondSave",
            "OPTIONS": {"location": str(tmp_path / "media")},
        },
    }
    files = [SimpleUploadedFile(f"p{i}.png", png(), "image/png") for i in range(3)]
    response = client.post(
        URL.format("completion"), {"prompt": "three pictures", "files": files}, format="multipart"
    )
    assert response.status_code == 503, response.content
    error = response.json()["error"]
    assert (error["code"], error["kind"]) == ("upload_failed", "infra")
    dataset = Dataset.objects.get()
    assert dataset.status == Dataset.Status.FAILED
    assert "file 2 of 3" in dataset.error_message
    assert not DatasetFile.objects.exists()
    stored = [p for p in (tmp_path / "media").rglob("*") if p.is_file()]
    assert stored == []
    no_task_no_charge(client, 10 * C)


# --- credits, idempotency ---------------------------------------------------------------------


def test_insufficient_credits_is_a_402_with_the_failed_task(
    sandbox: Any, catalog: None, make_user: Any, api_for: Any, ledger_ok: None
) -> None:
    user = make_user()
    response = post(api_for(user), "completion", {"prompt": "hello"})
    assert response.status_code == 402, response.content
    body = response.json()
    assert body["error"]["code"] == "insufficient_credits"
    assert body["status"] == "FAILED"
    task = Task.objects.get(pk=body["task_id"])
    assert task.reserved_micro == 0
    assert (
        billing_selectors.hold_for_subject(subject_type="tasks.task", subject_id=str(task.pk))
        is None
    )


def test_an_idempotent_retry_gets_the_first_answer_and_pays_once(
    client: Any, ledger_ok: None
) -> None:
    first = post(client, "translation", BODIES["translation"], **{"Idempotency-Key": "k-1"})
    again = post(client, "translation", BODIES["translation"], **{"Idempotency-Key": "k-1"})
    assert first.status_code == again.status_code == 200
    assert again["Idempotent-Replayed"] == "true"
    assert again.json()["task_id"] == first.json()["task_id"]
    assert again.json()["result"] == first.json()["result"]
    assert Task.objects.filter(user=client.user).count() == 1
    other = post(
        client,
        "translation",
        {**BODIES["translation"], "text": "bye"},
        **{"Idempotency-Key": "k-1"},
    )
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reused"


# --- Prefer: respond-async ----------------------------------------------------------------------


def test_audio_too_long_for_the_request_is_refused_or_run_by_a_worker(
    settings: Any,
    client: Any,
    ledger_ok: None,
    monkeypatch: pytest.MonkeyPatch,
    django_capture_on_commit_callbacks: Any,
) -> None:
    from tasks.services import enqueue

    queued: list[str] = []
    monkeypatch.setattr(enqueue, "run_single", lambda task_id: queued.append(str(task_id)))
    long_audio = wav(125)

    def send(**headers: str) -> Any:
        return client.post(
            URL.format("transcription"),
            {"files": [SimpleUploadedFile("long.wav", long_audio, "audio/wav")]},
            format="multipart",
            headers=headers,
        )

    refused = send()
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["code"] == "requires_async"
    assert "Prefer: respond-async" in error["message"]
    assert not Task.objects.exists()
    assert queued == []

    with django_capture_on_commit_callbacks(execute=True):
        accepted = send(Prefer="respond-async", **{"Idempotency-Key": "long-1"})
    assert accepted.status_code == 202, accepted.content
    body = accepted.json()
    assert body["status"] == "GENERATING"
    assert accepted["Location"] == body["poll_url"]
    assert queued == [body["id"]]
    # A retry with the key while it runs gets the same 202 (the task as it is now), no new task.
    again = send(Prefer="respond-async", **{"Idempotency-Key": "long-1"})
    assert again.status_code == 202
    assert again.json()["id"] == body["id"]
    assert again["Idempotent-Replayed"] == "true"
    assert queued == [body["id"]]
    assert single.single_run_deferred(task_id=body["id"]) is True
    assert single.single_run_deferred(task_id=body["id"]) is False  # a redelivery: nothing
    task = Task.objects.get(pk=body["id"])
    # A worker's budget is the background one, from its claim.
    assert task.timeout_seconds == settings.SINGLE_ASYNC_TIMEOUT_S
    assert task.status == "SUCCESS"
    assert task.charged_micro == (C // 100) * 125
    # Nobody waited for this answer: it is a notification.
    assert Notification.objects.filter(subject_id=str(task.pk)).count() == 1
    polled = client.get(body["poll_url"]).json()
    assert polled["status"] == "SUCCESS"
    assert polled["results"][0]["mime"] == "application/json"


# --- the gate -------------------------------------------------------------------------------


def test_a_full_gate_answers_429_with_retry_after(client: Any, settings: Any) -> None:
    settings.SINGLE_MAX_CONCURRENT = 1
    settings.SINGLE_GATE_WAIT_S = 0.2
    gate = single_gate()
    slot = asyncio.run(gate.acquire(lease_s=30, wait_s=0))
    assert slot is not None
    try:
        response = post(client, "translation", BODIES["translation"])
        assert response.status_code == 429
        assert int(response["Retry-After"]) >= 1
        assert response.json()["error"]["code"] == "system_busy"
        assert not Task.objects.exists()
    finally:
        asyncio.run(gate.release(slot))
    assert post(client, "translation", BODIES["translation"]).status_code == 200


# --- a process that died mid-request ------------------------------------------------------------


def test_the_reconciler_refunds_a_task_whose_request_never_finished(
    client: Any, ledger_ok: None, settings: Any
) -> None:
    start = single.single_start(
        user=client.user, single_type="translation", data=BODIES["translation"]
    )
    task = start.task
    assert task.status == "GENERATING"
    assert balance(client.user) < 10 * C
    assert single.single_settle_interrupted() == 0  # its deadline has not passed
    later = task.sync_deadline_at + timedelta(seconds=1)
    assert single.single_settle_interrupted(now=later) == 1
    task.refresh_from_db()
    assert (task.status, task.error_code, task.error_kind) == ("FAILED", "interrupted", "infra")
    assert balance(client.user) == 10 * C
    assert Notification.objects.filter(subject_id=str(task.pk)).count() == 1
    # The request's own finish, had it come back, changes nothing and keeps no file.
    outcome = asyncio.run(single.single_execute(start.run))
    finished, result = single.single_finish(start.run, outcome)
    assert finished.status == "FAILED"
    assert result is None
    kept = [p for p in Path(settings.MEDIA_ROOT, "results", str(task.pk)).rglob("*") if p.is_file()]
    assert kept == []


# --- support ----------------------------------------------------------------------------------


def test_support_sees_a_single_task_and_its_dataset_and_cannot_recheck_it(
    client: Any, admin_client: Any, admin_user: Any
) -> None:
    from tasks.services import ActionRefused, task_support_recheck

    response = client.post(
        URL.format("transcription"),
        {"files": [SimpleUploadedFile("a.wav", wav(2), "audio/wav")]},
        format="multipart",
    )
    task = Task.objects.get(pk=response.json()["task_id"])
    page = admin_client.get(f"/admin/tasks/task/{task.pk}/change/")
    assert page.status_code == 200
    text = page.content.decode()
    assert "single transcription task, run inside its request" in text
    assert admin_client.get(f"/admin/tasks/dataset/{task.dataset_id}/change/").status_code == 200
    running = single.single_start(
        user=client.user, single_type="translation", data=BODIES["translation"]
    ).task
    with pytest.raises(ActionRefused) as refused:
        task_support_recheck(
            task_id=running.pk,
            actor=admin_user,
            reason="why",
            token="t-1",
        )
    assert refused.value.code == "single_task"


def test_ledger_check_reports_a_single_task_the_reconciler_left(client: Any) -> None:
    from billing.invariants import run_reports

    start = single.single_start(
        user=client.user, single_type="translation", data=BODIES["translation"]
    )

    def overdue() -> list[str]:
        return [b.detail for b in run_reports() if b.check == "single_overdue"]

    assert overdue() == []
    Task.objects.filter(pk=start.task.pk).update(
        sync_deadline_at=start.task.sync_deadline_at - timedelta(minutes=5)
    )
    notes = overdue()
    assert len(notes) == 1
    assert str(start.task.pk) in notes[0]


def test_anonymous_requests_never_wait_for_the_gate(
    sandbox: Any, catalog: None, settings: Any
) -> None:
    from rest_framework.test import APIClient

    settings.SINGLE_MAX_CONCURRENT = 1
    settings.SINGLE_GATE_WAIT_S = 5
    gate = single_gate()
    slot = asyncio.run(gate.acquire(lease_s=30, wait_s=0))
    try:
        response = APIClient().post(URL.format("translation"), BODIES["translation"], format="json")
        # At once (not after waiting 5 s for the full gate), and not a 429.
        assert response.status_code in (401, 403)
    finally:
        asyncio.run(gate.release(slot))


def test_a_signed_in_browser_is_served_with_its_csrf_token_and_refused_without(
    sandbox: Any, catalog: None, funded: Any
) -> None:
    from django.test import Client

    browser = Client(enforce_csrf_checks=True)
    browser.force_login(funded(10))
    browser.get("/studio/")
    token = browser.cookies["csrftoken"].value
    body = json.dumps(BODIES["translation"])
    served = browser.post(
        URL.format("translation"),
        body,
        content_type="application/json",
        headers={"X-CSRFToken": token},
    )
    assert served.status_code == 200, served.content
    refused = browser.post(URL.format("translation"), body, content_type="application/json")
    assert refused.status_code == 403
    assert Task.objects.count() == 1


def test_a_replay_after_the_result_expired_says_so(client: Any) -> None:
    first = post(client, "translation", BODIES["translation"], **{"Idempotency-Key": "exp"})
    Task.objects.filter(pk=first.json()["task_id"]).update(results_expired_at=timezone.now())
    again = post(client, "translation", BODIES["translation"], **{"Idempotency-Key": "exp"})
    assert again.status_code == 200
    assert again.json()["result"] is None
    assert again.json()["expired"] is True


def test_an_oversized_file_is_a_413_for_api_key_clients_too(
    sandbox: Any, catalog: None, funded: Any, settings: Any
) -> None:
    from rest_framework.test import APIClient

    from rivya import services as rivya_services

    settings.MAX_UPLOAD_BYTES = 10_000
    user = funded(10)
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {rivya_services.api_key_create(user=user).raw}")
    big = png() + b"\0" * 20_000
    for single_type, body in (
        ("completion", {"prompt": "what is it?", "files": [SimpleUploadedFile("a.png", big)]}),
        ("transcription", {"files": [SimpleUploadedFile("a.wav", wav(10))]}),
    ):
        response = api.post(URL.format(single_type), body, format="multipart")
        assert response.status_code == 413, (single_type, response.content)
        assert response.json()["error"]["code"] == "file_too_large"
    assert not Task.objects.exists()
    assert balance(user) == 10 * C


def test_files_in_a_json_body_are_refused_not_ignored(client: Any) -> None:
    response = post(client, "completion", {"prompt": "what is it?", "files": ["aGVsbG8="]})
    assert response.status_code == 400
    assert "files" in response.json()["error"]["fields"]
    no_task_no_charge(client, 10 * C)


def test_a_lost_worker_message_is_queued_again_and_a_late_claim_runs_nothing(
    client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks.services import enqueue

    queued: list[str] = []
    monkeypatch.setattr(enqueue, "run_single", lambda task_id: queued.append(str(task_id)))
    task = single.single_start(
        user=client.user,
        single_type="translation",
        data=BODIES["translation"],
        prefer_async=True,
    ).task
    assert single.single_requeue_unclaimed() == 0  # just queued
    later = timezone.now() + timedelta(seconds=settings_value("SINGLE_REQUEUE_AFTER_S") + 1)
    assert single.single_requeue_unclaimed(now=later) == 1
    assert queued == [str(task.pk)]
    assert single.single_requeue_unclaimed(now=later) == 0  # not again at once
    # Past its deadline the reconciler refunds it, and a worker that comes late runs nothing.
    task.refresh_from_db()
    past = task.sync_deadline_at + timedelta(seconds=1)
    assert single.single_settle_interrupted(now=past) == 1
    assert single.single_run_deferred(task_id=task.pk) is False
    task.refresh_from_db()
    assert (task.status, task.submit_attempts) == ("FAILED", 0)


def settings_value(name: str) -> Any:
    from django.conf import settings

    return getattr(settings, name)


@pytest.mark.django_db(transaction=True)
def test_the_reconciler_leaves_a_task_whose_answer_is_being_stored(
    client: Any, settings: Any, tmp_path: Any
) -> None:
    import threading
    import time

    from django.db import connection

    # given: a task whose provider answered just before its deadline, its result going to a
    # slow storage
    start = single.single_start(
        user=client.user, single_type="translation", data=BODIES["translation"]
    )
    outcome = asyncio.run(single.single_execute(start.run))
    Task.objects.filter(pk=start.task.pk).update(
        sync_deadline_at=timezone.now() + timedelta(seconds=1)
    )
    settings.STORAGES = {
        **settings.STORAGES,
        "default": {
            "BACKEND": "tasks.tests.storages.SlowSave",
            "OPTIONS": {"location": str(tmp_path / "slow"), "delay": 2.0},
        },
    }
    finished: list[Any] = []

    def finish() -> None:
        try:
            finished.append(single.single_finish(start.run, outcome))
        finally:
            connection.close()

    # when: the reconciler runs after the old deadline, while the result is being stored
    recording = threading.Thread(target=finish)
    recording.start()
    time.sleep(1.5)
    refunded = single.single_settle_interrupted()
    recording.join()

    # then: it leaves the task, which succeeds with its result
    assert refunded == 0
    task, result = finished[0]
    assert task.status == "SUCCESS"
    assert result is not None
