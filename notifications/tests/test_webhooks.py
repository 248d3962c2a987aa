"""Outbound webhooks against a real receiver process on loopback (notifications/tests/receiver.py):
signed deliveries that verify with the standardwebhooks library, retries, abort, disabling a
failing endpoint, secret rotation, resend, event filters, the outbox's transaction, and the
SSRF guard. Deliveries run through ``webhooks.webhook_deliver``, the function the Celery task
calls (``deliver_due``); tests/test_e2e_webhooks.py runs them in the real worker."""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection, transaction
from django.utils import timezone
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from notifications import webhooks
from notifications.models import (
    Notification,
    WebhookAttempt,
    WebhookEndpoint,
    WebhookMessage,
)
from notifications.tests.receiver import Receiver
from rivya import safe_http
from tasks import services
from tasks.models import Task
from tasks.tests.lifecycle import run_to_end

pytestmark = pytest.mark.django_db(transaction=True)
S = WebhookMessage.Status


def verify(secret: str, request: dict[str, Any]) -> dict[str, Any]:
    """What a receiver does: the standardwebhooks library checks the raw body and headers."""
    return dict(Webhook(secret).verify(request["body"], request["headers"]))


def record(user: Any, event_type: str = "task.completed", **extra: Any) -> int:
    with transaction.atomic():
        return webhooks.webhook_event_record(
            user_id=user.pk,
            event_type=event_type,
            subject_type="tasks.task",
            subject_id="00000000-0000-0000-0000-000000000001",
            data=lambda: {"id": "00000000-0000-0000-0000-000000000001", "status": "SUCCESS"},
            **extra,
        )


def submit_with_webhook(user: Any, url: str, events: list[str] | None = None) -> Task:
    """An accepted sandbox-image task reporting to ``url`` (``events``: its filter)."""
    outcome = services.task_submit(
        user=user,
        model_slug="sandbox-image",
        prompt="a fox",
        params={},
        webhook_url=url,
        webhook_events=events,
    )
    assert outcome.accepted
    return outcome.task


def endpoint(user: Any, receiver: Receiver, path: str = "/hook", **fields: Any) -> WebhookEndpoint:
    return webhooks.endpoint_create(user=user, url=receiver.url(path), **fields)


# --- the task's own webhook_url, through the lifecycle ------------------------------------------


def test_a_task_sends_started_and_completed_to_its_url_signed_with_the_account_secret(
    sandbox: Any,
    catalog: None,
    funded: Any,
    webhook_receiver: Receiver,
    deliver_due: Any,
    ledger_ok: None,
) -> None:
    user = funded(100)
    task = submit_with_webhook(user, webhook_receiver.url())
    task = run_to_end(task)
    assert task.status == Task.Status.SUCCESS
    assert set(deliver_due().values()) == {S.SUCCEEDED}

    got = webhook_receiver.received()
    secret = webhooks.account_secret(user=user).secret
    payloads = [verify(secret, r) for r in got]
    assert [p["type"] for p in payloads] == ["task.started", "task.completed"]
    completed = payloads[1]
    assert completed["data"]["id"] == str(task.pk)
    assert completed["data"]["status"] == "SUCCESS"
    assert completed["data"]["results"]
    assert completed["data"]["webhook_url"] == webhook_receiver.url()
    assert completed["id"].startswith("evt_")
    message = WebhookMessage.objects.get(event_type="task.completed")
    assert got[1]["headers"]["webhook-id"] == message.webhook_id
    assert message.for_task_url
    assert message.subject_id == str(task.pk)
    # A forged body fails the same check.
    forged = dict(got[1], body=got[1]["body"].replace("SUCCESS", "FAILED"))
    with pytest.raises(WebhookVerificationError):
        verify(secret, forged)


def test_a_failed_or_rejected_task_sends_task_failed_with_its_error(
    sandbox: Any, catalog: None, funded: Any, webhook_receiver: Receiver, deliver_due: Any
) -> None:
    user = funded(100)
    task = submit_with_webhook(user, webhook_receiver.url(), ["failed"])
    services.task_fail(
        task_id=task.pk,
        code="input_rejected",
        message="Bad input.",
        kind="user",
        status=Task.Status.REJECTED,
    )
    deliver_due()
    (request,) = webhook_receiver.received()
    payload = verify(webhooks.account_secret(user=user).secret, request)
    assert payload["type"] == "task.failed"
    assert payload["data"]["status"] == "REJECTED"
    assert payload["data"]["error"]["code"] == "input_rejected"


