"""Outbound webhooks: events recorded in the transaction of the change they report (an outbox),
then delivered by Celery, signed (Standard Webhooks), retried on Svix's schedule, replayable.
docs/webhooks.md is the contract; this module owns its rules (which event a task's change is,
is ``tasks.services.common.task_webhook_event``'s; the address checks are ``rivya.safe_http``'s):

- which destinations an event goes to (``webhook_event_record``);
- the secrets (``account_secret``, ``endpoint_create``, ``secret_rotate``) and the signature
  (``signature_header``);
- one delivery attempt and what follows it (``webhook_deliver``): success, the next attempt of
  ``RETRY_SCHEDULE``, giving up, an abort asked by the receiver, an endpoint failing for
  ``WEBHOOK_DISABLE_AFTER`` disabled and its owner notified;
- resending a message (``webhook_resend``) and finding messages whose queued delivery was lost
  (``webhooks_due``).
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone
from standardwebhooks import Webhook

from notifications.models import (
    AccountWebhookSecret,
    Notification,
    SigningSecret,
    WebhookAttempt,
    WebhookEndpoint,
    WebhookMessage,
)
from notifications.services import notification_create
from rivya import safe_http
from rivya.errors import NotFound, ValidationFailed, contains_nul

# Delay before each attempt (Svix's schedule): at once, then 5 s, 5 min, 30 min, 2 h, 5 h,
# 10 h and 10 h after the attempt before. Eight attempts, over about 27.6 hours.
RETRY_SCHEDULE: tuple[timedelta, ...] = (
    timedelta(0),
    timedelta(seconds=5),
    timedelta(minutes=5),
    timedelta(minutes=30),
    timedelta(hours=2),
    timedelta(hours=5),
    timedelta(hours=10),
    timedelta(hours=10),
)
# A retry due this soon is queued with a countdown; later ones are found by the beat sweep,
# which leaves alone what became due less than SWEEP_GRACE ago (it is in the queue already).
QUEUE_AHEAD = timedelta(seconds=60)
SWEEP_GRACE = timedelta(seconds=30)
LEASE_MARGIN_S = 30  # a worker's hold on a message: the attempt's deadline plus this

# The event types; a task's own filter uses the short names (the part after "task.").
TASK_EVENTS = ("started", "completed", "failed", "cancelled", "expiring")
EVENT_TYPES = (
    *(f"task.{name}" for name in TASK_EVENTS),
    "chat.message.completed",
    "single.completed",
)
ABORT_HEADER = "webhook-delivery"
ABORT_VALUE = "abort-message"
STORED_BODY_CHARS = 1000
log = logging.getLogger(__name__)
Status = WebhookMessage.Status


def allow_http() -> bool:
    return bool(settings.WEBHOOK_ALLOW_HTTP)


def allow_private() -> bool:
    return bool(settings.WEBHOOK_ALLOW_PRIVATE)


# --- checks of what a user gives ----------------------------------------------------------------


def check_webhook_url(url: Any, field: str = "url") -> str:
    """The URL, if webhooks may be sent to it now (form, scheme, every address it resolves to);
    ValidationFailed (400, ``code`` ``webhook_url_refused``) otherwise."""
    try:
        return safe_http.check_destination(
            url, allow_http=allow_http(), allow_private=allow_private()
        )
    except safe_http.UnsafeDestination as exc:
        raise ValidationFailed(
            {field: [exc.message]}, message=exc.message, code="webhook_url_refused"
        ) from None


def check_event_types(value: Any, *, field: str, names: Sequence[str]) -> list[str]:
    """A list of distinct names from ``names`` (empty is allowed); ValidationFailed otherwise."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValidationFailed({field: ["Give a list of event names."]})
    unknown = sorted(set(value) - set(names))
    if unknown:
        raise ValidationFailed(
            {field: [f"Unknown event(s) {', '.join(unknown)}; known: {', '.join(names)}."]}
        )
    return sorted(set(value), key=list(names).index)


def check_description(value: Any) -> str:
    """An endpoint's description: text of at most 200 characters."""
    if not isinstance(value, str) or len(value) > 200 or contains_nul(value):
        raise ValidationFailed({"description": ["Text of at most 200 characters."]})
    return value


