"""The money-safe edges of the lifecycle (issue 13): integral floats in the output count, free
models, empty callback job ids, status checks that keep failing past the timeout, poison outputs,
stale result URLs from delayed callbacks, and submissions the provider answered unclearly.
Against the real sandbox process and PostgreSQL."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from django.conf import settings
from django.utils import timezone

from billing import selectors as billing_selectors
from billing.invariants import run_checks
from billing.models import Hold
from tasks import services
from tasks import tasks as celery_tasks
from tasks.models import AIModel, CallbackDelivery, Task, TaskEvent
from tasks.providers.base import JobState, JobStatus, Output, ProviderError
from tasks.providers.sandbox import SandboxProvider
from tasks.services import refresh
from tasks.tests.lifecycle import C, run_to_end, signed_callback, stats, submit

S = Task.Status
pytestmark = pytest.mark.usefixtures("sandbox", "catalog", "queued", "submit_path")


def events(task: Task, kind: str) -> int:
    return TaskEvent.objects.filter(task=task, kind=kind).count()


# --- 1. integral floats in num_outputs --------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.usefixtures("ledger_ok")
def test_an_integral_float_output_count_is_stored_as_an_integer_and_charged_its_share(
    funded: Any,
) -> None:
    # Given a request for 3.0 images (JSON Schema counts 3.0 as an integer)
    user = funded(10)

    # When it is submitted and the provider delivers 2 of the 3
    task = submit(user, num_outputs=3.0, sandbox_outcome="partial")
    assert task.params["num_outputs"] == 3
    assert type(task.params["num_outputs"]) is int
    assert task.price_micro == 3 * C
    task = run_to_end(task)

    # Then it is charged for 2 of 3 outputs, not the full price
    assert (task.status, len(task.results)) == (S.SUCCESS, 2)
    assert task.charged_micro == 2 * C
    assert task.outputs_requested == 3
    assert billing_selectors.balance_for_user(user=user).available == 8 * C


@pytest.mark.django_db
def test_the_api_stores_an_integral_float_output_count_as_an_integer(
    funded: Any, api_for: Any
) -> None:
    response = api_for(funded(10)).post(
        "/api/v1/tasks/",
        {"model": "sandbox-image", "prompt": "a fox", "params": {"num_outputs": 2.0}},
        format="json",
    )

    assert response.status_code == 202, response.json()
    assert response.json()["params"]["num_outputs"] == 2
    assert response.json()["credits"]["reserved_micro"] == 2 * C


@pytest.mark.django_db
def test_ledger_check_recomputes_a_success_charge_from_the_task_params(funded: Any) -> None:
    # Given a partial success settled correctly (2 of 3 outputs, 2 credits)
    task = run_to_end(submit(funded(10), num_outputs=3, sandbox_outcome="partial"))
    assert task.charged_micro == 2 * C
    assert run_checks() == []

    # When the stored basis and the charge are both wrong, in agreement with each other (what a
    # count read the wrong way, e.g. 3.0 taken for 1, would have written)
    Task.objects.filter(pk=task.pk).update(
        outputs_requested=2, charged_micro=3 * C, refunded_micro=0, params={"num_outputs": 3.0}
    )

    # Then ledger_check names the breach: it recomputes the charge from the params and policy
    breaches = [b for b in run_checks() if b.check == "4.task_success_charge"]
    assert len(breaches) == 1
    assert str(task.pk) in breaches[0].detail
    assert "call for 2000000" in breaches[0].detail


# --- 8. free models ---------------------------------------------------------------------------


@pytest.fixture
def free_model(catalog: None) -> AIModel:
    model = AIModel.objects.get(slug="sandbox-image")
    model.pk, model.slug, model.price_micro = None, "sandbox-free", 0
    model.save()
    return model


@pytest.mark.django_db
@pytest.mark.usefixtures("ledger_ok")
def test_a_free_model_runs_without_a_hold_even_with_no_credits(
    funded: Any, free_model: AIModel, api_for: Any
) -> None:
    # Given a user with no credits at all
    user = funded(0)

    # When they submit a free model through the API
    response = api_for(user).post(
        "/api/v1/tasks/", {"model": "sandbox-free", "prompt": "a fox"}, format="json"
    )

    # Then it is accepted with nothing held, runs, and succeeds charging nothing
    assert response.status_code == 202, response.json()
    task = Task.objects.get(pk=response.json()["id"])
    assert (task.status, task.price_micro, task.reserved_micro) == (S.WAITING, 0, 0)
    assert not Hold.objects.filter(subject_id=str(task.pk)).exists()
    task = run_to_end(task)
    assert (task.status, task.charged_micro, task.refunded_micro) == (S.SUCCESS, 0, 0)
    assert len(task.results) == 1


@pytest.mark.django_db
@pytest.mark.usefixtures("ledger_ok")
def test_a_free_task_can_fail_and_be_cancelled(funded: Any, free_model: AIModel) -> None:
    user = funded(0)
    failed = run_to_end(submit(user, "sandbox-free", sandbox_outcome="fail"))
    cancelled = services.task_cancel(task_id=submit(user, "sandbox-free").pk, actor=user)

    assert (failed.status, failed.charged_micro) == (S.FAILED, 0)
    assert (cancelled.status, cancelled.charged_micro) == (S.CANCELLED, 0)


@pytest.mark.django_db
def test_ledger_check_refuses_a_hold_on_a_free_task(funded: Any, free_model: AIModel) -> None:
    from billing import services as billing

    user = funded(10)
    task = submit(user, "sandbox-free")
    billing.hold_create(user=user, amount=C, subject_type=services.SUBJECT, subject_id=str(task.pk))

    assert [b.check for b in run_checks()] == ["4.task_billing"]


# --- 9. callbacks with an empty job id ------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.usefixtures("ledger_ok")
def test_a_signed_callback_with_an_empty_job_id_is_refused(funded: Any) -> None:
    # Given a task not yet accepted upstream (its upstream id is still empty)
    task = submit(funded(10))
    assert task.upstream_id == ""

    # When a correctly signed callback names an empty (or blank) job id
    for job_id in ("", "  "):
        body = json.dumps(
            {"type": "job.updated", "data": {"id": job_id, "status": "failed", "error": {}}}
        )
        response = signed_callback(body, msg_id=f"msg_empty_{len(job_id)}")

        # Then it is refused, stored nowhere, attached to nothing
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "invalid_callback"
    assert not CallbackDelivery.objects.exists()
    task.refresh_from_db()
    assert task.status == S.WAITING


@pytest.mark.django_db
@pytest.mark.usefixtures("ledger_ok")
def test_a_stored_delivery_with_an_empty_job_id_never_attaches(funded: Any) -> None:
    # A row stored before adapters refused empty ids must not match a task without one
    task = submit(funded(10))
    delivery = CallbackDelivery.objects.create(
        provider="sandbox",
        event_id="old",
        upstream_id="",
        payload={"data": {"id": "", "status": "failed"}},
    )

    outcome = services.callback_process(delivery_id=delivery.pk)

    assert outcome == "deferred"
    task.refresh_from_db()
    assert task.status == S.WAITING
    assert events(task, "callback") == 0


# --- 3. overdue tasks whose status checks keep failing --------------------------------------


def _overdue(task: Task) -> None:
    Task.objects.filter(pk=task.pk).update(
        submitted_at=timezone.now() - timedelta(seconds=task.timeout_seconds + 1)
    )


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("ledger_ok")
def test_an_overdue_task_whose_status_checks_fail_is_flagged_then_failed_after_the_grace(
    funded: Any, queued: dict[str, list[Any]]
) -> None:
    # Given a running task past its timeout whose status checks fail (e.g. a rotated key), on a
    # model that charges half for failures
    AIModel.objects.filter(slug="sandbox-image").update(
        billing_policy={"failure_charge_percent": 50}
    )
    user = funded(10)
    task = submit(user, sandbox_latency_ms=600_000, sandbox_status="error")
    services.task_send_upstream(task_id=task.pk)
    _overdue(task)

    # When it is checked, twice
    services.task_refresh(task_id=task.pk)
    services.task_refresh(task_id=task.pk)

    # Then it is flagged for support once, still running, its credits held
    task.refresh_from_db()
    assert task.status == S.GENERATING
    assert task.timeout_unconfirmed_at is not None
    assert events(task, "timeout_unconfirmed") == 1
    assert billing_selectors.balance_for_user(user=user).held == C
    assert Task.objects.filter(timeout_unconfirmed_at__isnull=False).count() == 1

    # And once the grace has passed, it fails as the provider's failure: refunded in full
    # (whatever the failure policy), its capacity slot given back, the upstream asked to stop
    Task.objects.filter(pk=task.pk).update(
        timeout_unconfirmed_at=timezone.now()
        - timedelta(seconds=settings.TASK_UNCONFIRMED_GRACE + 1)
    )
    services.task_refresh(task_id=task.pk)
    task.refresh_from_db()
    assert (task.status, task.error_code, task.error_kind) == (
        S.FAILED,
        "upstream_unconfirmed",
        "provider",
    )
    assert (task.charged_micro, task.refunded_micro) == (0, C)
    assert billing_selectors.balance_for_user(user=user).available == 10 * C
    assert queued["cancel"] == [str(task.pk)]
    assert task.cancel_requested_at is not None


@pytest.mark.django_db
@pytest.mark.usefixtures("ledger_ok")
def test_a_result_after_an_unconfirmed_failure_is_only_recorded(funded: Any) -> None:
    # Given a task failed as unconfirmed (its provider silent for a day past the timeout)
    user = funded(10)
    task = submit(user, sandbox_latency_ms=600_000, sandbox_status="error")
    services.task_send_upstream(task_id=task.pk)
    _overdue(task)
    services.task_refresh(task_id=task.pk)
    Task.objects.filter(pk=task.pk).update(
        timeout_unconfirmed_at=timezone.now() - timedelta(days=2)
    )
    services.task_refresh(task_id=task.pk)
    task.refresh_from_db()
    assert task.error_code == "upstream_unconfirmed"

    # When its result arrives after all
    output = {"url": "http://127.0.0.1:9/x.png", "mime": "image/png"}
    body = json.dumps(
        {
            "type": "job.updated",
            "data": {"id": task.upstream_id, "status": "succeeded", "outputs": [output]},
        }
    )
    assert signed_callback(body, msg_id="msg_late").status_code in (200, 202)
    delivery = CallbackDelivery.objects.get(event_id="msg_late")
    services.callback_process(delivery_id=delivery.pk)

    # Then it is on the timeline, and nothing else changes
    task.refresh_from_db()
    assert (task.status, task.charged_micro, task.results) == (S.FAILED, 0, [])
    assert events(task, "late_result") == 1
    assert billing_selectors.balance_for_user(user=user).available == 10 * C


@pytest.mark.django_db
@pytest.mark.usefixtures("ledger_ok")
def test_an_overdue_task_within_the_grace_is_not_refunded(funded: Any) -> None:
    task = submit(funded(10), sandbox_latency_ms=600_000, sandbox_status="error")
    services.task_send_upstream(task_id=task.pk)
    _overdue(task)
    services.task_refresh(task_id=task.pk)
    Task.objects.filter(pk=task.pk).update(
        timeout_unconfirmed_at=timezone.now()
        - timedelta(seconds=settings.TASK_UNCONFIRMED_GRACE - 60)
    )

    services.task_refresh(task_id=task.pk)

    task.refresh_from_db()
    assert task.status == S.GENERATING


# --- 4. poison outputs and time limits --------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.usefixtures("ledger_ok")
def test_an_output_that_keeps_killing_its_worker_fails_the_task_after_the_cap(
    funded: Any, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a finished job whose output crashes whoever processes it
    settings.TASK_OUTPUT_MAX_ATTEMPTS = 3
    user = funded(10)
    task = submit(user)
    services.task_send_upstream(task_id=task.pk)

    def poison(*args: Any, **kwargs: Any) -> Any:
        raise MemoryError("decoder blew up")

    monkeypatch.setattr(refresh, "inspect_media", poison)

    # When it is checked again and again (each attempt dies)
    for _ in range(settings.TASK_OUTPUT_MAX_ATTEMPTS):
        with pytest.raises(MemoryError):
            services.task_refresh(task_id=task.pk)
    task.refresh_from_db()
    assert (task.status, task.output_attempts) == (S.GENERATING, 3)

    # Then the next check stops: the task fails, refunded, without touching the output again
    services.task_refresh(task_id=task.pk)
    task.refresh_from_db()
    assert (task.status, task.error_code, task.error_kind) == (
        S.FAILED,
        "result_unprocessable",
        "infra",
    )
    assert task.refunded_micro == C
    assert billing_selectors.balance_for_user(user=user).available == 10 * C


@pytest.mark.django_db
@pytest.mark.usefixtures("ledger_ok")
def test_outputs_being_stored_by_a_live_worker_are_not_stored_twice(funded: Any) -> None:
    # Given another worker holding the lease on storing this task's outputs
    task = submit(funded(10))
    services.task_send_upstream(task_id=task.pk)
    Task.objects.filter(pk=task.pk).update(
        output_lease_until=timezone.now() + timedelta(seconds=60)
    )

    # When a poll finds the job finished
    services.task_refresh(task_id=task.pk)

    # Then it leaves the work to that worker
    task.refresh_from_db()
    assert (task.status, task.results) == (S.GENERATING, [])
    assert events(task, "outputs_busy") == 1

    # And once that lease ran out (the worker died), the next check finishes the task
    Task.objects.filter(pk=task.pk).update(output_lease_until=timezone.now() - timedelta(seconds=1))
    services.task_refresh(task_id=task.pk)
    task.refresh_from_db()
    assert task.status == S.SUCCESS


@pytest.mark.django_db
@pytest.mark.usefixtures("ledger_ok")
def test_download_errors_we_handle_do_not_count_against_the_cap(
    funded: Any, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.TASK_OUTPUT_MAX_ATTEMPTS = 1
    task = submit(funded(10))
    services.task_send_upstream(task_id=task.pk)
    working = SandboxProvider.download

    def flaky(self: SandboxProvider, output: Output, **kwargs: Any) -> bytes:
        raise ProviderError("reset", retryable=True, code="upstream_unreachable")

    monkeypatch.setattr(SandboxProvider, "download", flaky)
    for _ in range(3):
        services.task_refresh(task_id=task.pk)
    task.refresh_from_db()
    assert (task.status, task.output_attempts, task.output_lease_until) == (
        S.GENERATING,
        0,
        None,
    )

    monkeypatch.setattr(SandboxProvider, "download", working)
    services.task_refresh(task_id=task.pk)
    task.refresh_from_db()
    assert task.status == S.SUCCESS


def test_every_celery_task_has_time_limits_that_fit_its_leases() -> None:
    from celery import current_app

    from tasks.services.callbacks import CALLBACK_LEASE_S

    current_app.loader.import_default_modules()  # every app's tasks module, as a worker does
    ours = {name: t for name, t in current_app.tasks.items() if not name.startswith("celery.")}
    assert {"tasks.refresh", "billing.purge_idempotency_keys"} <= set(ours)
    for name, task in ours.items():
        assert task.soft_time_limit, name
        assert task.time_limit, name
        assert task.time_limit > task.soft_time_limit, name
    # A download may run inside either; it must be stopped before its lease can be taken over
    for name in ("tasks.refresh", "tasks.process_callback"):
        assert ours[name].time_limit < min(refresh.OUTPUT_LEASE_S, CALLBACK_LEASE_S), name
        assert ours[name].soft_time_limit > refresh.DOWNLOAD_BUDGET_S, name


def test_a_slow_download_is_stopped_at_its_budget(sandbox: Any) -> None:
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Trickle(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(1000):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.01)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        provider = SandboxProvider(sandbox.base_url, sandbox.secret)
        output = Output(url=f"http://127.0.0.1:{server.server_port}/slow", mime="image/png")
        started = time.monotonic()
        with pytest.raises(ProviderError) as caught:
            provider.download(output, max_bytes=10_000, timeout_s=0.3)
        assert caught.value.retryable
        assert caught.value.code == "download_too_slow"
        assert time.monotonic() - started < 5
    finally:
        server.shutdown()


# --- 5. stale result URLs from a delayed callback -------------------------------------------


@pytest.mark.django_db
@pytest.mark.usefixtures("ledger_ok")
def test_an_expired_url_from_a_callback_is_refreshed_from_the_provider(funded: Any) -> None:
    # Given a finished job, and a delayed callback whose result URL has expired (404)
    user = funded(10)
    task = submit(user)
    services.task_send_upstream(task_id=task.pk)
    task.refresh_from_db()
    stale = JobStatus(
        upstream_id=task.upstream_id,
        state=JobState.SUCCEEDED,
        outputs=(Output(url=f"{settings.SANDBOX_URL}/v1/files/expired/0", mime="image/png"),),
    )

    # When that callback is applied
    services.task_refresh(task_id=task.pk, reason="callback", status=stale)

    # Then the provider was asked for the job's current status, and its fresh URLs delivered
    task.refresh_from_db()
    assert (task.status, task.charged_micro, len(task.results)) == (S.SUCCESS, C, 1)
    assert events(task, "download_failed") == 1


@pytest.mark.django_db
@pytest.mark.usefixtures("ledger_ok")
def test_a_permanent_download_error_on_fresh_urls_fails_and_refunds(
    funded: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = submit(funded(10))
    services.task_send_upstream(task_id=task.pk)

    def gone(self: SandboxProvider, output: Output, **kwargs: Any) -> bytes:
        raise ProviderError("HTTP 404", retryable=False, code="upstream_refused", status=404)

    monkeypatch.setattr(SandboxProvider, "download", gone)
    services.task_refresh(task_id=task.pk)

    task.refresh_from_db()
    assert (task.status, task.refunded_micro) == (S.FAILED, C)


# --- 6. submissions the provider answered unclearly -------------------------------------------


@pytest.mark.django_db
@pytest.mark.usefixtures("ledger_ok")
def test_a_job_created_behind_5xx_answers_is_found_by_its_key_not_refunded(
    funded: Any, settings: Any, sandbox: Any
) -> None:
    # Given a provider that creates the job and then answers 503 to every attempt
    settings.TASK_SUBMIT_MAX_ATTEMPTS = 2
    user = funded(10)
    task = submit(user, sandbox_submit="error_after_create")

    # When the submission's retries run out
    celery_tasks.submit.apply(args=[str(task.pk)])

    # Then the provider was asked for the job by the task's id, and the task tracks it
    task.refresh_from_db()
    assert task.status == S.GENERATING
    assert task.upstream_id.startswith("job_")
    assert task.submit_ambiguous_at is not None
    assert stats(sandbox)["by_key"][str(task.pk)] == 1  # one job, however many attempts
    services.task_refresh(task_id=task.pk)
    task.refresh_from_db()
    assert (task.status, task.charged_micro) == (S.SUCCESS, C)


@pytest.mark.django_db
@pytest.mark.usefixtures("ledger_ok")
def test_a_409_in_progress_is_not_refunded_while_the_job_exists(funded: Any) -> None:
    # Given a provider answering 409 "in progress" (an earlier attempt is still being handled)
    user = funded(10)
    task = submit(user, sandbox_submit="in_progress")

    # When the submitter gets that non-retryable answer
    celery_tasks.submit.apply(args=[str(task.pk)])

    # Then the job is found by its key and tracked; nothing was refunded
    task.refresh_from_db()
    assert task.status == S.GENERATING
    assert billing_selectors.balance_for_user(user=user).held == C
    assert events(task, "submitted") == 1


@pytest.mark.django_db
@pytest.mark.usefixtures("ledger_ok")
def test_5xx_answers_with_no_job_behind_them_are_refunded_after_asking(
    funded: Any, settings: Any
) -> None:
    settings.TASK_SUBMIT_MAX_ATTEMPTS = 2
    user = funded(10)
    task = submit(user, sandbox_submit="error")  # 503, and no job is created

    celery_tasks.submit.apply(args=[str(task.pk)])

    task.refresh_from_db()
    assert (task.status, task.error_kind, task.refunded_micro) == (S.FAILED, "infra", C)
    assert events(task, "upstream_job_absent") == 1
    assert billing_selectors.balance_for_user(user=user).available == 10 * C


@pytest.mark.django_db
@pytest.mark.usefixtures("ledger_ok")
def test_a_plain_refusal_is_refunded_without_asking(
    funded: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(self: SandboxProvider, key: str) -> Any:
        raise AssertionError("a 400 refusal created nothing: no need to ask")

    monkeypatch.setattr(SandboxProvider, "find_job", never)
    task = submit(funded(10), sandbox_submit="invalid")

    celery_tasks.submit.apply(args=[str(task.pk)])

    task.refresh_from_db()
    assert (task.status, task.error_kind) == (S.FAILED, "provider")


def test_the_sandbox_finds_a_job_by_its_idempotency_key(sandbox: Any) -> None:
    from tasks.providers.base import SubmitRequest

    provider = SandboxProvider(sandbox.base_url, sandbox.secret)
    created = provider.submit(
        SubmitRequest(
            idempotency_key="key-find-1",
            upstream_model="sandbox/image-v1",
            prompt="x",
            params={},
        )
    )

    found = provider.find_job("key-find-1")

    assert found is not None
    assert found.upstream_id == created.upstream_id
    assert provider.find_job("key-never-used") is None


@pytest.mark.django_db
def test_support_finds_flagged_tasks_in_the_admin(funded: Any, staff: Any, client: Any) -> None:
    # Given one task past its timeout, unconfirmed, and one running normally
    user = funded(10)
    flagged = submit(user, sandbox_latency_ms=600_000, sandbox_status="error")
    services.task_send_upstream(task_id=flagged.pk)
    _overdue(flagged)
    services.task_refresh(task_id=flagged.pk)
    normal = submit(user, sandbox_latency_ms=600_000)
    services.task_send_upstream(task_id=normal.pk)
    client.force_login(staff)

    # When support filters the task list by flag
    for value in ("any", "timeout_unconfirmed"):
        page = client.get("/admin/tasks/task/", {"flagged": value})

        # Then only the flagged task is listed
        assert page.status_code == 200
        assert str(flagged.pk) in page.content.decode()
        assert str(normal.pk) not in page.content.decode()
    page = client.get("/admin/tasks/task/", {"flagged": "submit_stuck"})
    assert str(flagged.pk) not in page.content.decode()


@pytest.mark.django_db
@pytest.mark.usefixtures("ledger_ok")
def test_a_file_gone_after_an_ambiguous_attempt_does_not_refund_the_job_it_created(
    funded: Any, sandbox: Any
) -> None:
    from django.core.files.storage import default_storage
    from django.core.files.uploadedfile import SimpleUploadedFile

    from tasks.providers.base import SubmitRequest
    from tasks.tests.lifecycle import wav

    # Given an attempt that created the job but got no answer, then the reference file vanished
    user = funded(10)
    upload = services.upload_create(user=user, file=SimpleUploadedFile("a.wav", wav(2)))
    task = services.task_submit(
        user=user, model_slug="sandbox-audio-isolation", upload_ids=[str(upload.pk)]
    ).task
    SandboxProvider(sandbox.base_url, sandbox.secret).submit(
        SubmitRequest(
            idempotency_key=str(task.pk),
            upstream_model=task.upstream_model,
            prompt="",
            params=task.params,
        )
    )
    Task.objects.filter(pk=task.pk).update(submit_ambiguous_at=timezone.now())
    default_storage.delete(upload.file.name)

    # When the resubmission finds the file unreadable
    services.task_send_upstream(task_id=task.pk)

    # Then the task tracks the job the earlier attempt created instead of refunding it
    task.refresh_from_db()
    assert task.status == S.GENERATING
    assert task.upstream_id.startswith("job_")
    assert billing_selectors.balance_for_user(user=user).held == task.price_micro


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("ledger_ok")
def test_adopting_a_found_job_and_a_cancel_race_to_one_outcome(
    funded: Any, queued: dict[str, list[Any]]
) -> None:
    from billing.tests.concurrency import run_concurrently

    for _ in range(5):
        # Given a submission answered 503 although the provider created the job
        user = funded(10)
        task = submit(user, sandbox_submit="error_after_create")
        with pytest.raises(ProviderError) as caught:
            services.task_send_upstream(task_id=task.pk)
        services.task_submit_attempt_failed(task_id=task.pk, error=caught.value)
        queued["cancel"].clear()

        # When giving up on it (which finds the job) races the user's cancel
        results = run_concurrently(
            [
                lambda task=task: services.task_submit_failed(task_id=task.pk, error=caught.value),
                lambda task=task, user=user: services.task_cancel(task_id=task.pk, actor=user),
            ]
        )

        # Then the task is cancelled once, refunded in full, and its job is asked to stop
        # whichever came first (the job was adopted and then cancelled, or it was accepted late)
        assert not [r for r in results if isinstance(r, Exception)], results
        task.refresh_from_db()
        assert (task.status, task.refunded_micro, task.charged_micro) == (S.CANCELLED, C, 0)
        assert set(queued["cancel"]) == {str(task.pk)}
        assert billing_selectors.balance_for_user(user=user).available == 10 * C


@pytest.mark.django_db
@pytest.mark.usefixtures("ledger_ok")
def test_a_409_before_the_job_exists_keeps_the_credits_held(funded: Any) -> None:
    # Given a provider answering 409 "in progress" before the job it is creating exists
    user = funded(10)
    task = submit(user, sandbox_submit="busy")

    # When the submitter gets that answer and the provider has no job under the key yet
    celery_tasks.submit.apply(args=[str(task.pk)])

    # Then nothing is refunded: the job may still appear; support sees the flag
    task.refresh_from_db()
    assert task.status == S.WAITING
    assert task.submit_unconfirmed_at is not None
    assert billing_selectors.balance_for_user(user=user).held == C


def test_a_2xx_submit_answer_we_cannot_read_may_have_created_the_job() -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from tasks.providers.base import SubmitRequest
    from tasks.services.upstream import may_have_created

    class Garbled(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(201)
            self.send_header("Content-Length", "7")
            self.end_headers()
            self.wfile.write(b"<html>!")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Garbled)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        provider = SandboxProvider(f"http://127.0.0.1:{server.server_port}", "whsec_" + "A" * 32)
        with pytest.raises(ProviderError) as caught:
            provider.submit(
                SubmitRequest(idempotency_key="k", upstream_model="m", prompt="", params={})
            )
        assert caught.value.retryable
        assert may_have_created(caught.value)
    finally:
        server.shutdown()


def test_a_soft_time_limit_during_media_inspection_is_not_taken_for_a_bad_file(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from celery.exceptions import SoftTimeLimitExceeded

    from tasks import media

    def out_of_time(*args: Any, **kwargs: Any) -> Any:
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(media.Image, "open", out_of_time)
    monkeypatch.setattr(media.av, "open", out_of_time)
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64

    for data in (png, b"OggS" + b"\x00" * 60):
        with pytest.raises(SoftTimeLimitExceeded):
            media.inspect_media(data, max_pixels=10_000)
