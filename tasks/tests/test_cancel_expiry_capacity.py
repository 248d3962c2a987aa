"""Cancellation, deletion, rejection by our own processing, result expiry and capacity limits,
against the real sandbox and PostgreSQL."""

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
from django.utils import timezone

from billing import selectors as billing_selectors
from billing.models import Hold
from billing.tests.concurrency import run_concurrently
from notifications.models import Notification
from rivya.errors import CapacityExceeded, NotFound, TaskFinished
from tasks import selectors, services
from tasks.capacity import capacity_counts
from tasks.models import AIModel, Task, TaskEvent
from tasks.tests.lifecycle import job_status, notifications, run_to_end, stats, submit, wav

C = 1_000_000
S = Task.Status
pytestmark = pytest.mark.usefixtures("sandbox", "catalog", "queued", "ledger_ok")


# --- cancel ---------------------------------------------------------------------------------


@pytest.mark.django_db
def test_cancel_waiting_task_refunds_and_nothing_goes_upstream(funded: Any, sandbox: Any) -> None:
    user = funded(10)
    task = submit(user)

    task = services.task_cancel(task_id=task.pk, actor=user)

    assert (task.status, task.charged_micro, task.refunded_micro) == (S.CANCELLED, 0, C)
    assert billing_selectors.balance_for_user(user=user).available == 10 * C
    assert services.task_send_upstream(task_id=task.pk) is False
    assert str(task.pk) not in stats(sandbox)["by_key"]
    assert notifications(task) == []  # the user cancelled it themselves


@pytest.mark.django_db(transaction=True)
def test_cancel_running_task_refunds_and_stops_the_upstream_job(
    funded: Any, queued: dict[str, list[Any]]
) -> None:
    user = funded(10)
    task = submit(user, sandbox_latency_ms=60_000)
    services.task_send_upstream(task_id=task.pk)

    task = services.task_cancel(task_id=task.pk, actor=user)
    assert queued["cancel"] == [str(task.pk)]
    services.task_cancel_upstream(task_id=task.pk)

    assert task.status == S.CANCELLED
    assert job_status(task) == "cancelled"
    assert billing_selectors.balance_for_user(user=user).available == 10 * C
    assert Hold.objects.get(subject_id=str(task.pk)).status == Hold.Status.RELEASED


@pytest.mark.django_db
def test_cancel_twice_is_harmless_and_a_finished_task_is_refused(funded: Any) -> None:
    user = funded(10)
    cancelled = submit(user)
    services.task_cancel(task_id=cancelled.pk)
    again = services.task_cancel(task_id=cancelled.pk)
    done = run_to_end(submit(user))

    with pytest.raises(TaskFinished) as info:
        services.task_cancel(task_id=done.pk)

    assert again.status == S.CANCELLED
    assert info.value.extra["status"] == S.SUCCESS
    done.refresh_from_db()
    assert (done.status, done.charged_micro) == (S.SUCCESS, C)


@pytest.mark.django_db
def test_cancel_by_support_notifies_the_user(funded: Any, staff: Any) -> None:
    task = submit(funded(10))

    services.task_cancel(task_id=task.pk, actor=staff, reason="Duplicate order.")

    assert notifications(task) == ["generation_cancelled"]


@pytest.mark.django_db
def test_cancel_charge_policy_applies_only_to_accepted_work(funded: Any) -> None:
    AIModel.objects.filter(slug="sandbox-image").update(
        billing_policy={"cancel_charge_percent": 50}
    )
    user = funded(10)
    waiting = submit(user, num_outputs=2, sandbox_latency_ms=60_000)
    running = submit(user, num_outputs=2, sandbox_latency_ms=60_000)
    services.task_send_upstream(task_id=running.pk)

    waiting = services.task_cancel(task_id=waiting.pk)
    running = services.task_cancel(task_id=running.pk)

    assert (waiting.charged_micro, running.charged_micro) == (0, C)
    assert billing_selectors.balance_for_user(user=user).available == 9 * C


