"""Celery tasks of the generation lifecycle: thin, named ``tasks.<verb>``, ids in, safe twice."""

from __future__ import annotations

import logging

from celery import shared_task
from django.conf import settings

from tasks import services
from tasks.providers.base import ProviderError

logger = logging.getLogger(__name__)

# Time limits fit each task's work. The soft limit raises inside the task (its transaction rolls
# back); the hard one kills the worker process. A refresh or a callback may download a task's
# outputs (bounded by refresh.DOWNLOAD_BUDGET_S): its hard limit stays under the leases on
# storing outputs and on a callback delivery (refresh.OUTPUT_LEASE_S, CALLBACK_LEASE_S, 300 s),
# so a slow download is stopped before another worker may take the same work.
REFRESH_SOFT_S = 200
REFRESH_HARD_S = 240
# A submit uploads the reference files (up to MAX_UPLOAD_BYTES) within the HTTP timeouts.
SUBMIT_SOFT_S = 150


@shared_task(
    name="tasks.submit",
    bind=True,
    max_retries=None,
    acks_late=True,
    soft_time_limit=SUBMIT_SOFT_S,
    time_limit=SUBMIT_SOFT_S + 30,
)
def submit(self: object, task_id: str) -> None:
    """Send a WAITING task upstream; retry temporary errors with backoff and jitter."""
    try:
        services.task_send_upstream(task_id=task_id)
    except ProviderError as exc:
        services.task_submit_attempt_failed(task_id=task_id, error=exc)
        attempts = services.task_submit_attempts(task_id=task_id)
        if exc.retryable and attempts < settings.TASK_SUBMIT_MAX_ATTEMPTS:
            logger.info("submit of %s failed (%s); retrying", task_id, exc.code)
            raise self.retry(exc=exc, countdown=services.retry_delay(attempts)) from None  # type: ignore[attr-defined]
        services.task_submit_failed(task_id=task_id, error=exc)


@shared_task(
    name="tasks.refresh", acks_late=True, soft_time_limit=REFRESH_SOFT_S, time_limit=REFRESH_HARD_S
)
def refresh(task_id: str) -> None:
    services.task_refresh(task_id=task_id, reason="poll")


@shared_task(name="tasks.poll_due", soft_time_limit=30, time_limit=60)
def poll_due() -> int:
    ids = services.poll_claim_due()
    for task_id in ids:
        refresh.delay(task_id)
    return len(ids)


@shared_task(
    name="tasks.process_callback",
    bind=True,
    max_retries=None,
    acks_late=True,
    soft_time_limit=REFRESH_SOFT_S,
    time_limit=REFRESH_HARD_S,
)
def process_callback(self: object, delivery_id: int) -> str:
    outcome = services.callback_process(delivery_id=delivery_id)
    if outcome == "deferred":
        # The callback beat our own UPDATE storing the upstream id: look again shortly.
        raise self.retry(countdown=2) from None  # type: ignore[attr-defined]
    return outcome


@shared_task(name="tasks.retry_pending_callbacks", soft_time_limit=30, time_limit=60)
def retry_pending_callbacks() -> int:
    ids = services.callbacks_pending()
    for delivery_id in ids:
        process_callback.delay(delivery_id)
    return len(ids)


@shared_task(name="tasks.reconcile_waiting", soft_time_limit=30, time_limit=60)
def reconcile_waiting() -> int:
    ids = services.waiting_due_for_resubmit()
    for task_id in ids:
        submit.delay(task_id)
    return len(ids)


@shared_task(
    name="tasks.cancel_upstream",
    bind=True,
    max_retries=None,
    acks_late=True,
    soft_time_limit=60,
    time_limit=90,
)
def cancel_upstream(self: object, task_id: str, upstream_id: str | None = None) -> None:
    """Ask the provider to stop a cancelled task's job; retry temporary errors."""
    try:
        services.task_cancel_upstream(task_id=task_id, upstream_id=upstream_id)
    except ProviderError as exc:
        retries = getattr(getattr(self, "request", None), "retries", 0) or 0
        if exc.retryable and retries < settings.TASK_SUBMIT_MAX_ATTEMPTS:
            raise self.retry(exc=exc, countdown=services.retry_delay(retries)) from None  # type: ignore[attr-defined]
        logger.error("upstream cancel of task %s gave up: %s", task_id, exc)
        services.task_cancel_upstream_gave_up(
            task_id=task_id, upstream_id=upstream_id, error=exc.message
        )


@shared_task(name="tasks.retry_upstream_cancels", soft_time_limit=30, time_limit=60)
def retry_upstream_cancels() -> int:
    """Upstream cancels whose message was lost (broker down at commit) are sent again."""
    found = services.cancels_unsent()
    for task_id in found:
        cancel_upstream.delay(task_id)
    return len(found)


@shared_task(name="tasks.expire_results", soft_time_limit=240, time_limit=300)
def expire_results() -> int:
    total = 0
    while True:  # drain what is due, a bounded batch per transaction
        purged = services.results_expire_due()
        total += purged
        if purged < 200:
            return total


@shared_task(name="tasks.warn_expiring", soft_time_limit=60, time_limit=90)
def warn_expiring() -> int:
    return services.results_warn_expiring()


# Stopped well within the hour between runs; what it deleted stays deleted, the next run goes on.
@shared_task(name="tasks.sweep_storage", soft_time_limit=1800, time_limit=1860)
def sweep_storage() -> int:
    """Delete stored files no row references, once older than STORAGE_SWEEP_MIN_AGE."""
    from datetime import timedelta

    report = services.storage_sweep(min_age=timedelta(seconds=settings.STORAGE_SWEEP_MIN_AGE))
    if report.deleted:  # routine beat work stays quiet
        logger.info(
            "storage sweep deleted %d orphaned file(s), %d bytes", report.deleted, report.bytes
        )
    if report.failed:
        logger.warning("storage sweep could not delete %d file(s)", report.failed)
    return report.deleted


@shared_task(
    name="tasks.run_single",
    acks_late=True,
    # Within the deadline the claim sets (budget + SINGLE_DEADLINE_MARGIN_S, 15 s by default):
    # the reconciler never refunds a task a live worker may still finish.
    soft_time_limit=settings.SINGLE_ASYNC_TIMEOUT_S + 5,
    time_limit=settings.SINGLE_ASYNC_TIMEOUT_S + 10,
)
def run_single(task_id: str) -> None:
    """Run a single task accepted with ``Prefer: respond-async`` (once; a redelivery is a
    no-op). A worker killed mid-run leaves it to ``settle_interrupted_single``."""
    from tasks.single.services import single_run_deferred

    single_run_deferred(task_id=task_id)


@shared_task(name="tasks.settle_interrupted_single", soft_time_limit=60, time_limit=90)
def settle_interrupted_single() -> int:
    from tasks.single.services import single_requeue_unclaimed, single_settle_interrupted

    requeued = single_requeue_unclaimed()
    if requeued:
        logger.warning(
            "queued %d respond-async single task(s) again: no worker took them", requeued
        )
    settled = single_settle_interrupted()
    if settled:
        logger.warning("refunded %d single task(s) whose process died mid-run", settled)
    return settled
