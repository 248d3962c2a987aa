"""Sending WAITING tasks upstream, and the reconciler that resubmits stuck ones."""

from __future__ import annotations

import logging
import math
import random
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.files.storage import default_storage
from django.db import transaction
from django.db.models import F, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from rivya.faults import fault_point
from tasks.media import MediaError, inspect_media
from tasks.models import Task, Upload
from tasks.providers.base import (
    InputFile,
    ProviderError,
    SubmitRequest,
)
from tasks.providers.registry import get_provider
from tasks.services import enqueue
from tasks.services.common import S, record_event, task_webhook_event, transition_task
from tasks.services.outcomes import task_fail

logger = logging.getLogger(__name__)


def callback_url(provider: str) -> str | None:
    if not settings.CALLBACKS_ENABLED:
        return None
    return f"{settings.CALLBACK_BASE_URL}/api/v1/callbacks/{provider}/"


def task_send_upstream(*, task_id: Any) -> bool:
    """Create the upstream job of a WAITING task (the task id is the provider's idempotency
    key, so a retry or a crash-and-resubmit never creates a second job) and move the task to
    GENERATING. Returns True when this call moved it.

    Raises ProviderError (``retryable`` says whether to try again).
    """
    task = Task.objects.filter(pk=task_id).select_related("model").first()
    if task is None or task.status != S.WAITING:
        return False
    if task.submit_attempts >= submit_attempts_limit():
        _mark_stuck(task)
        return False
    Task.objects.filter(pk=task_id, status=S.WAITING).update(
        submit_attempts=F("submit_attempts") + 1, last_submit_at=timezone.now()
    )
    try:
        files = _input_files(task)
    except _UnusableInput as exc:
        # Found by our own processing: the input cannot be used. The user can fix it. But an
        # earlier attempt may have created the job already: then track it instead.
        if task.submit_ambiguous_at is not None and _adopt_existing_job(task):
            return True
        task_fail(
            task_id=task_id,
            code=exc.code,
            kind="user",
            status=S.REJECTED,
            sources=[S.WAITING],
            message=exc.message,
        )
        return False
    provider = get_provider(task.provider)
    result = provider.submit(
        SubmitRequest(
            idempotency_key=str(task.pk),
            upstream_model=task.upstream_model,
            prompt=task.prompt,
            params=task.params,
            files=files,
            callback_url=callback_url(task.provider),
        )
    )
    fault_point("after_upstream_accept", task.pk)
    return _record_acceptance(task, result.upstream_id, "Accepted upstream.")


def _record_acceptance(task: Task, upstream_id: str, message: str) -> bool:
    """WAITING → GENERATING with the job the provider accepted (or, asked by idempotency key,
    says it has). Returns True when this call moved the task."""
    task_id = task.pk
    now = timezone.now()
    with transaction.atomic():
        moved = transition_task(
            task_id,
            [S.WAITING],
            S.GENERATING,
            upstream_id=upstream_id,
            submitted_at=now,
            next_poll_at=now + timedelta(seconds=task.poll_interval_seconds),
        )
        if moved:
            record_event(task_id, "submitted", message, upstream_id=upstream_id)
            task_webhook_event(task, "started")
        elif (
            Task.objects.filter(pk=task_id).values_list("upstream_id", flat=True).first()
            != upstream_id
        ):
            # Cancelled (or failed) while we were submitting: the job must not run on. But not
            # the job the task already tracks: a concurrent attempt under the same idempotency
            # key (a resubmit overlapping a slow submit, a redelivered message, a second beat)
            # gets that same job back and loses the UPDATE to the attempt that stored it;
            # cancelling it would fail the task.
            record_event(
                task_id,
                "late_upstream_acceptance",
                "The upstream accepted the job after the task had finished; cancelling it.",
                upstream_id=upstream_id,
            )
            # On the task, for the cancel sweep should this message be lost.
            Task.objects.filter(pk=task_id).update(
                late_upstream_id=upstream_id[:200],
                upstream_cancel_done_at=None,
                cancel_requested_at=Coalesce(F("cancel_requested_at"), Value(now)),
            )
            # Through the retried Celery task: a transient failure must not leave it running.
            transaction.on_commit(
                lambda: enqueue.cancel_upstream(task_id, upstream_id), robust=True
            )
    return moved


