"""The generation lifecycle end to end: the public API, a real Celery worker and beat, Redis,
PostgreSQL, the sandbox upstream as its own process and its signed callbacks arriving at the
live server. Each test drives the product through HTTP only and observes it through the API, the
database and the sandbox's ``/v1/stats``; the ``e2e`` fixture checks the ledger invariants
(``manage.py ledger_check``) after every test.
"""

from __future__ import annotations

import io
import json
import threading
import time
import wave
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import av
import httpx
import pytest
from django.core.cache import cache
from PIL import Image
from rest_framework.test import APIClient
from standardwebhooks import Webhook

from billing import selectors as billing_selectors
from billing import services as billing
from billing.models import Hold, LedgerTransaction
from notifications.models import Notification
from rivya import services as rivya_services
from tasks.models import AIModel, CallbackDelivery, Task, TaskEvent
from tasks.tests.sandbox_process import new_secret
from tests.e2e import Stack, sandbox_stats, wait_for

C = 1_000_000
TERMINAL = {"SUCCESS", "FAILED", "REJECTED", "CANCELLED"}
SUBJECT = "tasks.task"

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


# --- helpers --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Customer:
    user: Any
    api: APIClient


@pytest.fixture
def customer(make_user: Any) -> Callable[..., Customer]:
    """A user with ``credits`` credits and an API client holding one of their real API keys."""

    def make(credits: int = 10) -> Customer:
        user = make_user()
        if credits:
            billing.grant(user=user, amount=credits * C, reason="e2e test funds")
        api = APIClient()
        raw = rivya_services.api_key_create(user=user).raw
        api.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
        return Customer(user=user, api=api)

    return make


def submit(
    who: Customer,
    model: str = "sandbox-image",
    *,
    prompt: str = "a lighthouse at dusk",
    expect: int = 202,
    **params: Any,
) -> dict[str, Any]:
    response = who.api.post(
        "/api/v1/tasks/", {"model": model, "prompt": prompt, "params": params}, format="json"
    )
    assert response.status_code == expect, response.content
    return response.json()


def get_task(who: Customer, task_id: str) -> dict[str, Any]:
    response = who.api.get(f"/api/v1/tasks/{task_id}/")
    assert response.status_code == 200, response.content
    return response.json()


def wait_done(who: Customer, task_id: str, *, timeout: float = 20) -> dict[str, Any]:
    """Poll the task's GET endpoint until its status is terminal."""

    def finished() -> dict[str, Any] | None:
        body = get_task(who, task_id)
        return body if body["status"] in TERMINAL else None

    return wait_for(finished, timeout=timeout, what=f"task {task_id} to finish")


def wait_status(who: Customer, task_id: str, status: str, *, timeout: float = 10) -> None:
    wait_for(
        lambda: get_task(who, task_id)["status"] == status,
        timeout=timeout,
        what=f"task {task_id} to be {status}",
    )


def fetch_result(who: Customer, url: str) -> tuple[str, bytes]:
    response = who.api.get(url)
    assert response.status_code == 200, response
    try:
        return response["Content-Type"], b"".join(response.streaming_content)
    finally:
        response.close()


def captures(task_id: str) -> list[LedgerTransaction]:
    return list(
        LedgerTransaction.objects.filter(
            kind=LedgerTransaction.Kind.CAPTURE, subject_type=SUBJECT, subject_id=str(task_id)
        )
    )


def notification_kinds(task_id: str) -> list[str]:
    return sorted(
        Notification.objects.filter(subject_type=SUBJECT, subject_id=str(task_id)).values_list(
            "kind", flat=True
        )
    )


def timeline(task_id: str) -> list[TaskEvent]:
    return list(TaskEvent.objects.filter(task_id=task_id).order_by("created_at", "pk"))


def event_kinds(task_id: str) -> list[str]:
    return [event.kind for event in timeline(task_id)]


def available(who: Customer) -> int:
    return billing_selectors.balance_for_user(user=who.user).available


