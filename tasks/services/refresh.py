"""Bringing GENERATING tasks up to date from upstream: poll claims, status, timeouts, outputs."""

from __future__ import annotations

import contextlib
import logging
import random
import time
import uuid
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import transaction
from django.db.models import F, Q, Value
from django.db.models.functions import Coalesce, Greatest
from django.utils import timezone

from rivya.db import reconnect_if_broken
from rivya.faults import fault_point
from tasks.media import MediaError, MediaInfo, inspect_media
from tasks.models import Task
from tasks.providers.base import (
    JobState,
    JobStatus,
    ProviderError,
)
from tasks.providers.registry import get_provider
from tasks.services.common import S, record_event
from tasks.services.outcomes import StoredOutput, task_fail, task_succeed

logger = logging.getLogger(__name__)


def _next_poll_delay(task: Task) -> float:
    """The model's interval for the first 10 polls, then growing ×1.5 up to a minute, with
    ±10 % jitter so that a burst of tasks does not poll in lockstep."""
    base = float(task.poll_interval_seconds)
    delay = min(base * (1.5 ** max(0, task.poll_count - 10)), 60.0)
    return delay * random.uniform(0.9, 1.1)  # noqa: S311 - jitter, not security


def poll_claim_due(*, limit: int | None = None) -> list[str]:
    """Claim GENERATING tasks that are due for a status check and push their next check back.

    ``FOR UPDATE SKIP LOCKED``: two pollers (or two beats) never claim the same task.
    """
    now = timezone.now()
    with transaction.atomic():
        due = list(
            Task.objects.select_for_update(skip_locked=True)
            .filter(status=S.GENERATING, next_poll_at__lte=now)
            .order_by("next_poll_at")
            .only("id", "poll_interval_seconds", "poll_count")[: limit or settings.TASK_POLL_BATCH]
        )
        for task in due:
            task.next_poll_at = now + timedelta(seconds=_next_poll_delay(task))
            task.poll_count += 1
        Task.objects.bulk_update(due, ["next_poll_at", "poll_count"])
    return [str(t.pk) for t in due]


# A job the provider says it does not have is given up only when it keeps saying so without a
# break: an unbroken run of at least this many answers, the first at least this long ago
# (replication lag just after creation, or a base URL briefly pointing at the wrong account,
# must not refund running jobs that bill). Any real status ends the run.
JOB_LOST_ANSWERS = 3
JOB_LOST_AFTER_S = 60


def _job_not_found(task: Task) -> None:
    now = timezone.now()
    Task.objects.filter(pk=task.pk, status=S.GENERATING).update(
        not_found_since=Coalesce(F("not_found_since"), Value(now)),
        not_found_count=F("not_found_count") + 1,
    )
    task.refresh_from_db(fields=["not_found_since", "not_found_count"])
    record_event(
        task.pk,
        "upstream_not_found",
        "The provider says it does not know this job.",
        run=task.not_found_count,
    )
    since = task.not_found_since
    if (
        task.not_found_count >= JOB_LOST_ANSWERS
        and since is not None
        and since <= now - timedelta(seconds=JOB_LOST_AFTER_S)
    ):
        # It should neither deliver nor bill: fail it, refunded in full whatever the failure
        # policy (there is no work to charge for), rather than hold the credits forever; and ask
        # the provider to stop it, in case it is only hidden from us.
        task_fail(
            task_id=task.pk,
            code="upstream_job_lost",
            kind="provider",
            sources=[S.GENERATING],
            message="The provider no longer knows this job; your credits were refunded. Try again.",
            charge_policy=False,
            cancel_upstream=True,
        )


def _status_seen(task: Task) -> None:
    """A real status ends a run of "not found" answers."""
    if task.not_found_count or task.not_found_since is not None:
        Task.objects.filter(pk=task.pk).update(not_found_since=None, not_found_count=0)


def _overdue(task: Task, now: Any) -> bool:
    return bool(
        task.submitted_at and now > task.submitted_at + timedelta(seconds=task.timeout_seconds)
    )


