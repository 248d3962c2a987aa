"""Bringing GENERATING tasks up to date from upstream: poll claims, status, timeouts, outputs."""

from __future__ import annotations

import contextlib
import random
import uuid
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import transaction
from django.utils import timezone

from tasks.media import MediaError, MediaInfo, inspect_media
from tasks.models import Task, TaskEvent
from tasks.providers.base import (
    JobState,
    JobStatus,
    ProviderError,
)
from tasks.providers.registry import get_provider
from tasks.services.common import S, _event
from tasks.services.outcomes import StoredOutput, task_fail, task_succeed


def _next_poll_delay(task: Task) -> float:
    """The model's interval for the first 10 polls, then growing ×1.5 up to a minute, with
    ±10 % jitter so that a burst of tasks does not poll in lockstep."""
    base = float(task.poll_interval_seconds)
    delay = min(base * (1.5 ** max(0, task.poll_count - 10)), 60.0)
    return delay * random.uniform(0.9, 1.1)  # noqa: S311 - jitter, not security


def outputs_requested(task: Task) -> int:
    """How many outputs this task asked for: its own ``num_outputs`` (validated against the
    model's schema at submit), 1 for models without it. Never the provider's report of what it
    was asked: a partial-success charge must not depend on a number the provider sends (PITFALLS:
    trust the provider's claims only as hints)."""
    params = task.params if isinstance(task.params, dict) else {}
    count = params.get("num_outputs", 1)
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 1000:
        return 1
    return count


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


# A job the provider says it does not have is given up only when it keeps saying so: at least
# this many answers, the first at least this long ago (replication lag just after creation, or
# a base URL briefly pointing at the wrong account, must not refund running jobs that bill).
JOB_LOST_ANSWERS = 3
JOB_LOST_AFTER_S = 60


def _job_not_found(task: Task) -> None:
    _event(task.pk, "upstream_not_found", "The provider says it does not know this job.")
    answers = TaskEvent.objects.filter(task_id=task.pk, kind="upstream_not_found")
    first = answers.order_by("created_at").values_list("created_at", flat=True).first()
    confirmed = (
        answers.count() >= JOB_LOST_ANSWERS
        and first is not None
        and first <= timezone.now() - timedelta(seconds=JOB_LOST_AFTER_S)
    )
    if confirmed:
        # It will neither deliver nor bill: fail it, refunded in full whatever the failure
        # policy (there is no work to charge for), rather than hold the credits forever.
        task_fail(
            task_id=task.pk,
            code="upstream_job_lost",
            kind="provider",
            sources=[S.GENERATING],
            message="The provider no longer knows this job; your credits were refunded. Try again.",
            charge_policy=False,
        )


def task_refresh(*, task_id: Any, reason: str = "poll", status: JobStatus | None = None) -> None:
    """Bring a GENERATING task up to date with its upstream job and finish it if the job has.

    ``status``: what a verified callback already told us (else the upstream is asked).
    A task past its model's timeout is cancelled upstream and failed only once the upstream
    confirms it stopped: never refunded while it might still deliver and bill (PITFALLS 10).
    """
    task = Task.objects.filter(pk=task_id).first()
    if task is None or task.status != S.GENERATING or not task.upstream_id:
        return
    provider = get_provider(task.provider)
    if status is None:
        try:
            status = provider.fetch_status(task.upstream_id)
        except ProviderError as exc:
            if exc.code == "job_not_found":
                _job_not_found(task)
                return
            _event(task_id, "poll_failed", exc.message, code=exc.code, reason=reason)
            return
    _event(
        task_id,
        "polled",
        f"Upstream status: {status.state.value}.",
        reason=reason,
        state=status.state.value,
    )
    if status.state.finished:
        _finish_from_status(task, status, reason)
        return
    now = timezone.now()
    if status.state == JobState.RUNNING and task.started_at is None:
        Task.objects.filter(pk=task_id, started_at__isnull=True).update(started_at=now)
    overdue = task.submitted_at and now > task.submitted_at + timedelta(
        seconds=task.timeout_seconds
    )
    if overdue:
        _handle_overdue(task, provider)


def _handle_overdue(task: Task, provider: Any) -> None:
    try:
        provider.cancel(task.upstream_id)
        confirmed = provider.fetch_status(task.upstream_id)
    except ProviderError as exc:
        _event(
            task.pk,
            "timeout_unconfirmed",
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
        _finish_from_status(task, confirmed, "timeout check")
    else:
        _event(
            task.pk,
            "timeout_unconfirmed",
            "Past the model's timeout; cancel requested, waiting for the provider to stop.",
        )


def _finish_from_status(task: Task, status: JobStatus, reason: str) -> None:
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
        _store_and_succeed(task, status, reason)
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


def _store_and_succeed(task: Task, status: JobStatus, reason: str) -> None:
    # Download before the transaction (never hold row locks across HTTP), into a directory of
    # this attempt: a concurrent attempt that loses the race deletes only its own files.
    provider = get_provider(task.provider)
    attempt = uuid.uuid4().hex[:12]
    stored: list[StoredOutput] = []
    names: list[str] = []
    try:
        for index, output in enumerate(status.outputs):
            data = provider.download(output, max_bytes=settings.MAX_RESULT_BYTES)
            try:
                info = inspect_media(data, max_pixels=settings.MAX_IMAGE_PIXELS)
            except MediaError:
                # Not media we can verify: keep the bytes but never serve them as anything a
                # browser would render (PITFALLS 19).
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
        _event(task.pk, "download_failed", exc.message, code=exc.code)
        if not exc.retryable:
            task_fail(
                task_id=task.pk,
                code=exc.code,
                kind="provider",
                sources=[S.GENERATING],
                message="The result could not be retrieved from the provider.",
            )
        return
    try:
        won = task_succeed(task_id=task.pk, outputs=stored, requested=outputs_requested(task))
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
            _event(
                task.pk,
                "late_result",
                "A result arrived after cancellation; recorded, nothing else changed.",
                reason=reason,
            )