def clone_model(slug: str, new_slug: str, **changes: Any) -> AIModel:
    """A catalog copy of a seed model with some fields changed (e.g. its polling interval)."""
    model = AIModel.objects.get(slug=slug)
    fields = {
        f.name: getattr(model, f.name)
        for f in AIModel._meta.concrete_fields
        if f.name not in ("id", "created_at", "updated_at")
    }
    fields.update(slug=new_slug, name=f"{model.name} ({new_slug})", **changes)
    return AIModel.objects.create(**fields)


def callback_url(stack: Stack) -> str:
    return f"{stack.env['CALLBACK_BASE_URL']}/api/v1/callbacks/sandbox/"


def upstream_job(stack: Stack, upstream_id: str) -> dict[str, Any]:
    response = httpx.get(f"{stack.sandbox_url}/v1/jobs/{upstream_id}", trust_env=False)
    assert response.status_code == 200, response.text
    return response.json()


def signed_delivery(
    secret: str, job: dict[str, Any], *, msg_id: str, at: datetime | None = None
) -> tuple[bytes, dict[str, str]]:
    """A Standard Webhooks delivery of ``job`` as the sandbox would send it."""
    at = at or datetime.now(tz=UTC)
    body = json.dumps({"type": "job.updated", "data": job}, separators=(",", ":")).encode()
    headers = {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, at, body.decode()),
    }
    return body, headers


def post_concurrently(
    url: str, body: bytes, headers: dict[str, str], times: int
) -> list[httpx.Response]:
    """POST the same bytes ``times`` times at once (threads released together by a barrier)."""
    barrier = threading.Barrier(times)
    with httpx.Client(trust_env=False, timeout=30) as client:

        def post(_: int) -> httpx.Response:
            barrier.wait(timeout=10)
            return client.post(url, content=body, headers=headers)

        with ThreadPoolExecutor(max_workers=times) as pool:
            return list(pool.map(post, range(times)))


def settled_stats(stack: Stack) -> dict[str, Any]:
    """The sandbox's stats once deliveries left over from earlier tests stopped arriving."""

    def stable() -> dict[str, Any] | None:
        first = sandbox_stats(stack)
        time.sleep(1)  # longer than the sandbox's first two retry delays (0.5 s, 1 s)
        second = sandbox_stats(stack)
        return second if first == second else None

    return wait_for(stable, timeout=15, what="the sandbox to stop sending callbacks")


def result_files(stack: Stack, task_id: str) -> list[Path]:
    return [p for p in (Path(stack.media_root) / "results" / task_id).rglob("*") if p.is_file()]


def assert_charged_once(task_id: str, price: int) -> None:
    """Exactly one capture of the full price, one success notification, one success event."""
    task = Task.objects.get(pk=task_id)
    assert task.status == Task.Status.SUCCESS
    assert task.charged_micro == price == task.price_micro
    assert task.refunded_micro == task.reserved_micro - price
    [capture] = captures(task_id)
    assert sorted(e.amount for e in capture.entries.all()) == [-price, price]
    hold = Hold.objects.get(subject_type=SUBJECT, subject_id=task_id)
    assert (hold.status, hold.captured) == (Hold.Status.CAPTURED, price)
    assert notification_kinds(task_id) == [Notification.Kind.GENERATION_SUCCESS]
    assert event_kinds(task_id).count("succeeded") == 1
    assert event_kinds(task_id).count("credits_captured") == 1


# --- outcomes -------------------------------------------------------------------------------


def test_success_via_callback(e2e: Stack, customer: Callable[..., Customer]) -> None:
    # Given a copy of sandbox-image polled only every 10 minutes: within the wait, only the
    # sandbox's signed callback can finish the task.
    model = clone_model("sandbox-image", "sandbox-image-callback-only", poll_interval_seconds=600)
    who = customer(10)

    # When
    created = submit(who, model.slug)
    task = wait_done(who, created["id"], timeout=15)

    # Then the result is a real PNG, served by our API from our storage
    assert task["status"] == "SUCCESS", task
    [result] = task["results"]
    assert (result["mime"], result["width"], result["height"]) == ("image/png", 512, 512)
    content_type, data = fetch_result(who, result["url"])
    assert content_type == "image/png"
    assert len(data) == result["bytes"]
    with Image.open(io.BytesIO(data)) as image:
        assert (image.format, image.size) == ("PNG", (512, 512))
        image.load()
    # ... the credits were charged exactly once
    assert task["credits"]["charged_micro"] == C
    assert_charged_once(task["id"], C)
    entries = sorted(e.amount for e in billing_selectors.ledger_for_user(user=who.user))
    assert entries == [-C, 10 * C]
    assert billing_selectors.balance_for_user(user=who.user) == billing_selectors.Balance(
        balance=9 * C, held=0
    )
    # ... and it was the callback that finished it: a processed delivery, never a poll
    row = Task.objects.get(pk=task["id"])
    assert row.poll_count == 0
    assert CallbackDelivery.objects.filter(
        task_id=row.pk, upstream_id=row.upstream_id, status=CallbackDelivery.Status.PROCESSED
    ).exists()
    kinds = event_kinds(task["id"])
    assert "callback" in kinds
    assert kinds.index("callback") < kinds.index("succeeded")