def _timeout_unconfirmed(task: Task, message: str, **data: Any) -> None:
    """Past the model's timeout, and the provider has not confirmed the job stopped. Flag it
    for support (``timeout_unconfirmed_at``) the first time; once it has stayed so for
    TASK_UNCONFIRMED_GRACE, fail it (``upstream_unconfirmed``), refunded, and ask the provider
    to stop the job. A result that arrives later is recorded on the timeline only."""
    now = timezone.now()
    if Task.objects.filter(
        pk=task.pk, status=S.GENERATING, timeout_unconfirmed_at__isnull=True
    ).update(timeout_unconfirmed_at=now):
        logger.warning("task %s past its timeout, unconfirmed upstream: %s", task.pk, message)
        record_event(task.pk, "timeout_unconfirmed", message, **data)
        return
    flagged = task.timeout_unconfirmed_at
    grace = timedelta(seconds=settings.TASK_UNCONFIRMED_GRACE)
    if flagged is not None and now >= flagged + grace:
        task_fail(
            task_id=task.pk,
            code="upstream_unconfirmed",
            kind="provider",
            sources=[S.GENERATING],
            message=f"The provider did not confirm this job within {_hours(grace)} after the "
            "model's timeout; your credits were refunded. Try again.",
            charge_policy=False,
            cancel_upstream=True,
        )


def _hours(delta: timedelta) -> str:
    hours = delta.total_seconds() / 3600
    return f"{hours:g} hour{'s' if hours != 1 else ''}"


def task_refresh(*, task_id: Any, reason: str = "poll", status: JobStatus | None = None) -> None:
    """Bring a GENERATING task up to date with its upstream job and finish it if the job has.

    ``status``: what a verified callback already told us (else the upstream is asked).
    A task past its model's timeout is cancelled upstream and failed only once the upstream
    confirms it stopped: never refunded while it might still deliver and bill.
    """
    task = Task.objects.filter(pk=task_id).first()
    if task is None or task.status != S.GENERATING or not task.upstream_id:
        return
    provider = get_provider(task.provider)
    fresh = status is None
    if status is None:
        try:
            status = provider.fetch_status(task.upstream_id)
        except ProviderError as exc:
            if exc.code == "job_not_found":
                _job_not_found(task)
                return
            record_event(task_id, "poll_failed", exc.message, code=exc.code, reason=reason)
            if _overdue(task, timezone.now()):
                # A status check that keeps failing (a rotated key, unreadable answers) must
                # not keep the task, its credits and its capacity slot forever.
                _timeout_unconfirmed(
                    task,
                    "Past the model's timeout, and the provider's status checks fail; not "
                    "refunding yet.",
                    code=exc.code,
                )
            return
    _status_seen(task)
    record_event(
        task_id,
        "polled",
        f"Upstream status: {status.state.value}.",
        reason=reason,
        state=status.state.value,
    )
    if status.state.finished:
        _finish_from_status(task, status, reason, fresh=fresh)
        return
    now = timezone.now()
    if status.state == JobState.RUNNING and task.started_at is None:
        Task.objects.filter(pk=task_id, started_at__isnull=True).update(started_at=now)
    if _overdue(task, now):
        _handle_overdue(task, provider)


def _handle_overdue(task: Task, provider: Any) -> None:
    try:
        provider.cancel(task.upstream_id)
        confirmed = provider.fetch_status(task.upstream_id)
    except ProviderError as exc:
        _timeout_unconfirmed(
            task,
            "Past the model's timeout, but the provider could not confirm the job stopped; "
            "not refunding yet.",
            code=exc.code,
        )
        return
    if confirmed.state == JobState.CANCELLED:
        task_fail(
            task_id=task.pk,
            code="timeout",
            message=f"The provider did not finish within {task.timeout_seconds} s.",
            kind="provider",
            sources=[S.GENERATING],
        )
    elif confirmed.state.finished:
        _finish_from_status(task, confirmed, "timeout check", fresh=True)
    else:
        _timeout_unconfirmed(
            task,
            "Past the model's timeout; cancel requested, waiting for the provider to stop.",
        )