def check_task_webhook(url: Any, events: Any) -> tuple[str, list[str]]:
    """A task's ``webhook_url`` and ``webhook_events`` as given at creation: ("", []) for none.
    Events without a URL are refused (they would go nowhere)."""
    if url in (None, ""):
        if events not in (None, []):
            raise ValidationFailed({"webhook_events": ["Give webhook_url too."]})
        return "", []
    return check_webhook_url(url, "webhook_url"), check_event_types(
        events, field="webhook_events", names=TASK_EVENTS
    )


# --- secrets ------------------------------------------------------------------------------------


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def account_secret(*, user: Any) -> AccountWebhookSecret:
    """The account's default signing secret, created on first use."""
    row, _ = AccountWebhookSecret.objects.get_or_create(
        user_id=user.pk, defaults={"secret": new_secret()}
    )
    return row


def secret_rotate(row: SigningSecret) -> SigningSecret:
    """A new secret; the old one keeps signing beside it for ``WEBHOOK_SECRET_OVERLAP``."""
    now = timezone.now()
    with transaction.atomic():
        locked = type(row).objects.select_for_update().get(pk=row.pk)
        locked.previous_secret = locked.secret
        locked.previous_until = now + settings.WEBHOOK_SECRET_OVERLAP
        locked.secret = new_secret()
        locked.rotated_at = now
        locked.save(update_fields=["previous_secret", "previous_until", "secret", "rotated_at"])
    return locked


def signing_secrets(row: SigningSecret, now: datetime) -> list[str]:
    """The secrets a delivery is signed with now: the current one, and the previous one during
    its overlap."""
    found = [row.secret]
    if row.previous_secret and row.previous_until and row.previous_until > now:
        found.append(row.previous_secret)
    return found


def signature_header(secrets_: Sequence[str], webhook_id: str, at: datetime, body: str) -> str:
    """``webhook-signature``: one ``v1,<base64>`` per secret, space-separated."""
    return " ".join(Webhook(s).sign(webhook_id, at, body) for s in secrets_)


# --- endpoints ------------------------------------------------------------------------------------


def endpoint_create(
    *, user: Any, url: Any, description: Any = "", event_types: Any = None
) -> WebhookEndpoint:
    check_description(description)
    if WebhookEndpoint.objects.filter(user=user).count() >= settings.WEBHOOK_MAX_ENDPOINTS:
        raise ValidationFailed(
            {"url": [f"An account has at most {settings.WEBHOOK_MAX_ENDPOINTS} endpoints."]},
            code="too_many_endpoints",
        )
    types = check_event_types(event_types, field="event_types", names=EVENT_TYPES)
    return WebhookEndpoint.objects.create(
        user=user,
        url=check_webhook_url(url),  # last: it resolves the host
        description=description,
        event_types=types,
        secret=new_secret(),
    )


def endpoint_for_user(*, user: Any, endpoint_id: Any) -> WebhookEndpoint:
    try:
        return WebhookEndpoint.objects.get(pk=uuid.UUID(str(endpoint_id)), user=user)
    except (WebhookEndpoint.DoesNotExist, ValueError):
        raise NotFound("No such webhook endpoint.") from None


def endpoint_update(*, endpoint: WebhookEndpoint, changes: dict[str, Any]) -> WebhookEndpoint:
    """Change what is given of url, description, event_types, enabled. Enabling a disabled
    endpoint clears its failure record."""
    unknown = sorted(set(changes) - {"url", "description", "event_types", "enabled"})
    if unknown:
        raise ValidationFailed({k: ["Unknown field."] for k in unknown})
    fields = []
    if "description" in changes:
        endpoint.description = check_description(changes["description"])
        fields.append("description")
    if "event_types" in changes:
        endpoint.event_types = check_event_types(
            changes["event_types"], field="event_types", names=EVENT_TYPES
        )
        fields.append("event_types")
    if "enabled" in changes:
        if not isinstance(changes["enabled"], bool):
            raise ValidationFailed({"enabled": ["Must be true or false."]})
        if changes["enabled"] and not endpoint.enabled:
            endpoint.failing_since = None
            endpoint.disabled_reason = ""
            fields += ["failing_since", "disabled_reason"]
        endpoint.enabled = changes["enabled"]
        fields.append("enabled")
    if "url" in changes:  # last: it resolves the host
        endpoint.url = check_webhook_url(changes["url"])
        fields.append("url")
    if fields:
        endpoint.save(update_fields=[*fields, "updated_at"])
    return endpoint