def test_success_by_polling_alone_when_callbacks_are_disabled(
    e2e: Stack, customer: Callable[..., Customer], settings: Any
) -> None:
    # Given callbacks switched off. The upstream submission (which decides whether a
    # webhook_url is sent) runs in the worker, so the worker is the process that must have the
    # setting; this process gets it too so that both agree.
    settings.CALLBACKS_ENABLED = False
    who = customer(10)
    with e2e.worker_env(CALLBACKS_ENABLED="false"):
        before = settled_stats(e2e)

        # When
        created = submit(who)
        task = wait_done(who, created["id"], timeout=20)
        after = sandbox_stats(e2e)

    # Then beat's poller finished it
    assert task["status"] == "SUCCESS", task
    assert_charged_once(task["id"], C)
    row = Task.objects.get(pk=task["id"])
    assert row.poll_count >= 1
    # ... and no callback was asked for, sent, or received
    assert after["by_key"][task["id"]] == 1
    assert after["callbacks_sent"] == before["callbacks_sent"]
    assert after["callbacks_failed"] == before["callbacks_failed"]
    assert not CallbackDelivery.objects.filter(upstream_id=row.upstream_id).exists()
    assert "callback" not in event_kinds(task["id"])


def test_the_production_beat_scheduler_drives_polling(
    e2e: Stack, customer: Callable[..., Customer], settings: Any
) -> None:
    # Given beat on the database scheduler from settings (the harness's own beat paused) and
    # callbacks off, so that only beat's poller can finish the task.
    from django.conf import settings as live_settings
    from django_celery_beat.models import PeriodicTask

    settings.CALLBACKS_ENABLED = False
    who = customer(10)
    with (
        e2e.worker_env(CALLBACKS_ENABLED="false"),
        e2e.production_beat(TASK_POLL_EVERY="1") as log,
    ):
        # When
        created = submit(who)
        task = wait_done(who, created["id"], timeout=30)
        installed = set(PeriodicTask.objects.values_list("task", flat=True))

    # Then it finished by polling, and every scheduled job of settings was installed
    assert task["status"] == "SUCCESS", task
    assert_charged_once(task["id"], C)
    assert Task.objects.get(pk=task["id"]).poll_count >= 1
    wanted = {entry["task"] for entry in live_settings.CELERY_BEAT_SCHEDULE.values()}
    assert wanted <= installed, wanted - installed
    assert "DatabaseScheduler" in log.read_text()
    assert "tasks.poll_due" in log.read_text()


def test_failure_is_refunded(e2e: Stack, customer: Callable[..., Customer]) -> None:
    who = customer(10)

    created = submit(who, sandbox_outcome="fail")
    assert available(who) == 9 * C  # held while it runs
    task = wait_done(who, created["id"])

    assert task["status"] == "FAILED", task
    assert task["error"]["kind"] == "provider"
    assert task["error"]["code"] == "sandbox_failure"
    assert task["results"] == []
    assert (task["credits"]["charged_micro"], task["credits"]["refunded_micro"]) == (0, C)
    assert billing_selectors.balance_for_user(user=who.user) == billing_selectors.Balance(
        balance=10 * C, held=0
    )
    assert captures(task["id"]) == []
    assert Hold.objects.get(subject_type=SUBJECT, subject_id=task["id"]).status == "released"
    assert notification_kinds(task["id"]) == [Notification.Kind.GENERATION_FAILED]


