"""What an independent review found: each test pins a fix (capacity before credits, NUL bytes,
jobs lost upstream, malformed policies, late acceptance, Celery retries, changed files, ...)."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.conf import settings
from django.core.files.storage import default_storage
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from django.utils import timezone

from billing import selectors as billing_selectors
from tasks import services
from tasks.models import AIModel, Task, TaskEvent
from tasks.tests.lifecycle import run_to_end, signed_callback, submit, wav

C = 1_000_000
S = Task.Status
pytestmark = pytest.mark.usefixtures("sandbox", "catalog", "queued", "ledger_ok")


@pytest.mark.django_db
def test_capacity_is_refused_with_429_before_credits_are_looked_at(
    funded: Any, api_for: Any, settings: Any
) -> None:
    settings.TASK_MAX_RUNNING_PER_USER = 1
    user = funded(1)
    submit(user, sandbox_latency_ms=60_000)  # takes the only slot and the only credit

    response = api_for(user).post(
        "/api/v1/tasks/", {"model": "sandbox-image", "prompt": "x"}, format="json"
    )

    assert response.status_code == 429
    assert response["Retry-After"]
    assert Task.objects.filter(user=user).count() == 1  # nothing stored for the refusal


@pytest.mark.django_db
def test_insufficient_credits_gives_its_capacity_slot_back(funded: Any, settings: Any) -> None:
    settings.TASK_MAX_RUNNING_PER_USER = 1
    user = funded(0)

    for _ in range(3):
        outcome = services.task_submit(user=user, model_slug="sandbox-image", prompt="x")
        assert outcome.task.error_code == "insufficient_credits"  # never 429: no slot leaked


@pytest.mark.django_db
@pytest.mark.parametrize(
    "body",
    [
        {"model": "sandbox-image\u0000", "prompt": "x"},
        {"model": "sandbox-image", "prompt": "a\u0000b"},
        {
            "model": "sandbox-image",
            "prompt": "x",
            "params": {"width": 64, "sandbox_outcome": "\u0000"},
        },
        {"model": "sandbox-image", "prompt": "x", "upload_ids": ["\u0000"]},
    ],
)
def test_nul_characters_are_refused_with_400(funded: Any, api_for: Any, body: Any) -> None:
    response = api_for(funded(10)).post("/api/v1/tasks/", body, format="json")

    assert response.status_code == 400
    assert response.json()["error"]["kind"] == "user"
    assert Task.objects.count() == 0


@pytest.mark.django_db
@pytest.mark.parametrize("query", ["model=%00", "status=%00", "status=DONE", "category=music"])
def test_bad_history_filters_are_400(funded: Any, api_for: Any, query: str) -> None:
    response = api_for(funded(10)).get(f"/api/v1/tasks/?{query}")

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "validation_error"


@pytest.mark.django_db
def test_multipart_files_sent_as_text_are_refused(funded: Any, api_for: Any) -> None:
    response = api_for(funded(10)).post(
        "/api/v1/tasks/",
        {"model": "sandbox-image", "prompt": "x", "files": "not a file"},
        format="multipart",
    )

    assert response.status_code == 400
    assert "files" in response.json()["error"]["fields"]
    assert Task.objects.count() == 0


@pytest.mark.django_db
def test_a_job_the_provider_lost_fails_and_refunds_once_it_keeps_saying_so(
    funded: Any, django_capture_on_commit_callbacks: Any
) -> None:
    from tasks.services.refresh import JOB_LOST_AFTER_S, JOB_LOST_ANSWERS

    AIModel.objects.filter(slug="sandbox-image").update(
        billing_policy={"failure_charge_percent": 50}
    )
    user = funded(10)
    task = submit(user, sandbox_latency_ms=60_000)
    services.task_send_upstream(task_id=task.pk)
    httpx.post(f"{settings.SANDBOX_URL}/v1/_reset", trust_env=False)  # the upstream forgets

    # A few "not found" answers in quick succession (replication lag, a blip) change nothing
    for _ in range(JOB_LOST_ANSWERS + 1):
        services.task_refresh(task_id=task.pk)
    task.refresh_from_db()
    assert task.status == S.GENERATING
    assert billing_selectors.balance_for_user(user=user).held == C

    # Once it has said so, without a break, for long enough, the task fails, refunded in full
    # (nothing to charge), and the provider is asked to stop the job in case it only hid it
    Task.objects.filter(pk=task.pk).update(
        not_found_since=timezone.now() - timedelta(seconds=JOB_LOST_AFTER_S + 1)
    )
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        services.task_refresh(task_id=task.pk)

    task.refresh_from_db()
    assert (task.status, task.error_code, task.charged_micro) == (S.FAILED, "upstream_job_lost", 0)
    assert billing_selectors.balance_for_user(user=user).available == 10 * C
    assert task.cancel_requested_at is not None
    assert len(callbacks) == 1  # the upstream cancel, queued after commit


@pytest.mark.django_db(transaction=True)
def test_not_found_answers_fail_a_task_only_in_an_unbroken_run(
    funded: Any, queued: dict[str, list[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks.providers.base import JobState, JobStatus, ProviderError
    from tasks.providers.sandbox import SandboxProvider
    from tasks.services.refresh import JOB_LOST_AFTER_S, JOB_LOST_ANSWERS

    # Given a running task whose provider sometimes says "not found", sometimes "running"
    user = funded(10)
    task = submit(user, sandbox_latency_ms=600_000)
    services.task_send_upstream(task_id=task.pk)
    answers: list[str] = []

    def fetch_status(self: SandboxProvider, upstream_id: str) -> JobStatus:
        if answers.pop(0) == "lost":
            raise ProviderError("gone", retryable=False, code="job_not_found", status=404)
        return JobStatus(upstream_id=upstream_id, state=JobState.RUNNING)

    monkeypatch.setattr(SandboxProvider, "fetch_status", fetch_status)
    long_ago = timezone.now() - timedelta(hours=1)

    # When isolated not-found answers, spread over an hour, come between real statuses
    for _ in range(JOB_LOST_ANSWERS + 2):
        answers[:] = ["lost", "running"]
        services.task_refresh(task_id=task.pk)
        Task.objects.filter(pk=task.pk, not_found_since__isnull=False).update(
            not_found_since=long_ago
        )
        services.task_refresh(task_id=task.pk)

    # Then every real status ended the run: the task runs on, its credits held
    task.refresh_from_db()
    assert task.status == S.GENERATING
    assert (task.not_found_since, task.not_found_count) == (None, 0)
    assert TaskEvent.objects.filter(task=task, kind="upstream_not_found").count() >= 5
    assert billing_selectors.balance_for_user(user=user).held == C

    # And an unbroken run, long enough in answers but not yet in time, still changes nothing
    answers[:] = ["lost"] * JOB_LOST_ANSWERS
    for _ in range(JOB_LOST_ANSWERS):
        services.task_refresh(task_id=task.pk)
    task.refresh_from_db()
    assert (task.status, task.not_found_count) == (S.GENERATING, JOB_LOST_ANSWERS)

    # Only once the unbroken run is also old enough does the task fail, refunded, cancelled
    Task.objects.filter(pk=task.pk).update(
        not_found_since=timezone.now() - timedelta(seconds=JOB_LOST_AFTER_S + 1)
    )
    answers[:] = ["lost"]
    services.task_refresh(task_id=task.pk)
    task.refresh_from_db()
    assert (task.status, task.error_code, task.refunded_micro) == (
        S.FAILED,
        "upstream_job_lost",
        C,
    )
    assert queued["cancel"] == [str(task.pk)]


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("policy", "charged"),
    [
        ({"failure_charge_percent": "50"}, C // 2),
        ({"failure_charge_percent": "lots"}, 0),
        ({"failure_charge_percent": 900}, C),
        ("not a dict", 0),
    ],
)
def test_malformed_billing_policies_still_settle(funded: Any, policy: Any, charged: int) -> None:
    AIModel.objects.filter(slug="sandbox-image").update(billing_policy=policy)

    task = run_to_end(submit(funded(10), sandbox_outcome="fail"))

    assert (task.status, task.charged_micro, task.refunded_micro) == (
        S.FAILED,
        charged,
        C - charged,
    )


@pytest.mark.django_db(transaction=True)
def test_job_accepted_after_cancellation_is_cancelled_through_the_retried_task(
    funded: Any, queued: dict[str, list[Any]]
) -> None:
    user = funded(10)
    task = submit(user, sandbox_submit_delay_ms=1500, sandbox_latency_ms=60_000)
    outcome: list[bool] = []

    def send() -> None:
        try:
            outcome.append(services.task_send_upstream(task_id=task.pk))
        finally:
            connection.close()

    sender = threading.Thread(target=send)
    sender.start()
    time.sleep(0.5)  # the job exists upstream; the answer is still on its way

    services.task_cancel(task_id=task.pk)
    sender.join()

    assert outcome == [False]
    late = TaskEvent.objects.get(task=task, kind="late_upstream_acceptance")
    job_id = late.data["upstream_id"]
    # The cancel itself (the task had been sent: it asks by key) and the late acceptance both
    # queue a cancel; stopping a job twice is harmless
    assert queued["cancel_jobs"] == [None, job_id]
    task.refresh_from_db()
    assert task.late_upstream_id == job_id
    services.task_cancel_upstream(task_id=task.pk, upstream_id=job_id)
    assert (
        httpx.get(f"{settings.SANDBOX_URL}/v1/jobs/{job_id}", trust_env=False).json()["status"]
        == "cancelled"
    )
    assert billing_selectors.balance_for_user(user=user).available == 10 * C


@pytest.mark.django_db
def test_celery_submit_retries_temporary_errors_then_fails_and_refunds(
    funded: Any, settings: Any
) -> None:
    from tasks import tasks as celery_tasks

    settings.TASK_SUBMIT_MAX_ATTEMPTS = 3
    user = funded(10)
    task = submit(user, sandbox_submit="error")

    celery_tasks.submit.apply(args=[str(task.pk)])  # runs here; its retries run here too

    task.refresh_from_db()
    assert task.submit_attempts == 3
    assert (task.status, task.error_kind, task.charged_micro) == (S.FAILED, "infra", 0)
    assert billing_selectors.balance_for_user(user=user).available == 10 * C


@pytest.mark.django_db
def test_celery_submit_fails_permanent_errors_at_once(funded: Any) -> None:
    from tasks import tasks as celery_tasks

    task = submit(funded(10), sandbox_submit="invalid")

    celery_tasks.submit.apply(args=[str(task.pk)])

    task.refresh_from_db()
    assert (task.status, task.error_kind, task.submit_attempts) == (S.FAILED, "provider", 1)


@pytest.mark.django_db
def test_reference_file_changed_since_upload_rejects(funded: Any) -> None:
    user = funded(10)
    upload = services.upload_create(user=user, file=SimpleUploadedFile("a.wav", wav(2)))
    outcome = services.task_submit(
        user=user, model_slug="sandbox-audio-isolation", upload_ids=[str(upload.pk)]
    )
    from PIL import Image

    path = default_storage.path(upload.file.name)
    Image.new("RGB", (8, 8)).save(path, format="PNG")  # not the audio that was uploaded

    services.task_send_upstream(task_id=outcome.task.pk)

    task = Task.objects.get(pk=outcome.task.pk)
    assert (task.status, task.error_code, task.error_kind) == (S.REJECTED, "file_mismatch", "user")


@pytest.mark.django_db
def test_every_poll_is_on_the_timeline(funded: Any) -> None:
    task = submit(funded(10), sandbox_latency_ms=60_000)
    services.task_send_upstream(task_id=task.pk)

    services.task_refresh(task_id=task.pk)
    services.task_refresh(task_id=task.pk)

    polls = TaskEvent.objects.filter(task=task, kind="polled")
    assert [e.data["state"] for e in polls] == ["running", "running"]


@pytest.mark.django_db
def test_failed_tasks_are_not_marked_expired(funded: Any) -> None:
    task = run_to_end(submit(funded(10), sandbox_outcome="fail"))
    Task.objects.filter(pk=task.pk).update(expires_at=timezone.now())

    assert services.results_expire_due() == 0
    task.refresh_from_db()
    assert task.results_expired_at is None


@pytest.mark.django_db
def test_overlong_webhook_ids_are_refused_not_truncated() -> None:
    from tasks.models import CallbackDelivery

    body = '{"type": "job.updated", "data": {"id": "job_x", "status": "running"}}'

    response = signed_callback(body, msg_id="m" * 300)

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_callback"
    assert not CallbackDelivery.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize(
    "raw",
    [
        r'{"model": "\ud800"}',
        r'{"model": "sandbox-image", "prompt": "a \udfff lighthouse"}',
        r'{"model": "sandbox-image", "params": {"\ud800": 1}}',
        r'{"model": "sandbox-image", "upload_ids": ["\ud83d"]}',
    ],
)
def test_unpaired_surrogates_in_json_are_400_not_500(funded: Any, api_for: Any, raw: str) -> None:
    # Valid UTF-8 on the wire, valid JSON, but text no database or log can encode.
    user = funded(10)

    response = api_for(user).post("/api/v1/tasks/", raw, content_type="application/json")

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "malformed_request"
    assert Task.objects.count() == 0
    assert billing_selectors.balance_for_user(user=user).held == 0


@pytest.mark.django_db
def test_signed_callback_with_an_unpaired_surrogate_in_the_job_id_is_400() -> None:
    from tasks.models import CallbackDelivery

    body = r'{"type": "job.updated", "data": {"id": "job_\ud800", "status": "succeeded"}}'

    response = signed_callback(body)

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_callback"
    assert CallbackDelivery.objects.count() == 0


@pytest.mark.django_db
def test_signed_callback_with_an_unpaired_surrogate_elsewhere_is_stored_readably() -> None:
    from tasks.models import CallbackDelivery

    body = (
        r'{"type": "job.updated", "data": {"id": "job_x", "status": "running", "note": "\ud800"}}'
    )

    response = signed_callback(body)

    assert response.status_code == 200
    stored = CallbackDelivery.objects.get()
    assert stored.payload["data"]["note"] == "\ufffd"
    assert stored.upstream_id == "job_x"


def _result_files(task: Task) -> list[str]:
    root = Path(settings.MEDIA_ROOT) / "results" / str(task.pk)
    return sorted(str(p) for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.mark.django_db(transaction=True)
def test_a_success_that_fails_midway_leaves_nothing_half_done(
    funded: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a finished upstream job, and a failure inside the outcome's transaction (after the
    # conditional UPDATE and the capture, at the notification)
    from billing.models import Hold, LedgerTransaction
    from notifications.models import Notification

    user = funded(10)
    task = submit(user)
    services.task_send_upstream(task_id=task.pk)
    transactions = LedgerTransaction.objects.count()

    def unavailable(**kwargs: Any) -> None:
        raise RuntimeError("notifications are down")

    import tasks.services.common as common

    working = common.notification_create
    monkeypatch.setattr(common, "notification_create", unavailable)

    # When the status check tries to finish it
    with pytest.raises(RuntimeError):
        services.task_refresh(task_id=task.pk)

    # Then nothing of the outcome remains: no status change, no capture, no event, no files
    task.refresh_from_db()
    assert task.status == S.GENERATING
    assert (task.charged_micro, task.results) == (0, [])
    assert Hold.objects.get(subject_id=str(task.pk)).status == Hold.Status.OPEN
    assert LedgerTransaction.objects.count() == transactions
    assert not TaskEvent.objects.filter(
        task=task, kind__in=["succeeded", "credits_captured"]
    ).exists()
    assert not Notification.objects.filter(subject_id=str(task.pk)).exists()
    assert _result_files(task) == []

    # And the next check finishes it, once
    monkeypatch.setattr(common, "notification_create", working)
    services.task_refresh(task_id=task.pk)
    task.refresh_from_db()
    assert task.status == S.SUCCESS
    assert task.charged_micro == task.price_micro
    assert Notification.objects.filter(subject_id=str(task.pk)).count() == 1
    assert len(_result_files(task)) == len(task.results) == 1


@pytest.mark.django_db(transaction=True)
def test_a_cancel_that_fails_midway_changes_nothing(
    funded: Any, monkeypatch: pytest.MonkeyPatch, queued: dict[str, list[Any]]
) -> None:
    from billing import services as billing
    from billing.models import Hold

    user = funded(10)
    task = submit(user)
    services.task_send_upstream(task_id=task.pk)

    def unavailable(**kwargs: Any) -> None:
        raise RuntimeError("ledger is down")

    working = billing.hold_release
    monkeypatch.setattr(billing, "hold_release", unavailable)

    with pytest.raises(RuntimeError):
        services.task_cancel(task_id=task.pk, actor=user)

    task.refresh_from_db()
    assert task.status == S.GENERATING
    assert Hold.objects.get(subject_id=str(task.pk)).status == Hold.Status.OPEN
    assert not TaskEvent.objects.filter(task=task, kind="cancelled").exists()
    assert queued["cancel"] == []  # nothing asked of the upstream for a cancel that did not happen

    monkeypatch.setattr(billing, "hold_release", working)
    services.task_cancel(task_id=task.pk, actor=user)
    task.refresh_from_db()
    assert task.status == S.CANCELLED
    assert Hold.objects.get(subject_id=str(task.pk)).status == Hold.Status.RELEASED
    assert queued["cancel"] == [str(task.pk)]


@pytest.mark.django_db
def test_upstream_cancel_is_retried_on_temporary_errors(
    funded: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks import tasks as celery_tasks
    from tasks.providers.base import ProviderError
    from tasks.providers.sandbox import SandboxProvider

    user = funded(10)
    task = submit(user, sandbox_latency_ms=60_000)
    services.task_send_upstream(task_id=task.pk)
    services.task_cancel(task_id=task.pk, actor=user)
    task.refresh_from_db()
    calls: list[str] = []
    real_cancel = SandboxProvider.cancel

    def flaky(self: SandboxProvider, upstream_id: str) -> None:
        calls.append(upstream_id)
        if len(calls) < 3:
            raise ProviderError("upstream busy", retryable=True, code="upstream_unavailable")
        real_cancel(self, upstream_id)

    monkeypatch.setattr(SandboxProvider, "cancel", flaky)

    celery_tasks.cancel_upstream.apply(args=[str(task.pk)])  # its retries run here too

    assert calls == [task.upstream_id] * 3
    assert TaskEvent.objects.filter(task=task, kind="upstream_cancel_requested").count() == 1
    job = httpx.get(f"{settings.SANDBOX_URL}/v1/jobs/{task.upstream_id}", trust_env=False).json()
    assert job["status"] == "cancelled"


def test_submit_retry_delays_back_off_exponentially_with_full_jitter() -> None:
    import random

    from tasks.services.upstream import retry_delay

    random.seed(7)
    for attempt in range(12):
        cap = min(60.0, 2.0 * 2**attempt)
        samples = [retry_delay(attempt) for _ in range(300)]
        assert all(0 <= s <= cap for s in samples)
        assert max(samples) > 0.8 * cap  # spread over the whole window (jitter), not fixed
        assert len(set(samples)) > 250


def test_poll_interval_backs_off_after_ten_polls_up_to_a_minute() -> None:
    import random

    from tasks.services.refresh import _next_poll_delay

    random.seed(7)

    def delays(poll_count: int) -> list[float]:
        task = Task(poll_interval_seconds=2, poll_count=poll_count)
        return [_next_poll_delay(task) for _ in range(200)]

    for count in range(11):  # the model's interval, ±10 %
        assert all(1.8 <= d <= 2.2 for d in delays(count))
    assert all(2.7 <= d <= 3.3 for d in delays(11))  # ×1.5
    assert all(4.05 <= d <= 4.95 for d in delays(12))  # ×1.5²
    assert all(54 <= d <= 66 for d in delays(40))  # capped at a minute
    assert len(set(delays(0))) > 150  # jittered


@pytest.mark.django_db
def test_a_task_whose_submissions_never_get_an_answer_stops_being_sent(
    funded: Any, sandbox: Any, settings: Any
) -> None:
    # Given a task whose every submission so far died without an answer (a poison task that
    # kills the worker): twice the retry budget of attempts, none recorded as an error.
    from tasks.services.upstream import submit_attempts_limit

    settings.TASK_RESUBMIT_AFTER = 0
    user = funded(10)
    task = submit(user)
    Task.objects.filter(pk=task.pk).update(
        submit_attempts=submit_attempts_limit(),
        created_at=timezone.now() - timedelta(minutes=5),
        last_submit_at=timezone.now() - timedelta(minutes=5),
    )
    jobs_before = httpx.get(f"{sandbox.base_url}/v1/stats", trust_env=False).json()

    # When the reconciler and a redelivered message look at it
    resubmits = services.waiting_due_for_resubmit()
    flagged_by_the_reconciler = TaskEvent.objects.filter(task=task, kind="submit_stuck").exists()
    sent = [services.task_send_upstream(task_id=task.pk) for _ in range(2)]

    # Then it is not sent again, not refunded (its job may exist upstream), and flagged once
    jobs_after = httpx.get(f"{sandbox.base_url}/v1/stats", trust_env=False).json()
    assert str(task.pk) not in resubmits
    assert flagged_by_the_reconciler  # even if no message for it ever comes back
    assert sent == [False, False]
    assert jobs_after["jobs_created"] == jobs_before["jobs_created"]
    task.refresh_from_db()
    assert task.status == S.WAITING
    assert billing_selectors.balance_for_user(user=user).held == task.price_micro
    stuck = TaskEvent.objects.filter(task=task, kind="submit_stuck")
    assert stuck.count() == 1
    assert "cancel" in stuck.get().message

    # And support (or the user) can still cancel it, refunded
    services.task_cancel(task_id=task.pk, actor=user)
    assert billing_selectors.balance_for_user(user=user).available == 10 * C


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.django_db
@pytest.mark.parametrize("depth", [65, 400, 2000, 100_000])
def test_deeply_nested_json_is_400_not_500(funded: Any, api_for: Any, depth: int) -> None:
    user = funded(10)
    client = api_for(user)
    raw = '{"model": "sandbox-image", "prompt": "x", "params": {"a": ' + _nested(depth) + "}}"

    as_json = client.post("/api/v1/tasks/", raw, content_type="application/json")
    as_form = client.post(
        "/api/v1/tasks/",
        {"model": "sandbox-image", "prompt": "x", "params": '{"a": ' + _nested(depth) + "}"},
        format="multipart",
    )

    assert as_json.status_code == 400
    assert as_json.json()["error"]["code"] == "malformed_request"
    assert as_form.status_code == 400
    assert "params" in as_form.json()["error"]["fields"]
    assert Task.objects.count() == 0
    assert billing_selectors.balance_for_user(user=user).held == 0


@pytest.mark.django_db
def test_json_at_the_depth_limit_is_still_read(funded: Any, api_for: Any) -> None:
    # Depth 64 exactly (json_depth): the body, the params object, then 63 nested lists.
    raw = '{"model": "sandbox-image", "prompt": "x", "params": {"a": ' + _nested(63) + "}}"

    response = api_for(funded(10)).post("/api/v1/tasks/", raw, content_type="application/json")

    assert response.status_code == 400  # parsed, then refused by the model's schema
    assert response.json()["error"]["fields"] == {"params.a": ["Unknown parameter for this model."]}


@pytest.mark.django_db
@pytest.mark.parametrize("depth", [100, 5000])
def test_deeply_nested_signed_callback_is_400_not_500(depth: int) -> None:
    from tasks.models import CallbackDelivery

    body = '{"type": "job.updated", "data": {"id": "job_x", "status": "running", "x": '
    body += _nested(depth) + "}}"

    response = signed_callback(body)

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_callback"
    assert CallbackDelivery.objects.count() == 0


@pytest.mark.django_db
@pytest.mark.parametrize("claimed", [4, 2**40, None])
def test_partial_success_charge_uses_our_request_not_the_providers_claim(
    funded: Any, monkeypatch: pytest.MonkeyPatch, claimed: Any
) -> None:
    # Given a provider that reports a different (or absurd, or no) number of requested outputs
    from dataclasses import replace

    from tasks.providers.sandbox import SandboxProvider

    real = SandboxProvider.fetch_status

    def claims(self: SandboxProvider, upstream_id: str) -> Any:
        return replace(real(self, upstream_id), requested_outputs=claimed)

    monkeypatch.setattr(SandboxProvider, "fetch_status", claims)
    user = funded(10)

    one = run_to_end(submit(user, num_outputs=1))
    three = run_to_end(submit(user, num_outputs=3, sandbox_outcome="partial"))

    # Then the charge follows what the task asked for
    assert (one.status, one.charged_micro, one.outputs_requested) == (S.SUCCESS, C, 1)
    assert (three.status, len(three.results), three.outputs_requested) == (S.SUCCESS, 2, 3)
    assert three.charged_micro == 3 * C * 2 // 3


@pytest.mark.django_db
def test_a_submit_whose_answer_timed_out_is_retried_into_the_same_job(
    funded: Any, sandbox: Any, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a provider that creates the job but answers after our read timeout
    import httpx as httpx_module

    from tasks import tasks as celery_tasks
    from tasks.providers import http

    monkeypatch.setattr(http, "TIMEOUT", httpx_module.Timeout(0.3, connect=5.0))
    http.close_client()
    user = funded(10)
    before = httpx.get(f"{sandbox.base_url}/v1/stats", trust_env=False).json()["jobs_created"]
    task = submit(user, sandbox_submit_delay_ms=1500)

    # When the submission times out and is retried with the same idempotency key
    celery_tasks.submit.apply(args=[str(task.pk)])
    http.close_client()

    # Then the retry got the job the timed-out attempt created: one job, nothing refunded
    task.refresh_from_db()
    assert task.status == S.GENERATING
    assert task.submit_attempts >= 2
    errors = TaskEvent.objects.filter(task=task, kind="submit_error")
    assert [e.data["maybe_received"] for e in errors][:1] == [True]
    stats = httpx.get(f"{sandbox.base_url}/v1/stats", trust_env=False).json()
    assert stats["jobs_created"] == before + 1
    assert billing_selectors.balance_for_user(user=user).held == C


@pytest.mark.django_db
def test_a_submit_that_never_got_an_answer_is_refunded_once_the_provider_says_it_has_no_job(
    funded: Any, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a provider that, for every attempt, may have received the job but never answered
    from tasks import tasks as celery_tasks
    from tasks.providers.base import ProviderError
    from tasks.providers.sandbox import SandboxProvider

    settings.TASK_SUBMIT_MAX_ATTEMPTS = 2

    def unanswered(self: SandboxProvider, request: Any) -> Any:
        raise ProviderError(
            "ReadTimeout", retryable=True, code="upstream_unreachable", maybe_received=True
        )

    monkeypatch.setattr(SandboxProvider, "submit", unanswered)
    user = funded(10)
    task = submit(user)

    # When its retries run out
    celery_tasks.submit.apply(args=[str(task.pk)])

    # Then the provider was asked for the job by its key, said it has none, and only then was
    # the task refunded
    task.refresh_from_db()
    assert (task.status, task.error_kind, task.refunded_micro) == (S.FAILED, "infra", C)
    assert task.submit_ambiguous_at is not None
    assert TaskEvent.objects.filter(task=task, kind="upstream_job_absent").count() == 1
    assert billing_selectors.balance_for_user(user=user).available == 10 * C


@pytest.mark.django_db
def test_a_submit_that_never_got_an_answer_is_held_while_the_provider_cannot_tell(
    funded: Any, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a provider that never answers a submit, nor the question "do you have this job?"
    from tasks import tasks as celery_tasks
    from tasks.providers.base import ProviderError
    from tasks.providers.sandbox import SandboxProvider

    settings.TASK_SUBMIT_MAX_ATTEMPTS = 2
    working = SandboxProvider.submit

    def unanswered(self: SandboxProvider, *args: Any) -> Any:
        raise ProviderError(
            "ReadTimeout", retryable=True, code="upstream_unreachable", maybe_received=True
        )

    monkeypatch.setattr(SandboxProvider, "submit", unanswered)
    monkeypatch.setattr(SandboxProvider, "find_job", unanswered)
    user = funded(10)
    task = submit(user)

    celery_tasks.submit.apply(args=[str(task.pk)])

    # Then it is neither failed nor refunded (its job may exist and bill), and is flagged
    task.refresh_from_db()
    assert (task.status, task.submit_attempts) == (S.WAITING, 2)
    assert task.submit_unconfirmed_at is not None
    assert billing_selectors.balance_for_user(user=user).held == C
    assert TaskEvent.objects.filter(task=task, kind="submit_error").count() == 2
    assert TaskEvent.objects.filter(task=task, kind="submit_unconfirmed").count() == 1
    # ... and once the provider answers, the reconciler's resubmit (same key) finishes it
    monkeypatch.setattr(SandboxProvider, "submit", working)
    task = run_to_end(task)
    assert (task.status, task.charged_micro) == (S.SUCCESS, C)


@pytest.mark.django_db
def test_a_submit_that_never_reached_the_provider_is_refunded(funded: Any, settings: Any) -> None:
    from tasks import tasks as celery_tasks

    settings.TASK_SUBMIT_MAX_ATTEMPTS = 2
    settings.SANDBOX_URL = "http://127.0.0.1:9"  # nothing listens: connection refused
    user = funded(10)
    task = submit(user)

    celery_tasks.submit.apply(args=[str(task.pk)])

    task.refresh_from_db()
    assert (task.status, task.error_kind, task.refunded_micro) == (S.FAILED, "infra", C)
    errors = TaskEvent.objects.filter(task=task, kind="submit_error")
    assert [e.data["maybe_received"] for e in errors] == [False, False]
    assert billing_selectors.balance_for_user(user=user).available == 10 * C


@pytest.mark.django_db
@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_signed_callback_with_nan_or_infinity_is_400_not_500(constant: str) -> None:
    # Found by tasks/tests/test_fuzz.py: Python's json reads them, jsonb refuses them.
    from tasks.models import CallbackDelivery

    body = '{"type": "job.updated", "data": {"id": "job_x", "status": "queued", "error": '
    body += constant + "}}"

    response = signed_callback(body)

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_callback"
    assert not CallbackDelivery.objects.exists()