def endpoint_delete(*, endpoint: WebhookEndpoint) -> None:
    """Remove the endpoint; its messages stay (listed, not sent: ``webhook_deliver``)."""
    endpoint.delete()


# --- recording events (in the caller's transaction) --------------------------------------------


def _task_url_takes(event_type: str, task_events: Sequence[str]) -> bool:
    short = event_type.removeprefix("task.")
    return short in TASK_EVENTS and (not task_events or short in task_events)


def _endpoints_for(user_id: Any, event_type: str) -> list[WebhookEndpoint]:
    """The user's enabled endpoints that take ``event_type`` (an account has a handful; the
    filter on the JSON list is done here, as SQLite cannot do it in the database)."""
    endpoints = WebhookEndpoint.objects.filter(user_id=user_id, enabled=True).only(
        "id", "url", "event_types"
    )
    return [e for e in endpoints if not e.event_types or event_type in e.event_types]


def webhook_event_record(
    *,
    user_id: Any,
    event_type: str,
    subject_type: str,
    subject_id: Any,
    data: Callable[[], dict[str, Any]],
    task_url: str = "",
    task_events: Sequence[str] = (),
) -> int:
    """Record an event for each destination that takes it: the enabled endpoints subscribed to
    ``event_type``, and the task's own ``task_url`` (if ``task_events`` is empty or names it).
    Must run inside the transaction of the change it reports (it commits or rolls back with
    it); delivery is queued after commit. ``data`` builds the payload's ``data`` (the object in
    its API shape, as it is now), only if there is a destination. Returns how many messages."""
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {event_type!r}")
    endpoints = _endpoints_for(user_id, event_type)
    to_task_url = bool(task_url) and _task_url_takes(event_type, task_events)
    if not endpoints and not to_task_url:
        return 0
    now = timezone.now()
    event_id = f"evt_{uuid.uuid4().hex}"
    payload = {
        "type": event_type,
        "id": event_id,
        "created_at": now.isoformat().replace("+00:00", "Z"),
        "data": data(),
    }
    common = {
        "event_id": event_id,
        "event_type": event_type,
        "user_id": user_id,
        "subject_type": subject_type,
        "subject_id": str(subject_id),
        "payload": payload,
        "next_attempt_at": now,
    }
    messages = [WebhookMessage(endpoint=e, url=e.url, **common) for e in endpoints]
    if to_task_url:
        messages.append(WebhookMessage(endpoint=None, for_task_url=True, url=task_url, **common))
    WebhookMessage.objects.bulk_create(messages)
    ids = [m.pk for m in messages]
    transaction.on_commit(lambda: _queue(ids), robust=True)
    return len(messages)


def _queue(message_ids: Sequence[Any], countdown: float = 0) -> None:
    from notifications import tasks as celery_tasks  # the Celery tasks import this module

    for message_id in message_ids:
        celery_tasks.deliver_webhook.apply_async(
            args=[str(message_id)], countdown=countdown or None
        )


# --- delivery -------------------------------------------------------------------------------------