def test_the_task_filter_sends_only_the_events_it_names(
    sandbox: Any, catalog: None, funded: Any, webhook_receiver: Receiver, deliver_due: Any
) -> None:
    user = funded(100)
    task = submit_with_webhook(user, webhook_receiver.url(), ["completed"])
    run_to_end(task)
    deliver_due()
    types = [json.loads(r["body"])["type"] for r in webhook_receiver.received()]
    assert types == ["task.completed"]


def test_an_endpoint_filter_sends_only_its_event_types(
    funded: Any, webhook_receiver: Receiver, deliver_due: Any
) -> None:
    user = funded(0)
    endpoint(user, webhook_receiver, "/only-failed", event_types=["task.failed"])
    endpoint(user, webhook_receiver, "/all")
    record(user, "task.completed")
    record(user, "task.failed")
    deliver_due()
    assert [json.loads(r["body"])["type"] for r in webhook_receiver.received("/only-failed")] == [
        "task.failed"
    ]
    assert sorted(json.loads(r["body"])["type"] for r in webhook_receiver.received("/all")) == [
        "task.completed",
        "task.failed",
    ]


def test_no_destination_means_no_message_and_no_payload_built(funded: Any) -> None:
    user = funded(0)
    built = []
    with transaction.atomic():
        count = webhooks.webhook_event_record(
            user_id=user.pk,
            event_type="task.completed",
            subject_type="tasks.task",
            subject_id="x",
            data=lambda: built.append(1) or {},
        )
    assert count == 0
    assert built == []
    assert not WebhookMessage.objects.exists()


# --- delivery: retries, abort, disabling -----------------------------------------------------


def test_500_then_200_is_two_attempts_and_a_success_with_the_same_webhook_id(
    funded: Any, webhook_receiver: Receiver, deliver_due: Any
) -> None:
    user = funded(0)
    hook = endpoint(user, webhook_receiver)
    webhook_receiver.script("/hook", {"status": 500, "body": "boom"})
    record(user)
    before = timezone.now()
    assert list(deliver_due().values()) == [S.PENDING]
    message = WebhookMessage.objects.get()
    # The second attempt of Svix's schedule: 5 s after the first.
    assert timedelta(seconds=4) < message.next_attempt_at - before < timedelta(seconds=7)
    assert deliver_due() == {}  # not due yet
    assert list(deliver_due(later=True).values()) == [S.SUCCEEDED]

    message.refresh_from_db()
    attempts = list(message.attempts_made.order_by("number"))
    assert [(a.number, a.status_code, a.succeeded) for a in attempts] == [
        (1, 500, False),
        (2, 200, True),
    ]
    assert attempts[0].response_body == "boom"
    assert attempts[0].error == "HTTP 500"
    assert message.status == S.SUCCEEDED
    assert message.attempts == 2
    got = webhook_receiver.received()
    assert [r["headers"]["webhook-id"] for r in got] == [message.webhook_id] * 2
    for request in got:
        verify(hook.secret, request)


def test_the_schedule_gives_up_after_eight_attempts(
    funded: Any, webhook_receiver: Receiver, deliver_due: Any
) -> None:
    user = funded(0)
    endpoint(user, webhook_receiver)
    webhook_receiver.script("/hook", *[{"status": 503}] * 8)
    record(user)
    statuses = [list(deliver_due(later=True).values()) for _ in range(9)]
    assert statuses == [[S.PENDING]] * 7 + [[S.FAILED], []]
    assert len(webhook_receiver.received()) == len(webhooks.RETRY_SCHEDULE) == 8
    assert WebhookAttempt.objects.count() == 8


def test_abort_message_stops_the_retries(
    funded: Any, webhook_receiver: Receiver, deliver_due: Any
) -> None:
    user = funded(0)
    endpoint(user, webhook_receiver)
    webhook_receiver.script(
        "/hook", {"status": 410, "headers": {"webhook-delivery": "abort-message"}}
    )
    record(user)
    assert list(deliver_due().values()) == [S.ABORTED]
    assert deliver_due(later=True) == {}
    assert len(webhook_receiver.received()) == 1