def test_rejection_is_refunded_and_blamed_on_the_input(
    e2e: Stack, customer: Callable[..., Customer]
) -> None:
    who = customer(10)

    task = wait_done(who, submit(who, sandbox_outcome="reject")["id"])

    assert task["status"] == "REJECTED", task
    assert task["error"]["kind"] == "user"
    assert task["error"]["code"] == "content_policy"
    assert (task["credits"]["charged_micro"], task["credits"]["refunded_micro"]) == (0, C)
    assert available(who) == 10 * C
    assert captures(task["id"]) == []
    assert notification_kinds(task["id"]) == [Notification.Kind.GENERATION_REJECTED]


def test_insufficient_credits_never_reach_the_upstream(
    e2e: Stack, customer: Callable[..., Customer]
) -> None:
    # Given a user without credits, and a funded one as a control
    broke, funded = customer(0), customer(10)
    started = time.monotonic()

    # When both submit
    refused = submit(broke, expect=402)
    control = submit(funded)

    # Then the refusal is a stored FAILED task, answered as for GET
    assert refused["status"] == "FAILED"
    assert refused["error"]["code"] == "insufficient_credits"
    assert refused["error"]["kind"] == "user"
    assert get_task(broke, refused["id"]) == refused
    # ... while the pipeline demonstrably works (the control task goes upstream and finishes)
    assert wait_done(funded, control["id"])["status"] == "SUCCESS"
    # ... and the refused one never reaches the sandbox: not soon, and not once the reconciler
    # (every 1 s, resubmitting WAITING tasks older than 3 s) has had its chances.
    # Absence cannot be awaited: these two waits are the only fixed sleeps in this file.
    time.sleep(max(0.0, started + 3 - time.monotonic()))
    assert refused["id"] not in sandbox_stats(e2e)["by_key"]
    time.sleep(2)  # two more reconciler runs past TASK_RESUBMIT_AFTER
    stats = sandbox_stats(e2e)
    assert refused["id"] not in stats["by_key"]
    assert stats["by_key"][control["id"]] == 1
    row = Task.objects.get(pk=refused["id"])
    assert (row.status, row.submit_attempts, row.upstream_id) == ("FAILED", 0, "")
    assert not Hold.objects.filter(subject_type=SUBJECT, subject_id=refused["id"]).exists()
    assert captures(refused["id"]) == []
    assert notification_kinds(refused["id"]) == [Notification.Kind.INSUFFICIENT_CREDITS]
    assert billing_selectors.balance_for_user(user=broke.user).balance == 0


# --- callbacks ------------------------------------------------------------------------------


def test_early_callback_does_not_finish_the_task(
    e2e: Stack, customer: Callable[..., Customer]
) -> None:
    # Given a model that only callbacks can finish within the wait, and a job that calls back
    # once at creation (nothing ready yet) and again when done 1.5 s later
    model = clone_model("sandbox-image", "sandbox-image-early", poll_interval_seconds=600)
    who = customer(10)

    created = submit(who, model.slug, sandbox_callback="early", sandbox_latency_ms=1500)
    task = wait_done(who, created["id"], timeout=15)

    assert task["status"] == "SUCCESS", task
    assert_charged_once(task["id"], C)
    row = Task.objects.get(pk=task["id"])
    # The early callback did not end the task: it ended once the job had had its 1.5 s.
    assert row.finished_at - row.created_at >= timedelta(seconds=1.5)
    # Both deliveries were stored and processed (the early one possibly deferred: a callback
    # may beat our storing of the upstream id)
    wait_for(
        lambda: (
            list(
                CallbackDelivery.objects.filter(upstream_id=row.upstream_id).values_list(
                    "status", flat=True
                )
            )
            == ["processed", "processed"]
        ),
        timeout=10,
        what="both deliveries to be processed",
    )
    events = timeline(task["id"])
    kinds = [e.kind for e in events]
    callback_states = [e.data.get("state") for e in events if e.kind == "callback"]
    assert sorted(callback_states) == ["queued", "succeeded"]
    assert kinds.index("callback") < kinds.index("succeeded")
    assert row.poll_count == 0