def webhook_deliver(*, message_id: Any) -> str:
    """One attempt at delivering the message, if it is due and no one else holds it. Returns
    the message's status afterwards ("" if this call did not take it)."""
    now = timezone.now()
    # The attempt's deadline (safe_http enforces it) plus a margin for the database work.
    lease = now + timedelta(seconds=settings.WEBHOOK_TIMEOUT_SECONDS + LEASE_MARGIN_S)
    token = uuid.uuid4()
    # Taken by one conditional UPDATE: due and pending, or held by a worker whose lease ran out
    # (it died mid-delivery: the message is sent again, at least once in all). The token says
    # whose hold it is: only its holder records the outcome.
    taken = WebhookMessage.objects.filter(
        Q(status=Status.PENDING, next_attempt_at__lte=now)
        | Q(status=Status.SENDING, lease_until__lt=now),
        pk=message_id,
    ).update(status=Status.SENDING, lease_until=lease, lease_token=token)
    if not taken:
        return ""
    message = WebhookMessage.objects.select_related("endpoint").get(pk=message_id)
    if message.lease_token != token:
        return ""  # taken from us in between (cannot happen within the lease)
    trigger = (
        WebhookAttempt.Trigger.RESEND
        if message.resend_requested_at is not None
        else WebhookAttempt.Trigger.SCHEDULED
    )
    endpoint = message.endpoint
    if endpoint is not None and not endpoint.enabled:
        return _finish_without_attempt(
            message, token, "The endpoint is disabled; resend it once enabled."
        )
    if endpoint is None and not message.for_task_url:
        return _finish_without_attempt(message, token, "The endpoint was deleted.")
    url = endpoint.url if endpoint is not None else message.url
    signer: SigningSecret = endpoint if endpoint is not None else account_secret(user=message.user)
    body = json.dumps(message.payload, separators=(",", ":"), ensure_ascii=False)
    sent_at = timezone.now()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "Rivya-Webhooks/1",
        "webhook-id": message.webhook_id,
        "webhook-timestamp": str(int(sent_at.timestamp())),
        "webhook-signature": signature_header(
            signing_secrets(signer, sent_at), message.webhook_id, sent_at, body
        ),
    }
    status_code: int | None = None
    error = ""
    answer_body = b""
    abort = False
    latency = 0
    try:
        answer = safe_http.post(
            url,
            body.encode(),
            headers,
            timeout=settings.WEBHOOK_TIMEOUT_SECONDS,
            max_bytes=settings.WEBHOOK_MAX_RESPONSE_BYTES,
            allow_http=allow_http(),
            allow_private=allow_private(),
        )
        status_code, answer_body, latency = answer.status, answer.body, answer.elapsed_ms
        abort = answer.headers.get(ABORT_HEADER, "").strip().lower() == ABORT_VALUE
        if not 200 <= status_code < 300:
            error = f"HTTP {status_code}" + (
                " (redirects are not followed)" if 300 <= status_code < 400 else ""
            )
    except safe_http.UnsafeDestination as exc:
        error = f"refused: {exc.message}"
    except Exception as exc:  # noqa: BLE001 - any failure to get an answer is the attempt's
        error = f"no answer: {type(exc).__name__}: {exc}"[:300]
        latency = int((timezone.now() - sent_at).total_seconds() * 1000)
    succeeded = status_code is not None and 200 <= status_code < 300
    return _after_attempt(
        message,
        endpoint,
        token=token,
        trigger=trigger,
        url=url,
        started_at=sent_at,
        status_code=status_code,
        succeeded=succeeded,
        abort=abort and not succeeded,
        latency=latency,
        body=answer_body.decode("utf-8", "replace")[:STORED_BODY_CHARS],
        error=error,
    )


def _finish_without_attempt(message: WebhookMessage, token: uuid.UUID, reason: str) -> str:
    WebhookMessage.objects.filter(pk=message.pk, status=Status.SENDING, lease_token=token).update(
        status=Status.FAILED,
        lease_until=None,
        lease_token=None,
        next_attempt_at=None,
        last_error=reason[:300],
        finished_at=timezone.now(),
    )
    return Status.FAILED


def _after_attempt(
    message: WebhookMessage,
    endpoint: WebhookEndpoint | None,
    *,
    token: uuid.UUID,
    trigger: str,
    url: str,
    started_at: datetime,
    status_code: int | None,
    succeeded: bool,
    abort: bool,
    latency: int,
    body: str,
    error: str,
) -> str:
    now = timezone.now()
    number = message.attempts + 1
    if succeeded:
        status, next_at = Status.SUCCEEDED, None
    elif abort:
        status, next_at = Status.ABORTED, None
    elif number < len(RETRY_SCHEDULE):
        status, next_at = Status.PENDING, now + RETRY_SCHEDULE[number]
    else:
        status, next_at = Status.FAILED, None
    with transaction.atomic():
        held = WebhookMessage.objects.filter(
            pk=message.pk, status=Status.SENDING, lease_token=token
        ).update(
            status=status,
            attempts=number,
            next_attempt_at=next_at,
            lease_until=None,
            lease_token=None,
            resend_requested_at=None,
            last_status_code=status_code,
            last_error=error[:300],
            finished_at=None if status == Status.PENDING else now,
        )
        if not held:  # the lease ran out and another worker took the message: its outcome
            log.warning("webhook message %s: lease lost during attempt %s", message.pk, number)
            return ""
        WebhookAttempt.objects.create(
            message=message,
            number=number,
            trigger=trigger,
            url=url[:2000],
            started_at=started_at,
            status_code=status_code,
            succeeded=succeeded,
            latency_ms=max(0, latency),
            response_body=body,
            error=error[:300],
        )
        if endpoint is not None:
            _endpoint_health(endpoint, succeeded=succeeded, now=now)
    if next_at is not None and next_at - now <= QUEUE_AHEAD:
        _queue([message.pk], countdown=max(0.0, (next_at - now).total_seconds()))
    return status