@pytest.mark.django_db
def test_result_after_cancellation_is_recorded_and_changes_nothing(funded: Any) -> None:
    user = funded(10)
    task = submit(user)
    services.task_send_upstream(task_id=task.pk)  # latency 0: the job has already succeeded
    services.task_cancel(task_id=task.pk)
    task.refresh_from_db()
    job = httpx.get(f"{settings.SANDBOX_URL}/v1/jobs/{task.upstream_id}", trust_env=False).json()
    from tasks.providers.base import CallbackEvent

    delivery, _ = services.callback_receive(
        provider="sandbox",
        event=CallbackEvent(
            event_id="evt_late",
            upstream_id=task.upstream_id,
            state=None,
            payload={"type": "job.updated", "data": job},
        ),
    )
    services.callback_process(delivery_id=delivery.pk)
    services.task_refresh(task_id=task.pk)

    task.refresh_from_db()
    assert (task.status, task.charged_micro, task.results) == (S.CANCELLED, 0, [])
    assert TaskEvent.objects.filter(task=task, kind="late_result").exists()
    assert billing_selectors.balance_for_user(user=user).available == 10 * C


def _success_event(task: Task) -> Any:
    from tasks.providers.base import CallbackEvent

    job = httpx.get(f"{settings.SANDBOX_URL}/v1/jobs/{task.upstream_id}", trust_env=False).json()
    return CallbackEvent(
        event_id=f"evt_{task.pk}",
        upstream_id=task.upstream_id,
        state=None,
        payload={"type": "job.updated", "data": job},
    )


@pytest.mark.django_db(transaction=True)
def test_cancel_racing_success_ends_in_one_terminal_state_200_times(funded: Any) -> None:
    user = funded(1000)
    outcomes = {S.SUCCESS: 0, S.CANCELLED: 0}
    for trial in range(200):
        task = submit(user, width=64, height=64)
        services.task_send_upstream(task_id=task.pk)  # latency 0: success is ready upstream

        # The refresh downloads the outputs before its transaction; a cancel delayed by a
        # varying few milliseconds lands before, during and after that window.
        delay = (trial % 20) * 0.01
        if trial % 2:  # the success arrives by poll
            finish = lambda t=task: services.task_refresh(task_id=t.pk)  # noqa: E731
        else:  # the success arrives by a signed callback
            task.refresh_from_db()
            delivery, _ = services.callback_receive(provider="sandbox", event=_success_event(task))
            finish = lambda d=delivery.pk: services.callback_process(delivery_id=d)  # noqa: E731
        results = run_concurrently(
            [
                lambda t=task, d=delay: (time.sleep(d), services.task_cancel(task_id=t.pk))[1],
                finish,
            ]
        )

        task.refresh_from_db()
        outcomes[task.status] += 1
        hold = Hold.objects.get(subject_id=str(task.pk))
        if task.status == S.CANCELLED:
            assert (task.charged_micro, task.refunded_micro) == (0, C)
            assert hold.status == Hold.Status.RELEASED
            assert task.results == []
        else:
            assert task.status == S.SUCCESS
            assert isinstance(results[0], TaskFinished)
            assert (task.charged_micro, hold.status) == (C, Hold.Status.CAPTURED)
    balance = billing_selectors.balance_for_user(user=user)
    assert outcomes[S.SUCCESS] > 0, outcomes  # both orders really happened
    assert outcomes[S.CANCELLED] > 0, outcomes
    assert balance.balance == 1000 * C - outcomes[S.SUCCESS] * C
    assert balance.held == 0


# --- delete ---------------------------------------------------------------------------------


@pytest.mark.django_db
def test_delete_finished_task_hides_it_but_keeps_billing_and_timeline(funded: Any) -> None:
    user = funded(10)
    task = run_to_end(submit(user))

    services.task_delete(user=user, task_id=task.pk)

    assert selectors.task_get_for_user(user=user, task_id=task.pk) is None
    assert not selectors.history_for_user(user=user).filter(pk=task.pk).exists()
    task.refresh_from_db()
    assert task.deleted_at is not None
    assert (task.status, task.charged_micro) == (S.SUCCESS, C)
    assert TaskEvent.objects.filter(task=task, kind="deleted").exists()
    with pytest.raises(NotFound):
        services.task_delete(user=user, task_id=task.pk)


@pytest.mark.django_db
def test_delete_running_task_cancels_it_first(funded: Any) -> None:
    user = funded(10)
    task = submit(user, sandbox_latency_ms=60_000)
    services.task_send_upstream(task_id=task.pk)

    services.task_delete(user=user, task_id=task.pk)

    task.refresh_from_db()
    assert task.status == S.CANCELLED
    assert task.deleted_at is not None
    assert billing_selectors.balance_for_user(user=user).available == 10 * C