class _UnusableInput(Exception):  # noqa: N818 - a refusal, carried to the caller
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _input_files(task: Task) -> tuple[InputFile, ...]:
    """The task's reference files, re-checked as they are sent (a file that went missing or
    changed since upload is refused, not sent)."""
    uploads = {str(u.pk): u for u in Upload.objects.filter(pk__in=task.upload_ids)}
    files = []
    for upload_id in task.upload_ids:
        upload = uploads.get(upload_id)
        try:
            if upload is None:
                raise FileNotFoundError(upload_id)
            with default_storage.open(upload.file.name, "rb") as fh:
                data = fh.read()
            info = inspect_media(data, max_pixels=settings.MAX_IMAGE_PIXELS)
        except (OSError, MediaError):
            raise _UnusableInput(
                "unreadable_file",
                "A reference file could not be read any more. Upload it again and resubmit.",
            ) from None
        if info.mime != upload.mime:
            raise _UnusableInput(
                "file_mismatch",
                "A reference file is not what was uploaded. Upload it again and resubmit.",
            )
        files.append(InputFile(name=upload.original_name or "file", mime=upload.mime, data=data))
    return tuple(files)


def submit_attempts_limit() -> int:
    """Attempts after which a task still WAITING is no longer sent: twice the retry budget.

    The retry path fails a task (refunded) after TASK_SUBMIT_MAX_ATTEMPTS answered errors, so
    only attempts that never got an answer (a worker killed mid-submit, every time: a poison
    task) get this far. Such a task is not refunded automatically (its job may exist upstream
    and bill) and not sent again (it would crash the next worker too): it stays
    WAITING, credits held, with a ``submit_stuck`` event and an error log for support, who can
    cancel it (refund) once they know what the upstream did.
    """
    return 2 * settings.TASK_SUBMIT_MAX_ATTEMPTS


def _mark_stuck(task: Task) -> None:
    """Flag a task that is no longer sent (``submit_stuck_at``), once."""
    if not Task.objects.filter(pk=task.pk, submit_stuck_at__isnull=True).update(
        submit_stuck_at=timezone.now()
    ):
        return
    logger.error(
        "task %s stuck in WAITING after %s submit attempts; not sent again",
        task.pk,
        task.submit_attempts,
    )
    record_event(
        task.pk,
        "submit_stuck",
        f"Not sent again after {task.submit_attempts} attempts that got no answer. Support: "
        "check the provider for a job with this task's id, then cancel (refund) or resubmit.",
        attempts=task.submit_attempts,
    )


def task_submit_attempts(*, task_id: Any) -> int:
    """How many times the task's upstream submission has been tried (0 for an unknown task)."""
    return Task.objects.filter(pk=task_id).values_list("submit_attempts", flat=True).first() or 0


def may_have_created(error: ProviderError) -> bool:
    """Whether a failed submit may have created the job anyway: no answer after the request
    left (a read timeout, a dropped connection), a 5xx (the provider failed somewhere, perhaps
    after creating it), or a 409 (a request with the same key is still being processed)."""
    status = error.status
    return error.maybe_received or (status is not None and (status >= 500 or status == 409))


def task_submit_attempt_failed(*, task_id: Any, error: ProviderError) -> None:
    """Record a failed submission attempt on the task's timeline (support sees every try), and
    on the task when the attempt may have created the job (``submit_ambiguous_at``): from then
    on it is refunded only once the provider says it has no such job."""
    ambiguous = may_have_created(error)
    if ambiguous:
        now = timezone.now()
        Task.objects.filter(pk=task_id, submit_ambiguous_at__isnull=True).update(
            submit_ambiguous_at=now
        )
        # Cancelled (or failed) while this attempt was out: the job it may have created must
        # be stopped too. The cancel asks the provider by the task's key, and the sweep asks
        # again until the job shows up or the sweep's window ends.
        if Task.objects.filter(pk=task_id, status__in=Task.TERMINAL, upstream_id="").update(
            upstream_cancel_done_at=None,
            cancel_requested_at=Coalesce(F("cancel_requested_at"), Value(now)),
        ):
            transaction.on_commit(lambda: enqueue.cancel_upstream(task_id), robust=True)
    record_event(
        task_id,
        "submit_error",
        error.message[:500],
        code=error.code,
        retryable=error.retryable,
        maybe_received=ambiguous,
    )