def _endpoint_health(endpoint: WebhookEndpoint, *, succeeded: bool, now: datetime) -> None:
    """A success clears the endpoint's failure record; a failure starts it, and one more than
    ``WEBHOOK_DISABLE_AFTER`` after it started disables the endpoint and tells its owner."""
    rows = WebhookEndpoint.objects.filter(pk=endpoint.pk)
    if succeeded:
        rows.filter(failing_since__isnull=False).update(failing_since=None)
        return
    rows.filter(failing_since__isnull=True).update(failing_since=now)
    cutoff = now - settings.WEBHOOK_DISABLE_AFTER
    days = settings.WEBHOOK_DISABLE_AFTER.total_seconds() / 86400
    reason = f"Every delivery failed for {days:g} days."
    if rows.filter(enabled=True, failing_since__lte=cutoff).update(
        enabled=False, disabled_reason=reason
    ):
        notification_create(
            user=endpoint.user,
            kind=Notification.Kind.WEBHOOK_ENDPOINT_DISABLED,
            title="A webhook endpoint was disabled",
            body=(
                f"{endpoint.url}: {reason} No more events are sent to it. Fix the receiver, "
                "enable the endpoint again on your account page, and resend what it missed."
            ),
            subject_type="notifications.webhookendpoint",
            subject_id=f"{endpoint.pk}:{int(now.timestamp())}",
            link="/account/#webhooks",
        )


def webhook_resend(*, message: WebhookMessage) -> WebhookMessage:
    """Send the message again now (whatever its status, unless a worker holds it): one more
    attempt, recorded as a resend; on failure it follows the schedule from where it was."""
    now = timezone.now()
    WebhookMessage.objects.filter(pk=message.pk).exclude(status=Status.SENDING).update(
        status=Status.PENDING, next_attempt_at=now, finished_at=None, resend_requested_at=now
    )
    transaction.on_commit(lambda: _queue([message.pk]), robust=True)
    message.refresh_from_db()
    return message


def webhooks_due(*, limit: int = 500, grace: timedelta = SWEEP_GRACE) -> list[str]:
    """Messages due for longer than ``grace`` (their queued delivery lost, or a retry too far
    ahead to queue; one due more recently is in the queue already) and those whose worker's
    lease ran out (it died mid-delivery)."""
    now = timezone.now()
    due = WebhookMessage.objects.filter(
        status=Status.PENDING, next_attempt_at__lte=now - grace
    ).order_by("next_attempt_at")
    leased = WebhookMessage.objects.filter(status=Status.SENDING, lease_until__lt=now)
    ids = list(due.values_list("pk", flat=True)[:limit]) + list(
        leased.values_list("pk", flat=True)[:limit]
    )
    return [str(i) for i in ids]


def webhooks_purge(*, batch: int = 1000) -> int:
    """Delete finished messages (and their attempts) older than ``WEBHOOK_RETENTION``; returns
    how many. Pending and sending ones are kept whatever their age."""
    cutoff = timezone.now() - settings.WEBHOOK_RETENTION
    finished = (Status.SUCCEEDED, Status.FAILED, Status.ABORTED)
    deleted = 0
    while True:
        ids = list(
            WebhookMessage.objects.filter(status__in=finished, finished_at__lt=cutoff).values_list(
                "pk", flat=True
            )[:batch]
        )
        if not ids:
            return deleted
        WebhookMessage.objects.filter(pk__in=ids).delete()
        deleted += len(ids)
