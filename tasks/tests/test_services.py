"""The generation lifecycle at the service level, against the real sandbox process and real
PostgreSQL: each transition, each outcome, and the races between them."""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.conf import settings
from django.utils import timezone
from PIL import Image

from billing import selectors as billing_selectors
from billing.models import Hold, LedgerTransaction
from billing.tests.concurrency import run_concurrently
from rivya.errors import ValidationFailed
from tasks import services
from tasks.models import AIModel, CallbackDelivery, Task, TaskEvent
from tasks.providers.base import CallbackEvent, ProviderError
from tasks.services.dispatch import dispatch_all
from tasks.tests.lifecycle import notifications, run_to_end, stats, submit

C = 1_000_000
S = Task.Status
pytestmark = pytest.mark.usefixtures("sandbox", "catalog", "queued", "ledger_ok", "submit_path")


# --- submit ---------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_submit_records_waiting_task_holds_credits_and_queues_after_commit(
    funded: Any, queued: dict[str, list[Any]]
) -> None:
    user = funded(10)

    task = submit(user, num_outputs=3)

    assert task.status == S.WAITING
    assert (task.price_micro, task.reserved_micro) == (3 * C, 3 * C)
    assert task.params["width"] == 512  # defaults filled
    assert billing_selectors.balance_for_user(user=user).held == 3 * C
    assert (dispatch_all(), queued["submit"]) == (1, [str(task.pk)])


@pytest.mark.django_db
def test_invalid_request_creates_nothing(funded: Any) -> None:
    user = funded(10)
    with pytest.raises(ValidationFailed) as info:
        services.task_submit(
            user=user, model_slug="sandbox-image", prompt="x", params={"width": 5000}
        )
    assert "params.width" in info.value.fields
    assert Task.objects.count() == 0
    assert Hold.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_insufficient_credits_records_failed_task_without_hold_or_upstream_call(
    funded: Any, sandbox: Any, queued: dict[str, list[Any]]
) -> None:
    user = funded(0)

    outcome = services.task_submit(user=user, model_slug="sandbox-image", prompt="x")

    task = outcome.task
    assert not outcome.accepted
    assert (task.status, task.error_code, task.error_kind) == (
        S.FAILED,
        "insufficient_credits",
        "user",
    )
    assert not Hold.objects.filter(subject_id=str(task.pk)).exists()
    assert (dispatch_all(), queued["submit"]) == (0, [])
    assert notifications(task) == ["insufficient_credits"]
    assert not services.task_send_upstream(task_id=task.pk)  # even if asked, nothing is sent
    assert str(task.pk) not in stats(sandbox)["by_key"]


@pytest.mark.django_db
def test_catalog_edits_never_change_a_submitted_task(funded: Any) -> None:
    user = funded(10)
    task = submit(user)

    AIModel.objects.filter(slug="sandbox-image").update(price_micro=9 * C)
    task = run_to_end(task)

    assert (task.status, task.charged_micro) == (S.SUCCESS, C)


# --- upstream submission --------------------------------------------------------------------


@pytest.mark.django_db
def test_send_upstream_moves_to_generating_once(funded: Any, sandbox: Any) -> None:
    task = submit(funded(10))

    assert services.task_send_upstream(task_id=task.pk) is True
    assert services.task_send_upstream(task_id=task.pk) is False

    task.refresh_from_db()
    assert task.status == S.GENERATING
    assert task.upstream_id.startswith("job_")
    assert stats(sandbox)["by_key"][str(task.pk)] == 1


@pytest.mark.django_db(transaction=True)
def test_concurrent_submissions_create_one_upstream_job(funded: Any, sandbox: Any) -> None:
    task = submit(funded(10), sandbox_latency_ms=2000)

    results = run_concurrently([lambda: services.task_send_upstream(task_id=task.pk)] * 6)

    assert results.count(True) == 1, results
    assert stats(sandbox)["by_key"][str(task.pk)] == 1
    task.refresh_from_db()
    job = httpx.get(f"{settings.SANDBOX_URL}/v1/jobs/{task.upstream_id}", trust_env=False)
    assert job.json()["status"] != "cancelled"  # the losers did not cancel the task's own job
    assert TaskEvent.objects.filter(task=task, kind="submitted").count() == 1