def test_a_redirect_is_a_failure_and_is_not_followed(
    funded: Any, webhook_receiver: Receiver, deliver_due: Any
) -> None:
    user = funded(0)
    endpoint(user, webhook_receiver, "/moved")
    webhook_receiver.script(
        "/moved", {"status": 307, "headers": {"Location": webhook_receiver.url("/elsewhere")}}
    )
    record(user)
    assert list(deliver_due().values()) == [S.PENDING]
    assert webhook_receiver.received("/elsewhere") == []
    assert "redirects are not followed" in WebhookAttempt.objects.get().error


def test_a_slow_receiver_times_out_and_a_long_answer_is_cut(
    funded: Any, webhook_receiver: Receiver, deliver_due: Any, settings: Any
) -> None:
    settings.WEBHOOK_TIMEOUT_SECONDS = 0.5
    settings.WEBHOOK_MAX_RESPONSE_BYTES = 2000
    user = funded(0)
    endpoint(user, webhook_receiver, "/slow")
    endpoint(user, webhook_receiver, "/long")
    webhook_receiver.script("/slow", {"status": 200, "delay": 2})
    webhook_receiver.script("/long", {"status": 500, "body": "x" * 100_000})
    record(user)
    deliver_due()
    slow = WebhookAttempt.objects.get(url__endswith="/slow")
    assert not slow.succeeded
    assert slow.status_code is None
    assert "Timeout" in slow.error
    long = WebhookAttempt.objects.get(url__endswith="/long")
    assert long.status_code == 500
    assert len(long.response_body) == webhooks.STORED_BODY_CHARS


def test_an_endpoint_failing_for_five_days_is_disabled_and_its_owner_told(
    funded: Any, webhook_receiver: Receiver, deliver_due: Any
) -> None:
    user = funded(0)
    hook = endpoint(user, webhook_receiver)
    webhook_receiver.script("/hook", {"status": 500}, {"status": 500})
    record(user)
    deliver_due()
    hook.refresh_from_db()
    assert hook.enabled
    assert hook.failing_since is not None

    # Every delivery has failed since five days ago: the next failure disables it.
    WebhookEndpoint.objects.filter(pk=hook.pk).update(
        failing_since=timezone.now() - timedelta(days=5, seconds=1)
    )
    deliver_due(later=True)
    hook.refresh_from_db()
    assert not hook.enabled
    assert "5 days" in hook.disabled_reason
    note = Notification.objects.get(user=user, kind=Notification.Kind.WEBHOOK_ENDPOINT_DISABLED)
    assert hook.url in note.body
    # Nothing more goes to it: its pending retry ends without an attempt, new events skip it.
    assert list(deliver_due(later=True).values()) == [S.FAILED]
    assert record(user) == 0
    assert len(webhook_receiver.received()) == 2


def test_a_success_clears_the_failure_record(
    funded: Any, webhook_receiver: Receiver, deliver_due: Any
) -> None:
    user = funded(0)
    hook = endpoint(user, webhook_receiver)
    webhook_receiver.script("/hook", {"status": 500})
    record(user)
    deliver_due()
    deliver_due(later=True)
    hook.refresh_from_db()
    assert hook.enabled
    assert hook.failing_since is None


# --- secrets, resend, the outbox's transaction --------------------------------------------------


def test_during_a_rotation_both_secrets_verify_and_after_it_only_the_new(
    funded: Any, webhook_receiver: Receiver, deliver_due: Any, api_for: Any
) -> None:
    user = funded(0)
    api = api_for(user)
    created = api.post(
        "/api/v1/webhooks/endpoints/", {"url": webhook_receiver.url()}, format="json"
    )
    assert created.status_code == 201
    old = created.json()["secret"]
    rotated = api.post(f"/api/v1/webhooks/endpoints/{created.json()['id']}/rotate-secret/")
    new = rotated.json()["secret"]
    assert new != old
    assert new.startswith("whsec_")
    record(user)
    deliver_due()
    (request,) = webhook_receiver.received()
    assert len(request["headers"]["webhook-signature"].split()) == 2
    verify(old, request)
    verify(new, request)

    WebhookEndpoint.objects.update(previous_until=timezone.now() - timedelta(seconds=1))
    webhook_receiver.reset()
    record(user, "task.failed")
    deliver_due()
    (request,) = webhook_receiver.received()
    verify(new, request)
    with pytest.raises(WebhookVerificationError):
        verify(old, request)