@pytest.mark.django_db
def test_delete_of_someone_elses_task_is_not_found(funded: Any) -> None:
    owner, other = funded(10), funded(10)
    task = submit(owner)

    with pytest.raises(NotFound):
        services.task_delete(user=other, task_id=task.pk)
    task.refresh_from_db()
    assert (task.status, task.deleted_at) == (S.WAITING, None)


# --- rejection by our own processing --------------------------------------------------------


@pytest.mark.django_db
def test_reference_file_gone_before_submission_rejects_and_refunds(funded: Any) -> None:
    from django.core.files.uploadedfile import SimpleUploadedFile

    user = funded(10)
    upload = services.upload_create(user=user, file=SimpleUploadedFile("a.wav", wav(2)))
    outcome = services.task_submit(
        user=user, model_slug="sandbox-audio-isolation", upload_ids=[str(upload.pk)]
    )
    default_storage.delete(upload.file.name)

    assert services.task_send_upstream(task_id=outcome.task.pk) is False

    task = Task.objects.get(pk=outcome.task.pk)
    assert (task.status, task.error_code, task.error_kind) == (
        S.REJECTED,
        "unreadable_file",
        "user",
    )
    assert "Upload it again" in task.error_message
    assert billing_selectors.balance_for_user(user=user).available == 10 * C


@pytest.mark.django_db
def test_audio_isolation_reaches_the_provider_with_its_file(funded: Any) -> None:
    from django.core.files.uploadedfile import SimpleUploadedFile

    user = funded(10)
    upload = services.upload_create(user=user, file=SimpleUploadedFile("a.wav", wav(3)))
    outcome = services.task_submit(
        user=user, model_slug="sandbox-audio-isolation", upload_ids=[str(upload.pk)]
    )

    task = run_to_end(outcome.task)

    assert task.price_micro == 3 * C // 20
    assert task.status == S.SUCCESS
    assert task.results[0]["mime"] == "audio/wav"
    assert abs(task.results[0]["duration_ms"] - 3000) < 50


# --- expiry ---------------------------------------------------------------------------------


def _expire_now(task: Task) -> None:
    Task.objects.filter(pk=task.pk).update(expires_at=timezone.now() - timedelta(seconds=1))


def _files(task: Task) -> list[Path]:
    root = Path(settings.MEDIA_ROOT) / "results" / str(task.pk)
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


@pytest.mark.django_db
def test_expiry_purges_files_marks_the_task_and_touches_nothing_else(funded: Any) -> None:
    user = funded(10)
    due, kept = run_to_end(submit(user, num_outputs=2)), run_to_end(submit(user))
    _expire_now(due)

    assert services.results_expire_due() == 1
    assert services.results_expire_due() == 0  # a second run finds nothing more

    due.refresh_from_db()
    kept.refresh_from_db()
    assert due.results_expired_at is not None
    assert _files(due) == []
    assert not (Path(settings.MEDIA_ROOT) / "results" / str(due.pk)).exists()
    assert len(_files(kept)) == 1
    assert kept.results_expired_at is None
    assert (due.status, due.charged_micro) == (S.SUCCESS, 2 * C)  # billing untouched


@pytest.mark.django_db(transaction=True)
def test_concurrent_expiry_runs_purge_each_task_once(funded: Any) -> None:
    user = funded(100)
    tasks = [run_to_end(submit(user)) for _ in range(10)]
    kept = run_to_end(submit(user))
    for t in tasks:
        _expire_now(t)

    counts = run_concurrently([services.results_expire_due] * 4)

    assert sum(counts) == 10
    assert all(_files(t) == [] for t in tasks)
    kept.refresh_from_db()
    assert len(_files(kept)) == 1  # not due: untouched
    assert kept.results_expired_at is None
    assert TaskEvent.objects.filter(kind="results_expired").count() == 10


@pytest.mark.django_db
def test_expired_results_answer_410_and_the_task_says_expired(funded: Any) -> None:
    from rest_framework.test import APIClient

    from rivya.services import api_key_create

    user = funded(10)
    task = run_to_end(submit(user))
    _expire_now(task)
    services.results_expire_due()
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key_create(user=user).raw}")

    result = client.get(f"/api/v1/tasks/{task.pk}/results/0/")
    detail = client.get(f"/api/v1/tasks/{task.pk}/").json()

    assert result.status_code == 410
    assert result.json()["error"]["code"] == "results_expired"
    assert (detail["expired"], detail["results"]) == (True, [])
    assert detail["expires_at"] is not None