@pytest.mark.django_db
def test_retryable_submit_error_leaves_task_waiting(funded: Any) -> None:
    task = submit(funded(10), sandbox_submit="error")

    with pytest.raises(ProviderError) as info:
        services.task_send_upstream(task_id=task.pk)

    assert info.value.retryable
    task.refresh_from_db()
    assert (task.status, task.submit_attempts) == (S.WAITING, 1)


@pytest.mark.django_db
def test_permanent_submit_error_fails_and_refunds(funded: Any) -> None:
    user = funded(10)
    task = submit(user, sandbox_submit="invalid")
    with pytest.raises(ProviderError) as info:
        services.task_send_upstream(task_id=task.pk)
    assert not info.value.retryable

    assert services.task_submit_failed(task_id=task.pk, error=info.value)

    task.refresh_from_db()
    assert (task.status, task.error_kind, task.charged_micro) == (S.FAILED, "provider", 0)
    assert billing_selectors.balance_for_user(user=user).available == 10 * C
    assert notifications(task) == ["generation_failed"]


# --- outcomes -------------------------------------------------------------------------------


@pytest.mark.django_db
def test_success_stores_outputs_captures_and_notifies_once(funded: Any, settings: Any) -> None:
    user = funded(10)
    task = run_to_end(submit(user, width=320, height=200, num_outputs=2))

    assert task.status == S.SUCCESS
    assert task.charged_micro == 2 * C
    assert task.refunded_micro == 0
    assert task.expires_at == task.finished_at + timedelta(seconds=settings.TASK_RESULT_TTL)
    assert [(r["mime"], r["width"], r["height"]) for r in task.results] == [
        ("image/png", 320, 200)
    ] * 2
    with Image.open(Path(settings.MEDIA_ROOT) / task.results[0]["name"]) as img:
        assert img.size == (320, 200)
    assert billing_selectors.balance_for_user(user=user).balance == 8 * C
    assert notifications(task) == ["generation_success"]
    assert LedgerTransaction.objects.filter(kind="capture", subject_id=str(task.pk)).count() == 1


@pytest.mark.django_db
def test_partial_success_charges_only_what_was_delivered(funded: Any) -> None:
    user = funded(10)
    task = run_to_end(submit(user, num_outputs=3, sandbox_outcome="partial"))

    assert task.status == S.SUCCESS
    assert len(task.results) == 2
    assert task.charged_micro == 3 * C * 2 // 3
    assert task.refunded_micro == 3 * C - task.charged_micro
    assert billing_selectors.balance_for_user(user=user).available == 10 * C - 2 * C


@pytest.mark.django_db
def test_provider_failure_fails_and_refunds(funded: Any) -> None:
    user = funded(10)
    task = run_to_end(submit(user, sandbox_outcome="fail"))

    assert (task.status, task.error_kind, task.charged_micro) == (S.FAILED, "provider", 0)
    assert task.error_code
    assert task.error_message
    assert billing_selectors.balance_for_user(user=user).available == 10 * C
    assert notifications(task) == ["generation_failed"]


@pytest.mark.django_db
def test_rejection_is_a_user_error_and_refunds(funded: Any) -> None:
    user = funded(10)
    task = run_to_end(submit(user, sandbox_outcome="reject"))

    assert (task.status, task.error_kind) == (S.REJECTED, "user")
    assert "try again" in task.error_message
    assert billing_selectors.balance_for_user(user=user).available == 10 * C
    assert notifications(task) == ["generation_rejected"]


@pytest.mark.django_db
def test_failure_charge_policy_applies_after_upstream_acceptance(funded: Any) -> None:
    AIModel.objects.filter(slug="sandbox-image").update(
        billing_policy={"failure_charge_percent": 25}
    )
    user = funded(10)

    task = run_to_end(submit(user, num_outputs=4, sandbox_outcome="fail"))

    assert (task.status, task.charged_micro, task.refunded_micro) == (S.FAILED, C, 3 * C)
    assert billing_selectors.balance_for_user(user=user).available == 9 * C
    assert TaskEvent.objects.filter(
        task=task, kind="credits_captured", message__contains="25%"
    ).exists()