def test_the_account_secret_is_created_on_first_read_and_rotates(funded: Any, api_for: Any) -> None:
    api = api_for(funded(0))
    first = api.get("/api/v1/webhooks/secret/").json()
    assert first["secret"].startswith("whsec_")
    assert first["previous_valid_until"] is None
    assert api.get("/api/v1/webhooks/secret/").json()["secret"] == first["secret"]
    rotated = api.post("/api/v1/webhooks/secret/rotate/").json()
    assert rotated["secret"] != first["secret"]
    assert rotated["previous_valid_until"]


def test_resend_sends_a_succeeded_message_again_with_the_same_id(
    funded: Any, webhook_receiver: Receiver, deliver_due: Any, api_for: Any
) -> None:
    user = funded(0)
    api = api_for(user)
    endpoint(user, webhook_receiver)
    record(user)
    deliver_due()
    message = WebhookMessage.objects.get()
    assert message.status == S.SUCCEEDED
    answer = api.post(f"/api/v1/webhooks/messages/{message.pk}/resend/")
    assert answer.status_code == 202
    assert answer.json()["status"] == "pending"
    deliver_due()
    detail = api.get(f"/api/v1/webhooks/messages/{message.pk}/").json()
    assert detail["status"] == "succeeded"
    assert [(a["number"], a["trigger"]) for a in detail["attempts_made"]] == [
        (1, "scheduled"),
        (2, "resend"),
    ]
    got = webhook_receiver.received()
    assert [r["headers"]["webhook-id"] for r in got] == [message.webhook_id] * 2


def test_an_event_of_a_rolled_back_transaction_is_never_sent(
    funded: Any, webhook_receiver: Receiver, deliver_due: Any
) -> None:
    user = funded(0)
    endpoint(user, webhook_receiver)

    def change_that_fails() -> None:
        with transaction.atomic():
            assert record(user) == 1
            raise RuntimeError("the change failed")

    with pytest.raises(RuntimeError):
        change_that_fails()
    assert not WebhookMessage.objects.exists()
    assert deliver_due() == {}
    assert webhook_receiver.received() == []


def test_a_message_held_by_a_dead_worker_is_sent_once_its_lease_runs_out(
    funded: Any, webhook_receiver: Receiver, deliver_due: Any
) -> None:
    user = funded(0)
    endpoint(user, webhook_receiver)
    record(user)
    message = WebhookMessage.objects.get()
    # A worker took it and died before sending (or before recording the answer).
    WebhookMessage.objects.filter(pk=message.pk).update(
        status=S.SENDING, lease_until=timezone.now() + timedelta(seconds=60)
    )
    assert deliver_due() == {}  # held: not sent twice at once
    WebhookMessage.objects.filter(pk=message.pk).update(
        lease_until=timezone.now() - timedelta(seconds=1)
    )
    assert deliver_due() == {str(message.pk): S.SUCCEEDED}
    assert len(webhook_receiver.received()) == 1


# --- the API: ownership and bad input -------------------------------------------------------------