@pytest.mark.django_db
def test_results_expiring_notification_is_sent_once(funded: Any) -> None:
    user = funded(10)
    task = run_to_end(submit(user))
    Task.objects.filter(pk=task.pk).update(
        expires_at=timezone.now() + timedelta(seconds=settings.TASK_EXPIRY_WARNING - 60)
    )

    assert services.results_warn_expiring() == 1
    assert services.results_warn_expiring() == 0
    assert (
        Notification.objects.filter(kind="results_expiring", subject_id=str(task.pk)).count() == 1
    )


@pytest.mark.django_db
def test_per_model_ttl_override_sets_expires_at(funded: Any) -> None:
    AIModel.objects.filter(slug="sandbox-image").update(result_ttl_seconds=60)
    task = run_to_end(submit(funded(10)))

    assert task.expires_at == task.finished_at + timedelta(seconds=60)


# --- capacity -------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_per_user_limit_holds_under_concurrent_submits(funded: Any, settings: Any) -> None:
    settings.TASK_MAX_RUNNING_PER_USER = 3
    user = funded(100)

    results = run_concurrently([lambda: submit(user, sandbox_latency_ms=60_000)] * 12)

    accepted = [r for r in results if isinstance(r, Task)]
    refused = [r for r in results if isinstance(r, CapacityExceeded)]
    assert (len(accepted), len(refused)) == (3, 9), results
    assert Task.objects.filter(user=user).count() == 3  # refused submits left nothing
    assert billing_selectors.balance_for_user(user=user).held == 3 * C
    assert capacity_counts()[f"user:{user.pk}"] == 3
    assert refused[0].retry_after > 0

    services.task_cancel(task_id=accepted[0].pk)  # a slot comes back
    assert submit(user).status == S.WAITING


@pytest.mark.django_db(transaction=True)
def test_global_limit_holds_under_concurrent_submits_from_many_users(
    funded: Any, settings: Any
) -> None:
    settings.TASK_MAX_RUNNING = 5
    users = [funded(10) for _ in range(20)]

    results = run_concurrently([lambda u=u: submit(u, sandbox_latency_ms=60_000) for u in users])

    accepted = [r for r in results if isinstance(r, Task)]
    assert len(accepted) == 5, results
    assert all(
        isinstance(r, CapacityExceeded) and r.code == "system_busy"
        for r in results
        if not isinstance(r, Task)
    )
    assert Task.objects.filter(status__in=Task.UNFINISHED).count() == 5
    assert sum(v for k, v in capacity_counts().items() if k.startswith("global:")) == 5


@pytest.mark.django_db
def test_per_category_limit(funded: Any, settings: Any) -> None:
    settings.TASK_MAX_RUNNING_PER_CATEGORY = {"video": 1}
    user = funded(100)
    submit(user, "sandbox-video", sandbox_latency_ms=60_000)

    with pytest.raises(CapacityExceeded):
        submit(user, "sandbox-video")
    assert submit(user, "sandbox-image").status == S.WAITING


@pytest.mark.django_db
def test_finishing_returns_capacity(funded: Any, settings: Any) -> None:
    settings.TASK_MAX_RUNNING_PER_USER = 1
    user = funded(100)

    run_to_end(submit(user))  # success gives the slot back
    run_to_end(submit(user, sandbox_outcome="fail"))  # so does failure

    assert submit(user).status == S.WAITING
    assert capacity_counts()[f"user:{user.pk}"] == 1


@pytest.mark.django_db
def test_sandbox_honours_cancel_unless_asked_to_ignore_it(funded: Any) -> None:
    user = funded(10)
    honoured = submit(user, sandbox_latency_ms=300, width=64, height=64)
    ignored = submit(user, sandbox_latency_ms=300, sandbox_cancel="ignore", width=64, height=64)
    for task in (honoured, ignored):
        services.task_send_upstream(task_id=task.pk)
        services.task_cancel(task_id=task.pk)
        services.task_cancel_upstream(task_id=task.pk)
        task.refresh_from_db()
    time.sleep(0.6)

    assert job_status(honoured) == "cancelled"
    assert job_status(ignored) == "succeeded"  # the upstream finished anyway
    ignored.refresh_from_db()
    assert (ignored.status, ignored.charged_micro) == (S.CANCELLED, 0)