@pytest.mark.django_db
def test_terminal_states_never_change(funded: Any) -> None:
    task = run_to_end(submit(funded(10)))

    assert not services.task_fail(task_id=task.pk, code="late", message="late", kind="provider")
    assert not services.task_succeed(task_id=task.pk, outputs=[])
    services.task_refresh(task_id=task.pk)

    task.refresh_from_db()
    assert (task.status, task.charged_micro) == (S.SUCCESS, C)
    assert notifications(task) == ["generation_success"]


@pytest.mark.django_db(transaction=True)
def test_concurrent_refreshes_finish_once_and_keep_one_set_of_files(
    funded: Any, settings: Any
) -> None:
    user = funded(10)
    task = submit(user, num_outputs=2)
    services.task_send_upstream(task_id=task.pk)

    run_concurrently([lambda: services.task_refresh(task_id=task.pk)] * 8)

    task.refresh_from_db()
    assert (task.status, task.charged_micro) == (S.SUCCESS, 2 * C)
    assert LedgerTransaction.objects.filter(kind="capture", subject_id=str(task.pk)).count() == 1
    assert notifications(task) == ["generation_success"]
    assert task.output_attempts == 1  # one worker took the lease and downloaded; the rest left it
    stored = sorted(
        p for p in (Path(settings.MEDIA_ROOT) / "results" / str(task.pk)).rglob("*") if p.is_file()
    )
    assert [str(p.relative_to(settings.MEDIA_ROOT)) for p in stored] == sorted(
        r["name"] for r in task.results
    )  # the losers deleted their own downloads


# --- polling and timeouts -------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_poll_claims_are_disjoint_under_concurrency(funded: Any) -> None:
    user = funded(100)
    tasks = [submit(user, sandbox_latency_ms=60_000) for _ in range(12)]
    for t in tasks:
        services.task_send_upstream(task_id=t.pk)
    Task.objects.update(next_poll_at=timezone.now() - timedelta(seconds=1))

    claims = run_concurrently([lambda: services.poll_claim_due(limit=5)] * 4)

    claimed = [task_id for claim in claims for task_id in claim]
    assert len(claimed) == len(set(claimed)) == 12
    assert services.poll_claim_due() == []  # all pushed into the future
    assert not Task.objects.filter(next_poll_at__lte=timezone.now()).exists()


@pytest.mark.django_db
def test_running_job_stays_generating_and_status_errors_change_nothing(funded: Any) -> None:
    task = submit(funded(10), sandbox_latency_ms=60_000, sandbox_status="error")
    services.task_send_upstream(task_id=task.pk)

    services.task_refresh(task_id=task.pk)

    task.refresh_from_db()
    assert task.status == S.GENERATING
    assert TaskEvent.objects.filter(task=task, kind="poll_failed").exists()


@pytest.mark.django_db
def test_overdue_task_is_failed_only_after_upstream_confirms_the_stop(funded: Any) -> None:
    AIModel.objects.filter(slug="sandbox-image").update(timeout_seconds=1)
    user = funded(10)
    task = submit(user, sandbox_latency_ms=60_000)
    services.task_send_upstream(task_id=task.pk)
    Task.objects.filter(pk=task.pk).update(submitted_at=timezone.now() - timedelta(seconds=5))

    services.task_refresh(task_id=task.pk)

    task.refresh_from_db()
    assert (task.status, task.error_code, task.charged_micro) == (S.FAILED, "timeout", 0)
    assert billing_selectors.balance_for_user(user=user).available == 10 * C