def test_endpoints_and_messages_are_the_callers_own(
    funded: Any, webhook_receiver: Receiver, deliver_due: Any, api_for: Any
) -> None:
    owner, other = funded(0), funded(0)
    hook = endpoint(owner, webhook_receiver)
    record(owner)
    message = WebhookMessage.objects.get()
    api = api_for(other)
    assert api.get(f"/api/v1/webhooks/endpoints/{hook.pk}/").status_code == 404
    assert (
        api.patch(
            f"/api/v1/webhooks/endpoints/{hook.pk}/", {"enabled": False}, format="json"
        ).status_code
        == 404
    )
    assert api.delete(f"/api/v1/webhooks/endpoints/{hook.pk}/").status_code == 404
    assert api.post(f"/api/v1/webhooks/endpoints/{hook.pk}/rotate-secret/").status_code == 404
    assert api.get(f"/api/v1/webhooks/messages/{message.pk}/").status_code == 404
    assert api.post(f"/api/v1/webhooks/messages/{message.pk}/resend/").status_code == 404
    assert api.get("/api/v1/webhooks/endpoints/").json()["results"] == []
    assert api.get("/api/v1/webhooks/messages/").json()["results"] == []
    mine = api_for(owner).get("/api/v1/webhooks/endpoints/").json()["results"]
    assert [e["id"] for e in mine] == [str(hook.pk)]
    assert "secret" not in mine[0]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"url": 12}, "url"),
        ({"url": "ftp://example.com/x"}, "url"),
        ({"url": "https://93.184.216.34/x", "event_types": ["task.exploded"]}, "event_types"),
        ({"url": "https://93.184.216.34/x", "event_types": "task.failed"}, "event_types"),
        ({"url": "https://93.184.216.34/x", "description": ["x"]}, "description"),
        ({"url": "https://93.184.216.34/x", "secret": "mine"}, "secret"),
    ],
)
def test_bad_endpoint_input_is_a_400_with_the_field(
    funded: Any, api_for: Any, body: dict[str, Any], field: str
) -> None:
    answer = api_for(funded(0)).post("/api/v1/webhooks/endpoints/", body, format="json")
    assert answer.status_code == 400
    assert field in answer.json()["error"]["fields"]
    assert not WebhookEndpoint.objects.exists()


def test_patch_changes_an_endpoint_and_enabling_clears_its_failures(
    funded: Any, webhook_receiver: Receiver, api_for: Any
) -> None:
    user = funded(0)
    hook = endpoint(user, webhook_receiver)
    WebhookEndpoint.objects.filter(pk=hook.pk).update(
        enabled=False, failing_since=timezone.now(), disabled_reason="x"
    )
    answer = api_for(user).patch(
        f"/api/v1/webhooks/endpoints/{hook.pk}/",
        {"enabled": True, "event_types": ["task.completed"], "description": "prod"},
        format="json",
    )
    assert answer.status_code == 200
    body = answer.json()
    assert body["enabled"]
    assert body["failing_since"] is None
    assert body["disabled_reason"] == ""
    assert body["event_types"] == ["task.completed"]
    assert body["description"] == "prod"


# --- the SSRF guard ------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "code"),
    [
        ("127.0.0.1", "loopback"),
        ("[::1]", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("[fc00::1]", "private"),
        ("169.254.169.254", "metadata"),
        ("[fd00:ec2::254]", "metadata"),
        ("100.100.100.200", "metadata"),
        ("169.254.1.1", "link_local"),
        ("[fe80::1]", "link_local"),
        ("100.64.0.1", "not_global"),
        ("0.0.0.0", "unspecified"),  # noqa: S104 - the address refused
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("[::ffff:127.0.0.1]", "ipv4_mapped"),
        ("[2002:7f00:1::]", "embedded_ipv4"),  # 6to4 around 127.0.0.1
        ("[2002:a9fe:a9fe::]", "embedded_ipv4"),  # 6to4 around 169.254.169.254
        ("[2001:0:4136:e378:8000:63bf:3fff:fdd2]", "embedded_ipv4"),  # Teredo, 192.0.2.45
        ("[fec0::1]", "private"),  # site-local
        ("192.88.99.1", "reserved"),
        ("localhost", "loopback"),
    ],
)
def test_each_private_address_class_is_refused(settings: Any, address: str, code: str) -> None:
    settings.WEBHOOK_ALLOW_PRIVATE = False
    with pytest.raises(safe_http.UnsafeDestination) as refused:
        safe_http.check_destination(
            f"https://{address}/hook", allow_http=False, allow_private=False
        )
    assert refused.value.code == f"address_{code}"


def test_urls_that_are_not_plain_https_are_refused() -> None:
    for url, code in [
        ("http://example.com/x", "url_scheme"),
        ("file:///etc/passwd", "url_scheme"),
        ("https://user:pw@example.com/x", "invalid_url"),
        ("https:///x", "invalid_url"),
        ("https://example.com:99999/x", "invalid_url"),
        ("https://exa mple.com/x", "invalid_url"),
        ("https://" + "a" * 2001, "invalid_url"),
    ]:
        with pytest.raises(safe_http.UnsafeDestination) as refused:
            safe_http.check_url(url, allow_http=False)
        assert refused.value.code == code, url