def _finish_from_status(task: Task, status: JobStatus, reason: str, *, fresh: bool) -> None:
    """``fresh``: the status was just fetched from the provider (not carried by a callback,
    which may be old: its result URLs may have expired)."""
    if status.state == JobState.SUCCEEDED:
        if not status.outputs:
            task_fail(
                task_id=task.pk,
                code="no_output",
                kind="provider",
                message="The provider finished without producing any output.",
                sources=[S.GENERATING],
            )
            return
        _store_and_succeed(task, status, reason, fresh=fresh)
    elif status.state == JobState.REJECTED:
        task_fail(
            task_id=task.pk,
            code=status.error_code or "rejected",
            kind="user",
            status=S.REJECTED,
            sources=[S.GENERATING],
            message=(status.error_message or "The provider rejected the input.")
            + " Change the prompt or the reference file and try again.",
        )
    elif status.state == JobState.FAILED:
        task_fail(
            task_id=task.pk,
            code=status.error_code or "provider_failed",
            kind="provider",
            sources=[S.GENERATING],
            message=status.error_message or "The provider failed to generate a result.",
        )
    elif status.state == JobState.CANCELLED:
        task_fail(
            task_id=task.pk,
            code="upstream_cancelled",
            kind="provider",
            sources=[S.GENERATING],
            message="The provider cancelled the job.",
        )


EXTENSIONS = {
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/webp": "webp",
    "image/gif": "gif",
    "audio/wav": "wav",
    "audio/mpeg": "mp3",
    "audio/ogg": "ogg",
    "audio/flac": "flac",
    "audio/webm": "webm",
    "audio/mp4": "m4a",
    "video/webm": "webm",
    "video/mp4": "mp4",
}


OUTPUT_LEASE_S = 300  # longer than the refresh task's hard time limit (tasks.tasks)
DOWNLOAD_BUDGET_S = 150.0  # all of a task's outputs; within the refresh task's soft time limit


def _claim_outputs(task: Task) -> bool:
    """Take the lease on storing this task's outputs (one conditional UPDATE, so a callback
    and a poll never download and store at once) and count the attempt."""
    now = timezone.now()
    return bool(
        Task.objects.filter(pk=task.pk, status=S.GENERATING)
        .filter(Q(output_lease_until__isnull=True) | Q(output_lease_until__lt=now))
        .update(
            output_lease_until=now + timedelta(seconds=OUTPUT_LEASE_S),
            output_attempts=F("output_attempts") + 1,
        )
    )


def _release_outputs(task: Task) -> None:
    """An attempt that ended cleanly (a download error we handled) gives the lease back and
    does not count against the cap: only attempts that never ended (the worker died or hit its
    time limit) do."""
    Task.objects.filter(pk=task.pk).update(
        output_lease_until=None, output_attempts=Greatest(F("output_attempts") - 1, Value(0))
    )


def _store_and_succeed(task: Task, status: JobStatus, reason: str, *, fresh: bool) -> None:
    if not _claim_outputs(task):
        if Task.objects.filter(pk=task.pk, status=S.GENERATING).exists():
            record_event(task.pk, "outputs_busy", "Another worker is storing this task's results.")
        return
    # From the claim on, every way out gives the lease back, the first statement after it
    # included: a connection lost right after the claim's commit left a task waiting out its
    # whole lease (docs/reliability.md, pg-terminate).
    try:
        task.refresh_from_db(fields=["output_attempts"])
        if task.output_attempts > settings.TASK_OUTPUT_MAX_ATTEMPTS:
            # Every earlier attempt died storing these outputs (a poison output that crashes
            # or hangs the worker): stop fetching them, and tell the user and support.
            logger.error(
                "task %s: storing its outputs failed %s times; giving up",
                task.pk,
                task.output_attempts - 1,
            )
            task_fail(
                task_id=task.pk,
                code="result_unprocessable",
                kind="infra",
                sources=[S.GENERATING],
                message=f"The result could not be processed after {task.output_attempts - 1} "
                "attempts; your credits were refunded. Support has been told.",
                charge_policy=False,
            )
            return
        _download_and_succeed(task, status, reason, fresh=fresh)
    except BaseException:
        # It failed in this process (an error, a lost connection, or the soft time limit): the
        # attempt stays counted, but the lease is given back, on a working connection, so the
        # next check need not wait for it to run out. Only a worker that died outright leaves
        # its lease to expire.
        with contextlib.suppress(Exception):
            reconnect_if_broken()
            Task.objects.filter(pk=task.pk).update(output_lease_until=None)
        raise