def test_twenty_replays_of_a_delivery_after_success_change_nothing(
    e2e: Stack, customer: Callable[..., Customer]
) -> None:
    # Given a finished task whose job sent its final callback 3 times plus 2 more deliveries
    who = customer(10)
    task = wait_done(who, submit(who, sandbox_callback="duplicate")["id"])
    assert task["status"] == "SUCCESS", task
    row = Task.objects.get(pk=task["id"])
    sandbox_deliveries = CallbackDelivery.objects.filter(upstream_id=row.upstream_id)
    wait_for(
        lambda: (
            sandbox_deliveries.count() == 3
            and not sandbox_deliveries.filter(status="pending").exists()
        ),
        timeout=10,
        what="the sandbox's 3 distinct deliveries to be stored and processed",
    )

    # When one correctly signed delivery of the finished job arrives 20 times at once
    job = upstream_job(e2e, row.upstream_id)
    assert job["status"] == "succeeded"
    body, headers = signed_delivery(e2e.secret, job, msg_id="msg_e2e_replayed")
    responses = post_concurrently(callback_url(e2e), body, headers, 20)

    # Then all are acknowledged, one is stored, and nothing about the money changes
    assert [r.status_code for r in responses] == [200] * 20, [r.text for r in responses]
    assert sorted(r.json()["duplicate"] for r in responses) == [False] + [True] * 19
    [stored] = CallbackDelivery.objects.filter(provider="sandbox", event_id="msg_e2e_replayed")
    wait_for(
        lambda: CallbackDelivery.objects.get(pk=stored.pk).status == "processed",
        timeout=10,
        what="the replayed delivery to be processed",
    )
    assert CallbackDelivery.objects.filter(upstream_id=row.upstream_id).count() == 4
    assert get_task(who, task["id"])["credits"]["charged_micro"] == C
    assert_charged_once(task["id"], C)
    assert available(who) == 9 * C


def test_twenty_concurrent_copies_of_the_finishing_delivery_capture_once(
    e2e: Stack, customer: Callable[..., Customer]
) -> None:
    # Given a job that finished upstream but never calls back, on a model polled every 10
    # minutes: our task stays GENERATING until a delivery tells us
    model = clone_model("sandbox-image", "sandbox-image-silent", poll_interval_seconds=600)
    who = customer(10)
    created = submit(who, model.slug, sandbox_callback="none")
    wait_status(who, created["id"], "GENERATING")
    row = Task.objects.get(pk=created["id"])
    job = upstream_job(e2e, row.upstream_id)
    assert job["status"] == "succeeded"

    # When the delivery announcing it arrives 20 times at once
    body, headers = signed_delivery(e2e.secret, job, msg_id=f"msg_{row.upstream_id}_e2e")
    responses = post_concurrently(callback_url(e2e), body, headers, 20)

    # Then one stored delivery finishes the task, once
    assert [r.status_code for r in responses] == [200] * 20, [r.text for r in responses]
    assert sorted(r.json()["duplicate"] for r in responses) == [False] + [True] * 19
    task = wait_done(who, created["id"], timeout=15)
    assert task["status"] == "SUCCESS", task
    assert CallbackDelivery.objects.filter(upstream_id=row.upstream_id).count() == 1
    assert_charged_once(task["id"], C)
    assert available(who) == 9 * C
    wait_for(lambda: len(result_files(e2e, task["id"])) == 1, timeout=5, what="one stored file")


def test_a_stale_callback_after_the_final_one_changes_nothing(
    e2e: Stack, customer: Callable[..., Customer]
) -> None:
    # Given a job whose final callback is followed by a stale "running" one
    who = customer(10)
    task = wait_done(
        who, submit(who, sandbox_callback="out_of_order", sandbox_latency_ms=300)["id"]
    )
    assert task["status"] == "SUCCESS", task
    row = Task.objects.get(pk=task["id"])

    # When both have been processed
    deliveries = CallbackDelivery.objects.filter(upstream_id=row.upstream_id)
    wait_for(
        lambda: deliveries.count() == 2 and not deliveries.filter(status="pending").exists(),
        timeout=10,
        what="both deliveries to be processed",
    )

    # Then the finished task stayed finished, charged once (a late event never reopens it)
    states = [e.data.get("state") for e in timeline(task["id"]) if e.kind == "callback"]
    assert sorted(states) == ["running", "succeeded"]
    assert get_task(who, task["id"]) == task
    assert_charged_once(task["id"], C)