def test_a_private_url_is_a_400_for_an_endpoint_and_for_a_task(
    funded: Any, catalog: None, api_for: Any, settings: Any
) -> None:
    settings.WEBHOOK_ALLOW_PRIVATE = False
    settings.WEBHOOK_ALLOW_HTTP = False
    user = funded(10)
    api = api_for(user)
    answer = api.post(
        "/api/v1/webhooks/endpoints/", {"url": "https://127.0.0.1/hook"}, format="json"
    )
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "webhook_url_refused"
    task = api.post(
        "/api/v1/tasks/",
        {
            "model": "sandbox-image",
            "prompt": "a fox",
            "webhook_url": "https://169.254.169.254/latest",
        },
        format="json",
    )
    assert task.status_code == 400
    assert task.json()["error"]["code"] == "webhook_url_refused"
    events = api.post(
        "/api/v1/tasks/",
        {"model": "sandbox-image", "prompt": "a fox", "webhook_events": ["completed"]},
        format="json",
    )
    assert events.status_code == 400
    assert "webhook_events" in events.json()["error"]["fields"]
    assert not Task.objects.exists()


def test_a_host_that_resolves_elsewhere_at_connect_time_is_refused(
    funded: Any, webhook_receiver: Receiver, deliver_due: Any, settings: Any, monkeypatch: Any
) -> None:
    """DNS rebinding: public when the URL was checked, loopback when the delivery connects."""
    settings.WEBHOOK_ALLOW_PRIVATE = False
    port = webhook_receiver.url().split(":")[2].split("/")[0]
    answers = iter([["93.184.216.34"]])
    monkeypatch.setattr(
        safe_http, "resolve", lambda host, port, timeout: next(answers, ["127.0.0.1"])
    )
    user = funded(0)
    webhooks.endpoint_create(user=user, url=f"http://rebinding.example:{port}/hook")
    record(user)
    assert list(deliver_due().values()) == [S.PENDING]
    attempt = WebhookAttempt.objects.get()
    assert attempt.status_code is None
    assert "does not resolve to a public address" in attempt.error
    assert webhook_receiver.received() == []


def test_a_single_task_sends_single_completed(
    sandbox: Any,
    catalog: None,
    funded: Any,
    api_for: Any,
    webhook_receiver: Receiver,
    deliver_due: Any,
) -> None:
    user = funded(10)
    hook = endpoint(user, webhook_receiver, "/single", event_types=["single.completed"])
    answer = api_for(user).post(
        "/api/v1/single/translation/",
        {"text": "good morning", "source_language": "en", "target_language": "hi"},
        format="json",
    )
    assert answer.status_code == 200, answer.content
    deliver_due()
    (request,) = webhook_receiver.received("/single")
    payload = verify(hook.secret, request)
    assert payload["type"] == "single.completed"
    assert payload["data"]["id"] == answer.json()["task_id"]
    assert payload["data"]["status"] == "SUCCESS"
    assert payload["data"]["single_type"] == "translation"


# --- operations --------------------------------------------------------------------------------


def test_deliveries_go_to_their_own_queue_and_make_run_serves_it(
    settings: Any, monkeypatch: Any
) -> None:
    import importlib.util
    from pathlib import Path

    from rivya.celery import app

    path = Path(__file__).resolve().parents[2] / "bin" / "dev.py"
    spec = importlib.util.spec_from_file_location("rivya_dev", path)
    assert spec is not None
    assert spec.loader is not None
    dev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dev)
    monkeypatch.setenv("SANDBOX_WEBHOOK_SECRET", settings.SANDBOX_WEBHOOK_SECRET)  # it sets it
    route = app.amqp.router.route({}, "notifications.deliver_webhook")
    assert route["queue"].name == "webhooks"
    assert app.amqp.router.route({}, "tasks.submit")["queue"].name == "celery"
    workers = [argv for _, argv in dev.commands(settings) if "worker" in argv]
    assert any(
        "--queues" in argv and argv[argv.index("--queues") + 1] == "webhooks" for argv in workers
    )
    assert any("--queues" not in argv for argv in workers)  # the default queue's worker