@pytest.mark.django_db(transaction=True)
def test_an_upstream_cancel_whose_message_was_lost_is_sent_by_the_sweeper(
    funded: Any, queued: dict[str, list[Any]], sandbox: Any
) -> None:
    from datetime import timedelta

    from django.utils import timezone

    from tasks.services.cancel import CANCEL_SWEEP_AFTER_S

    # Given cancelled tasks whose queued upstream cancels never ran: one a while ago, one a
    # while ago whose cancel was given up, one just now (its own retries may still be running),
    # and one a while ago whose job was accepted only after it was cancelled
    user = funded(10)
    lost, given_up, fresh = (submit(user, sandbox_latency_ms=60_000) for _ in range(3))
    for task in (lost, given_up, fresh):
        services.task_send_upstream(task_id=task.pk)
        services.task_cancel(task_id=task.pk, actor=user)
    late = submit(user, sandbox_latency_ms=60_000, sandbox_submit_delay_ms=1500)
    sending = threading.Thread(target=services.task_send_upstream, kwargs={"task_id": late.pk})
    sending.start()
    time.sleep(0.5)  # the submit is out, its answer 1 s away
    services.task_cancel(task_id=late.pk, actor=user)  # cancelled while WAITING
    sending.join()  # the job is accepted after all: late
    long_ago = timezone.now() - timedelta(seconds=CANCEL_SWEEP_AFTER_S + 5)
    Task.objects.filter(pk__in=[lost.pk, given_up.pk, late.pk]).update(
        finished_at=long_ago, cancel_requested_at=long_ago
    )
    services.task_cancel_upstream_gave_up(task_id=given_up.pk, upstream_id=None, error="410")

    # Then the sweeper finds only those never carried out nor given up, from the task fields
    late.refresh_from_db()
    assert (late.upstream_id, late.late_upstream_id[:4]) == ("", "job_")
    assert sorted(services.cancels_unsent()) == sorted([str(lost.pk), str(late.pk)])

    # And carrying them out stops both jobs and empties the sweep
    services.task_cancel_upstream(task_id=lost.pk)
    services.task_cancel_upstream(task_id=late.pk)
    lost.refresh_from_db()
    assert job_status(lost) == "cancelled"
    late_job = f"{sandbox.base_url}/v1/jobs/{late.late_upstream_id}"
    assert httpx.get(late_job, trust_env=False).json()["status"] == "cancelled"
    assert lost.upstream_cancel_done_at is not None
    assert services.cancels_unsent() == []


@pytest.mark.django_db(transaction=True)
def test_cancelling_a_task_whose_submit_was_unclear_stops_the_job_found_by_its_key(
    funded: Any, queued: dict[str, list[Any]], sandbox: Any
) -> None:
    from tasks.providers.base import ProviderError

    # Given a task whose submit created the job but answered 503 (still WAITING, retrying)
    user = funded(10)
    task = submit(user, sandbox_latency_ms=60_000, sandbox_submit="error_after_create")
    with pytest.raises(ProviderError) as caught:
        services.task_send_upstream(task_id=task.pk)
    services.task_submit_attempt_failed(task_id=task.pk, error=caught.value)

    # When the user cancels it
    services.task_cancel(task_id=task.pk, actor=user)

    # Then the refund comes with an upstream cancel, which finds the job by the task's key
    task.refresh_from_db()
    assert (task.status, task.upstream_id, task.refunded_micro) == (S.CANCELLED, "", C)
    assert queued["cancel"] == [str(task.pk)]
    services.task_cancel_upstream(task_id=task.pk)
    job = httpx.get(
        f"{sandbox.base_url}/v1/jobs", params={"idempotency_key": str(task.pk)}, trust_env=False
    ).json()["data"][0]
    assert job["status"] == "cancelled"
    task.refresh_from_db()
    assert task.upstream_cancel_done_at is not None


@pytest.mark.django_db(transaction=True)
def test_an_unanswered_attempt_after_a_cancel_sends_a_cancel_for_its_job(
    funded: Any, queued: dict[str, list[Any]]
) -> None:
    from tasks.providers.base import ProviderError

    # Given a task cancelled while a submit attempt was out
    user = funded(10)
    task = submit(user)
    services.task_cancel(task_id=task.pk, actor=user)
    assert queued["cancel"] == []  # never sent: nothing to stop yet

    # When that attempt ends without an answer (it may have created the job)
    timeout = ProviderError("ReadTimeout", retryable=True, maybe_received=True)
    services.task_submit_attempt_failed(task_id=task.pk, error=timeout)

    # Then a cancel by the task's key is queued, and the sweep keeps it until it is carried out
    task.refresh_from_db()
    assert queued["cancel"] == [str(task.pk)]
    assert (task.cancel_requested_at is not None, task.upstream_cancel_done_at) == (True, None)