def test_callbacks_and_polls_racing_give_one_outcome_per_task(
    e2e: Stack, customer: Callable[..., Customer]
) -> None:
    # Given a model polled on every beat tick (0.5 s), and 10 jobs finishing at staggered times
    # that each deliver their final callback 3 times plus twice more under new ids
    model = clone_model("sandbox-image", "sandbox-image-fast-poll", poll_interval_seconds=0)
    who = customer(20)

    # When they all run at once
    ids = [
        submit(who, model.slug, sandbox_callback="duplicate", sandbox_latency_ms=300 + 110 * n)[
            "id"
        ]
        for n in range(10)
    ]
    tasks = [wait_done(who, task_id, timeout=30) for task_id in ids]

    # Then every task has exactly one outcome, one capture and one notification
    assert [t["status"] for t in tasks] == ["SUCCESS"] * 10, tasks
    for task_id in ids:
        assert_charged_once(task_id, C)
        # the losers of each race removed the files they had downloaded
        wait_for(lambda t=task_id: len(result_files(e2e, t)) == 1, timeout=10, what="one file")
    assert available(who) == 10 * C
    # ... and both paths really were in play
    rows = Task.objects.filter(pk__in=ids)
    assert sum(r.poll_count for r in rows) > 0
    assert CallbackDelivery.objects.filter(task__in=rows).exists()


def test_forged_and_replayed_callbacks_are_refused(
    e2e: Stack, customer: Callable[..., Customer]
) -> None:
    # Given a task whose job runs for 4 s and never calls back
    who = customer(10)
    created = submit(who, sandbox_latency_ms=4000, sandbox_callback="none")
    wait_status(who, created["id"], "GENERATING")
    row = Task.objects.get(pk=created["id"])
    refused_before = cache.get("callbacks_refused:sandbox") or 0
    # ... and a delivery claiming it succeeded
    claim = dict(
        upstream_job(e2e, row.upstream_id),
        status="succeeded",
        outputs=[{"url": f"{e2e.sandbox_url}/v1/files/{row.upstream_id}/0", "mime": "image/png"}],
    )

    with httpx.Client(trust_env=False, timeout=10) as client:
        # When it is signed with another secret
        body, headers = signed_delivery(new_secret(), claim, msg_id="msg_forged")
        forged = client.post(callback_url(e2e), content=body, headers=headers)
        # ... or correctly signed, but 10 minutes ago
        body, headers = signed_delivery(
            e2e.secret,
            claim,
            msg_id="msg_replayed",
            at=datetime.now(tz=UTC) - timedelta(minutes=10),
        )
        replayed = client.post(callback_url(e2e), content=body, headers=headers)
        # ... or correctly signed over other bytes than those sent
        body, headers = signed_delivery(e2e.secret, claim, msg_id="msg_tampered")
        tampered = client.post(callback_url(e2e), content=body + b" ", headers=headers)

    # Then all are refused, and nothing was stored or changed
    for response in (forged, replayed, tampered):
        assert response.status_code == 401, response.text
        assert response.json()["error"]["code"] == "invalid_signature"
    assert cache.get("callbacks_refused:sandbox") - refused_before == 3
    assert get_task(who, created["id"])["status"] == "GENERATING"
    assert not CallbackDelivery.objects.filter(upstream_id=row.upstream_id).exists()
    assert Hold.objects.get(subject_type=SUBJECT, subject_id=created["id"]).status == "open"
    assert notification_kinds(created["id"]) == []
    # ... and the task still finishes normally, once, when the job really ends
    task = wait_done(who, created["id"], timeout=20)
    assert task["status"] == "SUCCESS", task
    assert_charged_once(task["id"], C)


# --- crashes --------------------------------------------------------------------------------