def test_finished_messages_are_purged_after_the_retention(
    funded: Any, webhook_receiver: Receiver, deliver_due: Any, settings: Any
) -> None:
    user = funded(0)
    endpoint(user, webhook_receiver)
    webhook_receiver.script("/hook", {"status": 500})
    record(user)
    record(user)
    deliver_due()  # one answered 500 (pending, its retry due in 5 s), the other 200
    old = timezone.now() - settings.WEBHOOK_RETENTION - timedelta(seconds=1)
    WebhookMessage.objects.update(finished_at=old, created_at=old)
    assert webhooks.webhooks_purge() == 1
    (left,) = WebhookMessage.objects.all()
    assert left.status == S.PENDING
    assert WebhookAttempt.objects.filter(message=left).count() == 1


# --- after the review: deadlines, leases, inputs, every event ---------------------------------


def test_a_receiver_trickling_its_answer_cannot_hold_an_attempt_past_the_deadline(
    funded: Any, webhook_receiver: Receiver, deliver_due: Any, settings: Any
) -> None:
    settings.WEBHOOK_TIMEOUT_SECONDS = 1.0
    user = funded(0)
    endpoint(user, webhook_receiver, "/trickle")
    webhook_receiver.script("/trickle", {"status": 200, "trickle": 0.2})  # ~8 s for the answer
    record(user)
    started = time.monotonic()
    assert list(deliver_due().values()) == [S.PENDING]
    assert time.monotonic() - started < 3
    attempt = WebhookAttempt.objects.get()
    assert not attempt.succeeded
    assert "did not answer within 1 s" in attempt.error


def test_a_worker_that_outlived_its_lease_does_not_record_over_the_one_that_took_over(
    funded: Any, webhook_receiver: Receiver, deliver_due: Any
) -> None:
    user = funded(0)
    endpoint(user, webhook_receiver, "/slow")
    webhook_receiver.script("/slow", {"status": 500, "delay": 2}, {"status": 200})
    record(user)
    message = WebhookMessage.objects.get()
    first: dict[str, str] = {}

    def worker_a() -> None:
        try:
            first["status"] = webhooks.webhook_deliver(message_id=message.pk)
        finally:
            connection.close()

    thread = threading.Thread(target=worker_a)
    thread.start()
    webhook_receiver.wait_for(1, "/slow")  # A is waiting on the receiver
    # A's lease runs out (here at once); B takes the message and succeeds.
    WebhookMessage.objects.filter(pk=message.pk).update(
        lease_until=timezone.now() - timedelta(seconds=1)
    )
    assert webhooks.webhook_deliver(message_id=message.pk) == S.SUCCEEDED
    thread.join(timeout=30)
    assert first["status"] == ""  # A's 500 is not recorded over B's success
    message.refresh_from_db()
    assert message.status == S.SUCCEEDED
    assert message.attempts == 1
    assert [(a.number, a.status_code) for a in message.attempts_made.all()] == [(1, 200)]


def test_each_retry_waits_as_long_as_the_schedule_says(
    funded: Any, webhook_receiver: Receiver, deliver_due: Any
) -> None:
    user = funded(0)
    endpoint(user, webhook_receiver)
    webhook_receiver.script("/hook", *[{"status": 500}] * 7)
    record(user)
    waits = []
    for _ in range(7):
        before = timezone.now()
        deliver_due(later=True)
        message = WebhookMessage.objects.get()
        waits.append(round((message.next_attempt_at - before).total_seconds()))
    assert waits == [5, 300, 1800, 7200, 18000, 36000, 36000]
    assert [d.total_seconds() for d in webhooks.RETRY_SCHEDULE] == [0, *waits]


def test_cancelled_and_expiring_tasks_send_their_events(
    sandbox: Any, catalog: None, funded: Any, webhook_receiver: Receiver, deliver_due: Any
) -> None:
    user = funded(100)
    url = webhook_receiver.url("/events")
    cancelled = submit_with_webhook(user, url)
    services.task_cancel(task_id=cancelled.pk, actor=user)
    done = submit_with_webhook(user, url, ["expiring"])
    run_to_end(done)
    Task.objects.filter(pk=done.pk).update(expires_at=timezone.now() + timedelta(hours=1))
    assert services.results_warn_expiring() == 1
    deliver_due()
    found = {
        (json.loads(r["body"])["type"], json.loads(r["body"])["data"]["id"])
        for r in webhook_receiver.received("/events")
    }
    assert found == {("task.cancelled", str(cancelled.pk)), ("task.expiring", str(done.pk))}