def _download_and_succeed(task: Task, status: JobStatus, reason: str, *, fresh: bool) -> None:
    # Download before the transaction (never hold row locks across HTTP), into a directory of
    # this attempt: a concurrent attempt that loses the race deletes only its own files.
    provider = get_provider(task.provider)
    attempt = uuid.uuid4().hex[:12]
    stored: list[StoredOutput] = []
    names: list[str] = []
    deadline = time.monotonic() + DOWNLOAD_BUDGET_S
    try:
        for index, output in enumerate(status.outputs):
            data = provider.download(
                output,
                max_bytes=settings.MAX_RESULT_BYTES,
                timeout_s=max(1.0, deadline - time.monotonic()),
            )
            try:
                info = inspect_media(data, max_pixels=settings.MAX_IMAGE_PIXELS)
            except MediaError:
                # Not media we can verify: keep the bytes but never serve them as anything a
                # browser would render (a file that starts as a PNG and continues as HTML).
                info = MediaInfo(
                    mime="application/octet-stream",
                    kind="binary",
                    width=None,
                    height=None,
                    duration_ms=None,
                )
            ext = EXTENSIONS.get(info.mime, "bin")
            name = default_storage.save(
                f"results/{task.pk}/{attempt}/{index}.{ext}", ContentFile(data)
            )
            names.append(name)
            stored.append(
                StoredOutput(
                    name=name,
                    mime=info.mime,
                    bytes=len(data),
                    width=info.width,
                    height=info.height,
                    duration_ms=info.duration_ms,
                )
            )
    except ProviderError as exc:
        for name in names:
            default_storage.delete(name)
        record_event(task.pk, "download_failed", exc.message, code=exc.code, fresh=fresh)
        _release_outputs(task)
        if exc.retryable:
            return  # the poller comes back on schedule
        if not fresh:
            # The URLs came with a callback that may be old (delayed, or retried by the
            # provider): an expired URL answers 403/404. Ask for the job's current status,
            # with fresh URLs, before failing anything.
            _refetch_and_finish(task, provider, reason)
            return
        task_fail(
            task_id=task.pk,
            code=exc.code,
            kind="provider",
            sources=[S.GENERATING],
            message="The result could not be retrieved from the provider; your credits were "
            "refunded.",
        )
        return
    fault_point("after_outputs_stored", task.pk)
    try:
        won = task_succeed(task_id=task.pk, outputs=stored)
    except BaseException:
        # The outcome's transaction rolled back: nothing refers to this attempt's files.
        for name in names:
            with contextlib.suppress(OSError):
                default_storage.delete(name)
        raise
    if not won:
        for name in names:
            default_storage.delete(name)
        current = Task.objects.filter(pk=task.pk).values_list("status", flat=True).first()
        if current == S.CANCELLED:
            record_event(
                task.pk,
                "late_result",
                "A result arrived after cancellation; recorded, nothing else changed.",
                reason=reason,
            )


def _refetch_and_finish(task: Task, provider: Any, reason: str) -> None:
    try:
        current = provider.fetch_status(task.upstream_id)
    except ProviderError as exc:
        record_event(task.pk, "poll_failed", exc.message, code=exc.code, reason="fresh result urls")
        return  # the poller asks again on schedule
    _status_seen(task)
    record_event(
        task.pk,
        "polled",
        f"Upstream status: {current.state.value} (fresh result URLs).",
        reason=reason,
        state=current.state.value,
    )
    if current.state.finished:
        _finish_from_status(task, current, reason, fresh=True)