def test_worker_killed_mid_submit_still_finishes_with_one_upstream_job(
    e2e: Stack, customer: Callable[..., Customer]
) -> None:
    # Given a submission the sandbox accepts at once but answers only 4 s later
    who = customer(10)
    jobs_before = sandbox_stats(e2e)["jobs_created"]
    created = submit(who, sandbox_submit_delay_ms=4000)
    task_id = created["id"]
    wait_for(
        lambda: task_id in sandbox_stats(e2e)["by_key"],
        timeout=10,
        every=0.05,
        what="the job to exist upstream",
    )
    row = Task.objects.get(pk=task_id)
    assert (row.status, row.upstream_id) == ("WAITING", "")  # accepted, id not stored

    # When the worker dies (SIGKILL: no acknowledgement, no cleanup) and another one starts
    try:
        e2e.kill_worker(e2e.live_workers()[-1])
        assert Task.objects.get(pk=task_id).status == "WAITING"
        e2e.start_worker()
    finally:
        e2e.ensure_worker()

    # Then the reconciler resubmits under the same idempotency key: one upstream job, one charge
    task = wait_done(who, task_id, timeout=30)
    assert task["status"] == "SUCCESS", task
    stats = sandbox_stats(e2e)
    assert stats["by_key"][task_id] == 1
    assert stats["jobs_created"] - jobs_before == 1
    row = Task.objects.get(pk=task_id)
    assert row.submit_attempts >= 2
    assert event_kinds(task_id).count("submitted") == 1
    assert_charged_once(task_id, C)


def test_slow_submit_overlapped_by_a_resubmit_keeps_its_upstream_job(
    e2e: Stack, customer: Callable[..., Customer]
) -> None:
    # Given a submission answered only after 5 s, longer than the reconciler waits before it
    # resubmits (3 s): two attempts overlap, and the resubmit (answered at once with the same
    # job, same idempotency key) stores the job first
    who = customer(10)
    created = submit(who, sandbox_submit_delay_ms=5000, sandbox_latency_ms=5500)
    task_id = created["id"]
    wait_status(who, task_id, "GENERATING", timeout=10)
    assert Task.objects.get(pk=task_id).submit_attempts == 2

    # When the first attempt's answer finally arrives, then the job ends
    task = wait_done(who, task_id, timeout=20)

    # Then the late answer for the task's own job changed nothing: the job was not cancelled
    assert task["status"] == "SUCCESS", task
    row = Task.objects.get(pk=task_id)
    assert upstream_job(e2e, row.upstream_id)["status"] == "succeeded"
    assert sandbox_stats(e2e)["by_key"][task_id] == 1
    assert "late_upstream_acceptance" not in event_kinds(task_id)
    assert_charged_once(task_id, C)


# --- media ----------------------------------------------------------------------------------


def test_speech_is_a_wav_of_the_requested_duration(
    e2e: Stack, customer: Callable[..., Customer]
) -> None:
    who = customer(10)

    task = wait_done(who, submit(who, "sandbox-speech", prompt="hello there", duration_s=3)["id"])

    assert task["status"] == "SUCCESS", task
    [result] = task["results"]
    assert (result["mime"], result["duration_ms"]) == ("audio/wav", 3000)
    content_type, data = fetch_result(who, result["url"])
    assert content_type == "audio/wav"
    with wave.open(io.BytesIO(data)) as wav:
        assert wav.getnframes() / wav.getframerate() == pytest.approx(3.0, abs=0.01)
    assert_charged_once(task["id"], 3 * (C // 10))


def test_video_is_a_webm_that_decodes(e2e: Stack, customer: Callable[..., Customer]) -> None:
    who = customer(10)

    task = wait_done(who, submit(who, "sandbox-video", prompt="a red ball", duration_s=2)["id"])

    assert task["status"] == "SUCCESS", task
    [result] = task["results"]
    assert result["mime"] == "video/webm"
    content_type, data = fetch_result(who, result["url"])
    assert content_type == "video/webm"
    with av.open(io.BytesIO(data)) as container:
        [stream] = container.streams.video
        assert stream.codec_context.name in ("vp8", "libvpx")
        frames = list(container.decode(stream))
    assert len(frames) == 20  # 2 s at 10 fps
    assert (frames[0].width, frames[0].height) == (320, 240)
    assert_charged_once(task["id"], 2 * (C // 2))