def task_submit_failed(*, task_id: Any, error: ProviderError) -> bool:
    """The upstream refused the job for good, or kept failing: FAILED, credits released.

    Unless some attempt may have created the job (``submit_ambiguous_at``, or this ``error``:
    see ``may_have_created``): that job would run and bill while we refund. Then the provider
    is asked for the job by its idempotency key first:
    - it has it: the task tracks that job (GENERATING), as if the submit had been answered;
    - it says it has none: FAILED, refunded (unless the answer was a 409 "in progress": the
      job may not exist yet, so it is treated as "cannot tell");
    - it cannot tell: the task stays WAITING with its credits held, flagged
      ``submit_unconfirmed_at`` for support; the reconciler sends it again with the same key
      (the provider answers with the job if it exists) until ``submit_attempts_limit()``.
    Returns True when this call failed the task."""
    task = Task.objects.filter(pk=task_id).first()
    if task is None or task.status != S.WAITING:
        return False
    if task.submit_ambiguous_at is not None or may_have_created(error):
        try:
            if _adopt_existing_job(task):
                return False
        except ProviderError as exc:
            _flag_unconfirmed(task, exc)
            return False
        if error.status == 409:
            # "In progress": a request with this key is still being handled, and its job may
            # not exist yet. Not finding it now proves nothing: keep the credits held and ask
            # again (the reconciler resends with the same key).
            _flag_unconfirmed(task, error)
            return False
        record_event(
            task_id, "upstream_job_absent", "The provider confirms it has no job for this task."
        )
    kind = "provider" if not error.retryable else "infra"
    message = (
        "The provider refused this request: " + error.message
        if not error.retryable
        else "The provider could not be reached; your credits were refunded. Try again later."
    )
    return task_fail(
        task_id=task_id,
        code=error.code or "upstream_error",
        message=message,
        kind=kind,
        sources=[S.WAITING],
    )


def _adopt_existing_job(task: Task) -> bool:
    """Whether the provider has a job under the task's key (then the task now tracks it).
    Raises ProviderError when the provider cannot tell."""
    job = get_provider(task.provider).find_job(str(task.pk))
    if job is None:
        return False
    _record_acceptance(
        task,
        job.upstream_id,
        "The provider has this job although the submission got no clear answer; tracking it.",
    )
    return True


def _flag_unconfirmed(task: Task, error: ProviderError) -> None:
    if Task.objects.filter(pk=task.pk, submit_unconfirmed_at__isnull=True).update(
        submit_unconfirmed_at=timezone.now()
    ):
        logger.warning("task %s: submission unconfirmed (%s); credits stay held", task.pk, error)
        record_event(
            task.pk,
            "submit_unconfirmed",
            "The provider may have received this job without answering, and cannot say now "
            "whether it has it; it will be asked again with the same key. Credits stay held "
            "until it is known.",
            code=error.code,
        )


def waiting_due_for_resubmit() -> list[str]:
    """WAITING tasks whose submission never completed (worker crash, lost message): handed to
    the submitter again with the same idempotency key. Tasks that kept failing to submit are
    failed (credits released) by the submitter, unless an attempt may have been received
    (``task_submit_failed``): those come back here until the attempts limit."""
    cutoff = timezone.now() - timedelta(seconds=settings.TASK_RESUBMIT_AFTER)
    # Over the limit and not flagged yet (their last message was lost, so no submitter saw
    # them): flag them here, so that support finds every one.
    for task in Task.objects.filter(
        status=S.WAITING,
        submit_attempts__gte=submit_attempts_limit(),
        last_submit_at__lt=cutoff,
        submit_stuck_at__isnull=True,
    ).only("pk", "submit_attempts")[:100]:
        _mark_stuck(task)
    return [
        str(pk)
        for pk in Task.objects.filter(
            status=S.WAITING, created_at__lt=cutoff, submit_attempts__lt=submit_attempts_limit()
        )
        .exclude(last_submit_at__gte=cutoff)
        .values_list("pk", flat=True)[:500]
    ]


def retry_delay(attempt: int) -> float:
    """Exponential backoff with full jitter, capped (seconds)."""
    return random.uniform(0, min(60.0, 2.0 * math.pow(2, attempt)))  # noqa: S311