def test_an_outcome_that_rolls_back_records_no_event(
    sandbox: Any, catalog: None, funded: Any, webhook_receiver: Receiver, deliver_due: Any
) -> None:
    user = funded(100)
    task = submit_with_webhook(user, webhook_receiver.url())

    def fail_then_roll_back() -> None:
        with transaction.atomic():
            assert services.task_fail(task_id=task.pk, code="x", message="x", kind="provider")
            raise RuntimeError("the transaction of the outcome fails after it")

    with pytest.raises(RuntimeError):
        fail_then_roll_back()
    task.refresh_from_db()
    assert task.status == Task.Status.WAITING
    assert not WebhookMessage.objects.exists()
    assert deliver_due() == {}


def test_a_task_url_delivery_is_signed_with_both_account_secrets_during_a_rotation(
    funded: Any, webhook_receiver: Receiver, deliver_due: Any, api_for: Any
) -> None:
    user = funded(0)
    api = api_for(user)
    old = api.get("/api/v1/webhooks/secret/").json()["secret"]
    new = api.post("/api/v1/webhooks/secret/rotate/").json()["secret"]
    record(user, task_url=webhook_receiver.url())
    deliver_due()
    (request,) = webhook_receiver.received()
    verify(old, request)
    verify(new, request)


@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    [
        ("post", "/api/v1/webhooks/endpoints/", {"url": "https://93.184.216.34/ä"}, "url"),
        ("post", "/api/v1/webhooks/endpoints/", {"url": "https://93.184.216.34:0/x"}, "url"),
        ("post", "/api/v1/webhooks/endpoints/", {"url": "https://93.184.216.34/x\x7f"}, "url"),
        (
            "post",
            "/api/v1/webhooks/endpoints/",
            {"url": "https://93.184.216.34/x", "description": "a\x00b"},
            "description",
        ),
        ("get", "/api/v1/webhooks/messages/?status=%00", None, "status"),
        ("get", "/api/v1/webhooks/messages/?status=done", None, "status"),
    ],
)
def test_more_bad_input_is_a_400(
    funded: Any, api_for: Any, method: str, path: str, body: Any, field: str
) -> None:
    answer = getattr(api_for(funded(0)), method)(path, body, format="json")
    assert answer.status_code == 400, answer.content
    assert field in answer.json()["error"]["fields"]
    assert not WebhookEndpoint.objects.exists()


def test_an_account_has_at_most_so_many_endpoints(funded: Any, api_for: Any, settings: Any) -> None:
    settings.WEBHOOK_MAX_ENDPOINTS = 2
    api = api_for(funded(0))
    answers = [
        api.post(
            "/api/v1/webhooks/endpoints/", {"url": f"https://93.184.216.34/{n}"}, format="json"
        )
        for n in range(3)
    ]
    assert [a.status_code for a in answers] == [201, 201, 400]
    assert answers[2].json()["error"]["code"] == "too_many_endpoints"


def test_the_metadata_address_is_refused_even_where_private_ones_are_allowed(
    settings: Any,
) -> None:
    with pytest.raises(safe_http.UnsafeDestination) as refused:
        safe_http.check_destination(
            "http://169.254.169.254/latest/meta-data/", allow_http=True, allow_private=True
        )
    assert refused.value.code == "address_metadata"


@pytest.mark.parametrize(("debug", "expected"), [("0", [False, False]), ("1", [True, True])])
def test_private_and_http_receivers_are_allowed_only_under_debug(
    debug: str, expected: list[bool]
) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if not k.startswith("WEBHOOK_") and k != "DEBUG"}
    code = (
        "import json, django; django.setup(); from django.conf import settings; "
        "print(json.dumps([settings.WEBHOOK_ALLOW_PRIVATE, settings.WEBHOOK_ALLOW_HTTP]))"
    )
    done = subprocess.run(  # noqa: S603 - our own interpreter and code
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[2],
        env={**env, "DEBUG": debug, "DJANGO_SETTINGS_MODULE": "rivya.settings"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(done.stdout.strip().splitlines()[-1]) == expected