@pytest.mark.django_db
def test_overdue_task_is_not_refunded_while_upstream_cannot_confirm(funded: Any) -> None:
    AIModel.objects.filter(slug="sandbox-image").update(timeout_seconds=1)
    user = funded(10)
    task = submit(user, sandbox_latency_ms=60_000, sandbox_status="error")
    services.task_send_upstream(task_id=task.pk)
    Task.objects.filter(pk=task.pk).update(submitted_at=timezone.now() - timedelta(seconds=5))

    services.task_refresh(task_id=task.pk)

    task.refresh_from_db()
    assert task.status == S.GENERATING
    assert billing_selectors.balance_for_user(user=user).held == C


# --- callbacks ------------------------------------------------------------------------------


def _event_for(task: Task, event_id: str | None = None) -> CallbackEvent:
    job = httpx.get(f"{settings.SANDBOX_URL}/v1/jobs/{task.upstream_id}", trust_env=False).json()
    return CallbackEvent(
        event_id=event_id or f"evt_{uuid.uuid4().hex}",
        upstream_id=task.upstream_id,
        state=None,
        payload={"type": "job.updated", "data": job},
    )


@pytest.mark.django_db
def test_a_delivery_is_stored_once(funded: Any, queued: dict[str, list[Any]]) -> None:
    task = submit(funded(10))
    services.task_send_upstream(task_id=task.pk)
    task.refresh_from_db()
    event = _event_for(task, "evt_same")

    first = services.callback_receive(provider="sandbox", event=event)
    second = services.callback_receive(provider="sandbox", event=event)

    assert first[1] is True
    assert second[1] is False
    assert first[0].pk == second[0].pk
    assert CallbackDelivery.objects.count() == 1


@pytest.mark.django_db
def test_callback_finishes_the_task_from_its_signed_payload(funded: Any) -> None:
    task = submit(funded(10))
    services.task_send_upstream(task_id=task.pk)
    task.refresh_from_db()
    delivery, _ = services.callback_receive(provider="sandbox", event=_event_for(task))

    assert services.callback_process(delivery_id=delivery.pk) == "processed"

    task.refresh_from_db()
    assert task.status == S.SUCCESS
    assert TaskEvent.objects.filter(task=task, kind="callback").count() == 1


@pytest.mark.django_db
def test_callback_before_our_upstream_id_is_stored_defers(funded: Any) -> None:
    task = submit(funded(10))
    job = httpx.post(
        f"{settings.SANDBOX_URL}/v1/jobs",
        headers={"Idempotency-Key": str(task.pk)},
        trust_env=False,
        json={"model": "sandbox/image-v1", "prompt": "x", "params": {}},
    ).json()
    event = CallbackEvent(
        event_id="evt_early",
        upstream_id=job["id"],
        state=None,
        payload={"type": "job.updated", "data": job},
    )
    delivery, _ = services.callback_receive(provider="sandbox", event=event)

    assert services.callback_process(delivery_id=delivery.pk) == "deferred"
    services.task_send_upstream(task_id=task.pk)  # same key: the same upstream job
    assert services.callback_process(delivery_id=delivery.pk) == "processed"

    task.refresh_from_db()
    assert task.status == S.SUCCESS
    assert task.upstream_id == job["id"]


@pytest.mark.django_db(transaction=True)
def test_callbacks_and_polls_racing_give_one_outcome(funded: Any) -> None:
    user = funded(10)
    task = submit(user, num_outputs=2)
    services.task_send_upstream(task_id=task.pk)
    task.refresh_from_db()
    deliveries = [
        services.callback_receive(provider="sandbox", event=_event_for(task))[0] for _ in range(6)
    ]

    run_concurrently(
        [lambda d=d: services.callback_process(delivery_id=d.pk) for d in deliveries]
        + [lambda: services.task_refresh(task_id=task.pk)] * 6
    )

    task.refresh_from_db()
    assert (task.status, task.charged_micro) == (S.SUCCESS, 2 * C)
    assert LedgerTransaction.objects.filter(kind="capture", subject_id=str(task.pk)).count() == 1
    assert notifications(task) == ["generation_success"]
    assert billing_selectors.balance_for_user(user=user).balance == 8 * C


