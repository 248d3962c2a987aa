"""The provider callbacks inbox: store each delivery once, then apply it."""

from __future__ import annotations

import logging
from datetime import timedelta

from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.utils import timezone

from rivya.errors import without_nul
from tasks.models import CallbackDelivery, Task
from tasks.providers.base import (
    CallbackEvent,
    JobState,
)
from tasks.providers.registry import get_provider
from tasks.services import enqueue
from tasks.services.common import S, record_event
from tasks.services.refresh import task_refresh

logger = logging.getLogger(__name__)


def callback_receive(*, provider: str, event: CallbackEvent) -> tuple[CallbackDelivery, bool]:
    """Store a verified delivery once (the unique (provider, event id) decides, not a prior
    SELECT) and queue its processing after commit. Returns (delivery, created)."""
    event_id = event.event_id[:200]
    try:
        with transaction.atomic():
            delivery = CallbackDelivery.objects.create(
                provider=provider,
                event_id=event_id,
                upstream_id=event.upstream_id[:200],
                payload=without_nul(dict(event.payload)),
            )
            # robust: if the broker is down the delivery stays pending for the sweeper; the
            # provider still gets its 2xx (the delivery is stored).
            transaction.on_commit(lambda: enqueue.callback(delivery.pk), robust=True)
    except IntegrityError:
        return CallbackDelivery.objects.get(provider=provider, event_id=event_id), False
    return delivery, True


CALLBACK_MAX_ATTEMPTS = 10
CALLBACK_LEASE_S = 300  # longer than any download of results (bounded by MAX_RESULT_BYTES)


def callback_process(*, delivery_id: int) -> str:
    """Apply a stored delivery to its task. Returns "processed", "deferred" (our upstream id is
    not stored yet: the callback raced our own submission; check again later), "ignored" (no
    such job after its attempts), "failed" (gave up after its attempts; the poller still
    finishes the task) or "busy" (another processor holds it)."""
    now = timezone.now()
    # Claim it: one conditional UPDATE, so two processors never apply it at once.
    claimed = (
        CallbackDelivery.objects.filter(pk=delivery_id, status=CallbackDelivery.Status.PENDING)
        .filter(
            Q(last_attempt_at__isnull=True)
            | Q(last_attempt_at__lt=now - timedelta(seconds=CALLBACK_LEASE_S))
        )
        .update(attempts=F("attempts") + 1, last_attempt_at=now)
    )
    delivery = CallbackDelivery.objects.filter(pk=delivery_id).first()
    if delivery is None or delivery.status != CallbackDelivery.Status.PENDING:
        return "processed"
    if not claimed:
        return "busy"
    # An empty upstream id names no job (adapters refuse it; a row stored before they did must
    # not attach to a task whose upstream id is still empty).
    task = (
        Task.objects.filter(provider=delivery.provider, upstream_id=delivery.upstream_id).first()
        if delivery.upstream_id
        else None
    )
    if task is None:
        if delivery.attempts >= CALLBACK_MAX_ATTEMPTS:
            CallbackDelivery.objects.filter(pk=delivery_id, status="pending").update(
                status=CallbackDelivery.Status.IGNORED, processed_at=timezone.now()
            )
            return "ignored"
        # Free the lease: the deferred retry comes back in seconds.
        CallbackDelivery.objects.filter(pk=delivery_id).update(last_attempt_at=None)
        return "deferred"
    if delivery.attempts > CALLBACK_MAX_ATTEMPTS:
        # Every earlier attempt died applying it: stop, say so; the poller finishes the task.
        CallbackDelivery.objects.filter(pk=delivery_id, status="pending").update(
            status=CallbackDelivery.Status.FAILED, processed_at=timezone.now(), task=task
        )
        logger.error(
            "callback delivery %s gave up after %s attempts", delivery_id, delivery.attempts
        )
        record_event(
            task.pk,
            "callback_failed",
            f"Callback {delivery.event_id} could not be applied after "
            f"{delivery.attempts - 1} attempts; the task is checked by polling instead.",
            delivery=delivery.pk,
        )
        return "failed"
    provider = get_provider(task.provider)
    status = provider.status_from_callback(delivery.payload)
    record_event(
        task.pk,
        "callback",
        f"Callback {delivery.event_id}",
        state=status.state.value if status else None,
        delivery=delivery.pk,
    )
    if task.status in Task.TERMINAL:
        if task.status != S.SUCCESS and status and status.state == JobState.SUCCEEDED:
            # Cancelled, or given up on (lost, unconfirmed past the grace): the result is
            # recorded for support; status, credits and results do not change.
            record_event(
                task.pk,
                "late_result",
                f"A result arrived after the task had finished ({task.status}); recorded, "
                "nothing else changed.",
            )
    else:
        # Early callbacks (result not ready) change nothing: refresh sees the job still
        # running, and the poller checks again on schedule.
        task_refresh(task_id=task.pk, reason="callback", status=status)
    # Marked only once applied: a crash before this line leaves the delivery pending for the
    # sweeper (tasks.retry_pending_callbacks); applying it twice is harmless, because every
    # transition is conditional.
    CallbackDelivery.objects.filter(pk=delivery_id, status="pending").update(
        status=CallbackDelivery.Status.PROCESSED, processed_at=timezone.now(), task=task
    )
    return "processed"


def callbacks_pending(*, older_than_seconds: int = 20) -> list[int]:
    """Pending deliveries nobody is working on: never taken and older than
    ``older_than_seconds`` (their queued message was lost), or whose lease ran out (the
    processor died)."""
    now = timezone.now()
    cutoff = now - timedelta(seconds=older_than_seconds)
    lease_over = now - timedelta(seconds=CALLBACK_LEASE_S)
    return list(
        CallbackDelivery.objects.filter(status="pending", received_at__lt=cutoff)
        .filter(Q(last_attempt_at__isnull=True) | Q(last_attempt_at__lt=lease_over))
        .values_list("pk", flat=True)[:500]
    )