@pytest.mark.django_db
def test_stale_running_callback_after_success_changes_nothing(funded: Any) -> None:
    task = run_to_end(submit(funded(10)))
    event = _event_for(task)
    event.payload["data"].update(status="running", outputs=[])
    delivery, _ = services.callback_receive(provider="sandbox", event=event)

    services.callback_process(delivery_id=delivery.pk)

    task.refresh_from_db()
    assert (task.status, task.charged_micro) == (S.SUCCESS, C)


@pytest.mark.django_db
def test_unknown_job_callbacks_are_ignored_after_their_attempts(funded: Any) -> None:
    event = CallbackEvent(event_id="evt_x", upstream_id="job_unknown", state=None, payload={})
    delivery, _ = services.callback_receive(provider="sandbox", event=event)

    outcomes = [
        services.callback_process(delivery_id=delivery.pk)
        for _ in range(services.CALLBACK_MAX_ATTEMPTS)
    ]

    assert outcomes[:-1] == ["deferred"] * (services.CALLBACK_MAX_ATTEMPTS - 1)
    assert outcomes[-1] == "ignored"


# --- reconciler -----------------------------------------------------------------------------


@pytest.mark.django_db
def test_reconciler_finds_only_stuck_waiting_tasks(funded: Any, settings: Any) -> None:
    user = funded(10)
    fresh, stuck, submitted = submit(user), submit(user), submit(user)
    services.task_send_upstream(task_id=submitted.pk)
    old = timezone.now() - timedelta(seconds=settings.TASK_RESUBMIT_AFTER + 5)
    Task.objects.filter(pk__in=[stuck.pk, submitted.pk]).update(created_at=old)

    assert services.waiting_due_for_resubmit() == [str(stuck.pk)]
    assert fresh.pk != stuck.pk


@pytest.mark.django_db
def test_a_delivery_being_processed_is_not_taken_twice(funded: Any) -> None:
    from tasks.services.callbacks import CALLBACK_LEASE_S

    task = submit(funded(10))
    services.task_send_upstream(task_id=task.pk)
    task.refresh_from_db()
    delivery, _ = services.callback_receive(provider="sandbox", event=_event_for(task))
    old = timezone.now() - timedelta(seconds=60)
    # Another processor took it a moment ago and is still at work (a long download)
    CallbackDelivery.objects.filter(pk=delivery.pk).update(
        attempts=1, last_attempt_at=timezone.now(), received_at=old
    )

    assert services.callback_process(delivery_id=delivery.pk) == "busy"
    assert delivery.pk not in services.callbacks_pending()
    delivery.refresh_from_db()
    assert (delivery.attempts, delivery.status) == (1, CallbackDelivery.Status.PENDING)

    # That processor died: once its lease is over, the sweeper hands it out again
    CallbackDelivery.objects.filter(pk=delivery.pk).update(
        last_attempt_at=timezone.now() - timedelta(seconds=CALLBACK_LEASE_S + 1)
    )
    assert delivery.pk in services.callbacks_pending()
    assert services.callback_process(delivery_id=delivery.pk) == "processed"
    task.refresh_from_db()
    assert task.status == S.SUCCESS


@pytest.mark.django_db
def test_a_delivery_that_keeps_failing_is_given_up_and_the_task_is_still_polled(
    funded: Any,
) -> None:
    task = submit(funded(10))
    services.task_send_upstream(task_id=task.pk)
    task.refresh_from_db()
    delivery, _ = services.callback_receive(provider="sandbox", event=_event_for(task))
    # Every earlier attempt died while applying it
    CallbackDelivery.objects.filter(pk=delivery.pk).update(
        attempts=services.CALLBACK_MAX_ATTEMPTS,
        received_at=timezone.now() - timedelta(minutes=30),
    )

    assert services.callback_process(delivery_id=delivery.pk) == "failed"

    delivery.refresh_from_db()
    assert delivery.status == CallbackDelivery.Status.FAILED
    assert delivery.pk not in services.callbacks_pending()
    assert TaskEvent.objects.filter(task=task, kind="callback_failed").count() == 1
    services.task_refresh(task_id=task.pk)  # the poller still finishes it
    task.refresh_from_db()
    assert task.status == S.SUCCESS
