"""Writes for generation tasks: submit, send upstream, refresh, finish, and the callbacks inbox.

Every status change is one conditional UPDATE naming the states it leaves (``_transition``);
the code branches on the row count, and the winner writes the ledger operation, the timeline
event and the notification in the same database transaction (DESIGN.md §4, PITFALLS 1-13).
Lock order everywhere: task row → hold row → account row.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from billing import selectors as billing_selectors
from billing import services as billing
from notifications.models import Notification
from notifications.services import notification_create
from rivya.errors import (
    InsufficientCredits,
    NotFound,
    TaskFinished,
    ValidationFailed,
)
from tasks.capacity import capacity_acquire, capacity_release
from tasks.media import MediaError, MediaInfo, inspect_media
from tasks.models import AIModel, CallbackDelivery, Task, TaskEvent, Upload
from tasks.providers.base import (
    CallbackEvent,
    InputFile,
    JobState,
    JobStatus,
    ProviderError,
    SubmitRequest,
)
from tasks.providers.registry import get_provider
from tasks.validation import FileCheck, check_files, check_prompt, normalize_params, price_for

logger = logging.getLogger(__name__)

SUBJECT = "tasks.task"  # how billing and notifications refer to a task
S = Task.Status


# --- small helpers --------------------------------------------------------------------------


def _event(task_id: Any, kind: str, message: str = "", **data: Any) -> None:
    TaskEvent.objects.create(task_id=task_id, kind=kind, message=message[:2000], data=data)


def _transition(task_id: Any, sources: Sequence[str], target: str, **fields: Any) -> bool:
    """One conditional UPDATE: True if this call moved the task, False if another got there
    first (or the task is in a state the transition does not leave)."""
    return (
        Task.objects.filter(pk=task_id, status__in=list(sources)).update(status=target, **fields)
        == 1
    )


def task_link(task_id: Any) -> str:
    return f"/history/?task={task_id}"


def _notify(task: Task, kind: str, title: str, body: str) -> None:
    notification_create(
        user=task.user,
        kind=kind,
        title=title,
        body=body,
        subject_type=SUBJECT,
        subject_id=str(task.pk),
        link=task_link(task.pk),
    )


def _ttl(task: Task) -> timedelta:
    return timedelta(seconds=task.result_ttl_seconds)


# --- uploads --------------------------------------------------------------------------------


def _inspect(file: Any) -> MediaInfo:
    try:
        return inspect_media(file, max_pixels=settings.MAX_IMAGE_PIXELS)
    except MediaError as exc:
        raise ValidationFailed(
            {"files": [f"{getattr(file, 'name', 'file')}: {exc.message}"]}, code=exc.code
        ) from None


def upload_create(*, user: Any, file: Any) -> Upload:
    """Store an uploaded reference file after checking its type by content.

    Raises ValidationFailed (unsupported, unreadable, too large).
    """
    size = file.size
    if size > settings.MAX_UPLOAD_BYTES:
        raise ValidationFailed(
            {"file": [f"Files are limited to {settings.MAX_UPLOAD_BYTES} bytes."]},
            code="file_too_large",
        )
    info = _inspect(file)
    import hashlib

    digest = hashlib.sha256()
    file.seek(0)
    for chunk in file.chunks():
        digest.update(chunk)
    file.seek(0)
    upload = Upload(
        user=user,
        original_name=(getattr(file, "name", "") or "")[:255],
        mime=info.mime,
        bytes=size,
        sha256=digest.hexdigest(),
        width=info.width,
        height=info.height,
        duration_ms=info.duration_ms,
    )
    upload.file.save("file", file, save=False)
    upload.save()
    return upload


# --- submit ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubmitOutcome:
    task: Task
    accepted: bool  # False: recorded as FAILED for insufficient credits (API answers 402)


def task_submit(
    *,
    user: Any,
    model_slug: Any,
    prompt: Any = "",
    params: Any = None,
    upload_ids: Sequence[Any] = (),
    files: Sequence[Any] = (),
) -> SubmitOutcome:
    """Validate a generation request, record it and hold its credits (DESIGN.md §4 steps 1-4).

    Before: nothing. After, if accepted: a WAITING task with its hold, and (after commit) the
    upstream submission queued. If the balance is too low: a FAILED task
    (``insufficient_credits``, no hold) and a notification, both committed; ``accepted`` False.
    Raises ValidationFailed (400) or CapacityExceeded (429); then nothing was written.
    """
    if not isinstance(model_slug, str) or not model_slug:
        raise ValidationFailed({"model": ["Give the slug of a model from /api/v1/models/."]})
    model = AIModel.objects.filter(slug=model_slug, enabled=True).first()
    if model is None:
        raise ValidationFailed({"model": [f"No model {model_slug!r}."]}, code="unknown_model")
    if not model.direct_generation or model.runtime != AIModel.Runtime.ASYNC:
        raise ValidationFailed(
            {"model": [f"{model.name} cannot be used as an asynchronous generation."]},
            code="model_not_available",
        )
    prompt = check_prompt(model, prompt)
    params = normalize_params(model.params_schema, params)

    if not isinstance(upload_ids, list | tuple) or not all(isinstance(u, str) for u in upload_ids):
        raise ValidationFailed({"upload_ids": ["Must be a list of upload ids."]})
    uploads: list[Upload] = []
    for raw_id in upload_ids:
        try:
            upload_uuid = uuid.UUID(raw_id)
        except ValueError:
            raise ValidationFailed({"upload_ids": [f"{raw_id!r} is not an upload id."]}) from None
        upload = Upload.objects.filter(pk=upload_uuid, user=user).first()
        if upload is None:  # someone else's upload is "not found", like a missing one
            raise ValidationFailed({"upload_ids": [f"No upload {raw_id}."]}, code="not_found")
        uploads.append(upload)
    checks = [
        FileCheck(
            u.original_name or str(u.pk),
            MediaInfo(
                mime=u.mime,
                kind=u.mime.split("/")[0],
                width=u.width,
                height=u.height,
                duration_ms=u.duration_ms,
            ),
            u.bytes,
        )
        for u in uploads
    ]
    for file in files:
        if file.size > settings.MAX_UPLOAD_BYTES:
            raise ValidationFailed(
                {"files": [f"{file.name}: over the {settings.MAX_UPLOAD_BYTES}-byte limit."]},
                code="file_too_large",
            )
        checks.append(FileCheck(file.name or "file", _inspect(file), file.size))
    check_files(model.file_rules, checks)
    price = price_for(model, params, checks)

    with transaction.atomic():
        uploads.extend(upload_create(user=user, file=file) for file in files)
        task = Task.objects.create(
            user=user,
            model=model,
            model_slug=model.slug,
            category=model.category,
            provider=model.provider,
            upstream_model=model.upstream_model,
            prompt=prompt,
            params=params,
            upload_ids=[str(u.pk) for u in uploads],
            price_micro=price,
            billing_type=model.billing_type,
            billing_policy=_policy(model),
            timeout_seconds=model.timeout_seconds,
            poll_interval_seconds=model.poll_interval_seconds,
            result_ttl_seconds=model.result_ttl_seconds or settings.TASK_RESULT_TTL,
        )
        _event(
            task.pk,
            "created",
            f"Submitted {model.slug} at {price} micro-credits.",
            price_micro=price,
            billing_policy=task.billing_policy,
        )
        try:
            billing.hold_create(
                user=user, amount=price, subject_type=SUBJECT, subject_id=str(task.pk)
            )
        except InsufficientCredits as exc:
            _refuse_for_credits(task, exc)
            task.refresh_from_db()
            return SubmitOutcome(task=task, accepted=False)
        # Exact under concurrency: conditional UPDATEs on capacity counters; a refusal raises
        # and rolls back the task and its hold, so a refused submit leaves nothing behind.
        capacity_acquire(task=task)
        Task.objects.filter(pk=task.pk).update(reserved_micro=price)
        _event(task.pk, "credits_held", amount_micro=price)
        transaction.on_commit(lambda: _enqueue_submit(task.pk))
    task.refresh_from_db()
    return SubmitOutcome(task=task, accepted=True)


def _policy(model: AIModel) -> dict[str, Any]:
    policy = {"failure_charge_percent": 0, "cancel_charge_percent": 0, "partial_success": True}
    policy.update(model.billing_policy or {})
    return policy


def _refuse_for_credits(task: Task, exc: InsufficientCredits) -> None:
    now = timezone.now()
    _transition(
        task.pk,
        [S.WAITING],
        S.FAILED,
        error_code="insufficient_credits",
        error_message=exc.message,
        error_kind="user",
        finished_at=now,
        expires_at=now + _ttl(task),
    )
    _event(
        task.pk,
        "failed",
        "Not enough credits; nothing was sent upstream.",
        code="insufficient_credits",
        **exc.extra,
    )
    _notify(
        task,
        Notification.Kind.INSUFFICIENT_CREDITS,
        "Not enough credits",
        f"Your {task.model_slug} generation needs {exc.extra.get('required')} credits; "
        f"{exc.extra.get('available')} are available. Add credits and try again.",
    )


def _enqueue_submit(task_id: Any) -> None:
    from tasks import tasks as celery_tasks

    celery_tasks.submit.delay(str(task_id))


# --- upstream submission --------------------------------------------------------------------


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
    Task.objects.filter(pk=task_id, status=S.WAITING).update(
        submit_attempts=F("submit_attempts") + 1, last_submit_at=timezone.now()
    )
    try:
        files = _input_files(task)
    except _UnusableInput as exc:
        # Found by our own processing: the input cannot be used. The user can fix it.
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
    now = timezone.now()
    with transaction.atomic():
        moved = _transition(
            task_id,
            [S.WAITING],
            S.GENERATING,
            upstream_id=result.upstream_id,
            submitted_at=now,
            next_poll_at=now + timedelta(seconds=task.poll_interval_seconds),
        )
        if moved:
            _event(task_id, "submitted", "Accepted upstream.", upstream_id=result.upstream_id)
        elif (
            Task.objects.filter(pk=task_id).values_list("upstream_id", flat=True).first()
            != result.upstream_id
        ):
            # Cancelled (or failed) while we were submitting: the job must not run on. But not
            # the job the task already tracks: a concurrent attempt under the same idempotency
            # key (a resubmit overlapping a slow submit, a redelivered message, a second beat)
            # gets that same job back and loses the UPDATE to the attempt that stored it;
            # cancelling it would fail the task.
            _event(
                task_id,
                "late_upstream_acceptance",
                "The upstream accepted the job after the task had finished; cancelling it.",
                upstream_id=result.upstream_id,
            )
            transaction.on_commit(
                lambda: _cancel_upstream_quietly(task.provider, result.upstream_id)
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


def _cancel_upstream_quietly(provider: str, upstream_id: str) -> None:
    try:
        get_provider(provider).cancel(upstream_id)
    except ProviderError as exc:
        logger.warning("upstream cancel of %s failed: %s", upstream_id, exc)


def task_submit_failed(*, task_id: Any, error: ProviderError) -> bool:
    """The upstream refused the job for good (or kept failing): FAILED, credits released."""
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


# --- outcomes -------------------------------------------------------------------------------


def _settle(task: Task, charge: int, reason: str) -> None:
    """What the winner of a terminal transition does, in its transaction: capture ``charge``
    of the hold (releasing the rest) or release it all, and give back the capacity slots."""
    hold = billing_selectors.hold_for_subject(subject_type=SUBJECT, subject_id=str(task.pk))
    if hold is not None:
        if charge:
            billing.hold_capture(hold=hold, amount=charge, reason=reason)
        else:
            billing.hold_release(hold=hold)
    capacity_release(task=task)


@dataclass(frozen=True)
class StoredOutput:
    name: str
    mime: str
    bytes: int
    width: int | None
    height: int | None
    duration_ms: int | None


def _result_dict(o: StoredOutput) -> dict[str, Any]:
    return {
        "name": o.name,
        "mime": o.mime,
        "bytes": o.bytes,
        "width": o.width,
        "height": o.height,
        "duration_ms": o.duration_ms,
    }


def task_succeed(
    *, task_id: Any, outputs: Sequence[StoredOutput], requested: int | None = None
) -> bool:
    """GENERATING → SUCCESS with the stored outputs; capture the price (or, for K of N outputs,
    floor(price × K / N) when the model's policy allows partial success). Returns True if this
    call finished the task; False (and nothing written) if another outcome won."""
    now = timezone.now()
    with transaction.atomic():
        task = Task.objects.select_related("user").get(pk=task_id)
        got, wanted = len(outputs), max(requested or len(outputs), len(outputs), 1)
        charge = task.price_micro
        if got < wanted and task.billing_policy.get("partial_success", True):
            charge = task.price_micro * got // wanted
        if not _transition(
            task_id,
            [S.GENERATING],
            S.SUCCESS,
            results=[_result_dict(o) for o in outputs],
            finished_at=now,
            started_at=task.started_at or now,
            expires_at=now + _ttl(task),
            charged_micro=charge,
            refunded_micro=task.reserved_micro - charge,
            next_poll_at=None,
        ):
            return False
        _settle(task, charge, f"{task.model_slug} generation")
        _event(
            task_id,
            "succeeded",
            f"{got} of {wanted} output(s) stored.",
            outputs=got,
            requested=wanted,
        )
        _event(
            task_id,
            "credits_captured",
            "Partial success: charged for the outputs delivered." if got < wanted else "",
            amount_micro=charge,
            released_micro=task.reserved_micro - charge,
        )
        _notify(
            task,
            Notification.Kind.GENERATION_SUCCESS,
            "Your generation is ready",
            f"{task.model_slug}: {got} result(s) ready"
            + (
                f" ({wanted - got} could not be produced; you were charged only for "
                "what was delivered)"
                if got < wanted
                else ""
            )
            + ".",
        )
    return True


FAILURE_TITLES = {
    S.FAILED: (Notification.Kind.GENERATION_FAILED, "Your generation failed"),
    S.REJECTED: (Notification.Kind.GENERATION_REJECTED, "Your request was rejected"),
}


def task_fail(
    *,
    task_id: Any,
    code: str,
    message: str,
    kind: str,
    status: str = S.FAILED,
    sources: Sequence[str] = Task.UNFINISHED,
) -> bool:
    """→ FAILED or REJECTED with the error; release the hold, or capture the share the model's
    policy charges for failures after upstream acceptance (REJECTED never charges). Returns
    True if this call finished the task."""
    now = timezone.now()
    with transaction.atomic():
        task = Task.objects.select_related("user").get(pk=task_id)
        percent = task.billing_policy.get("failure_charge_percent", 0) or 0
        accepted = task.submitted_at is not None
        charge = (
            task.reserved_micro * percent // 100
            if status == S.FAILED and accepted and percent
            else 0
        )
        if not _transition(
            task_id,
            sources,
            status,
            error_code=code[:64],
            error_message=message,
            error_kind=kind,
            finished_at=now,
            expires_at=now + _ttl(task),
            charged_micro=charge,
            refunded_micro=task.reserved_micro - charge,
            next_poll_at=None,
        ):
            return False
        _settle(task, charge, f"{task.model_slug}: failure charge ({percent}%)")
        _event(task_id, status.lower(), message, code=code, error_kind=kind)
        _event(
            task_id,
            "credits_captured" if charge else "credits_released",
            f"Billing policy: {percent}% of the price is charged for failures after the "
            "provider accepted the job."
            if charge
            else "Refunded in full.",
            amount_micro=charge or task.reserved_micro,
        )
        notif_kind, title = FAILURE_TITLES.get(status, FAILURE_TITLES[S.FAILED])
        refund = (
            "Your credits were refunded."
            if not charge
            else (f"Per this model's billing policy {percent}% was charged.")
        )
        _notify(task, notif_kind, title, f"{task.model_slug}: {message} {refund}")
    return True


# --- refreshing from upstream (polling and callbacks) ---------------------------------------


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
            _event(task_id, "poll_failed", exc.message, code=exc.code, reason=reason)
            return
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
    if not task_succeed(task_id=task.pk, outputs=stored, requested=status.requested_outputs):
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


# --- callbacks inbox ------------------------------------------------------------------------


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
                payload=dict(event.payload),
            )
            transaction.on_commit(lambda: _enqueue_callback(delivery.pk))
    except IntegrityError:
        return CallbackDelivery.objects.get(provider=provider, event_id=event_id), False
    return delivery, True


def _enqueue_callback(delivery_id: int) -> None:
    from tasks import tasks as celery_tasks

    celery_tasks.process_callback.delay(delivery_id)


CALLBACK_MAX_ATTEMPTS = 10


def callback_process(*, delivery_id: int) -> str:
    """Apply a stored delivery to its task. Returns "processed", "deferred" (our upstream id is
    not stored yet: the callback raced our own submission; check again later) or "ignored"."""
    delivery = CallbackDelivery.objects.filter(pk=delivery_id).first()
    if delivery is None or delivery.status != CallbackDelivery.Status.PENDING:
        return "processed"
    CallbackDelivery.objects.filter(pk=delivery_id).update(attempts=F("attempts") + 1)
    task = Task.objects.filter(provider=delivery.provider, upstream_id=delivery.upstream_id).first()
    if task is None:
        if delivery.attempts + 1 >= CALLBACK_MAX_ATTEMPTS:
            CallbackDelivery.objects.filter(pk=delivery_id, status="pending").update(
                status=CallbackDelivery.Status.IGNORED, processed_at=timezone.now()
            )
            return "ignored"
        return "deferred"
    won = CallbackDelivery.objects.filter(pk=delivery_id, status="pending").update(
        status=CallbackDelivery.Status.PROCESSED, processed_at=timezone.now(), task=task
    )
    if not won:
        return "processed"
    provider = get_provider(task.provider)
    status = provider.status_from_callback(delivery.payload)
    _event(
        task.pk,
        "callback",
        f"Callback {delivery.event_id}",
        state=status.state.value if status else None,
        delivery=delivery.pk,
    )
    if task.status in Task.TERMINAL:
        if task.status == S.CANCELLED and status and status.state == JobState.SUCCEEDED:
            _event(
                task.pk,
                "late_result",
                "A result arrived after cancellation; recorded, nothing else changed.",
            )
        return "processed"
    # Early callbacks (result not ready) change nothing: refresh sees the job still running,
    # and the poller checks again on schedule.
    task_refresh(task_id=task.pk, reason="callback", status=status)
    return "processed"


def callbacks_pending(*, older_than_seconds: int = 20) -> list[int]:
    cutoff = timezone.now() - timedelta(seconds=older_than_seconds)
    return list(
        CallbackDelivery.objects.filter(status="pending", received_at__lt=cutoff).values_list(
            "pk", flat=True
        )[:500]
    )


# --- reconciler -----------------------------------------------------------------------------


def waiting_due_for_resubmit() -> list[str]:
    """WAITING tasks whose submission never completed (worker crash, lost message): handed to
    the submitter again with the same idempotency key. Tasks that kept failing to submit are
    failed (credits released) by the submitter."""
    cutoff = timezone.now() - timedelta(seconds=settings.TASK_RESUBMIT_AFTER)
    return [
        str(pk)
        for pk in Task.objects.filter(status=S.WAITING, created_at__lt=cutoff)
        .exclude(last_submit_at__gte=cutoff)
        .values_list("pk", flat=True)[:500]
    ]


def retry_delay(attempt: int) -> float:
    """Exponential backoff with full jitter, capped (seconds)."""
    return random.uniform(0, min(60.0, 2.0 * math.pow(2, attempt)))  # noqa: S311


# --- cancel, delete -------------------------------------------------------------------------


def task_cancel(*, task_id: Any, actor: Any = None, reason: str = "") -> Task:
    """WAITING/GENERATING → CANCELLED; credits released (or, for work the provider accepted and
    bills, the model's ``cancel_charge_percent``); the upstream cancel is requested after commit.

    Cancelling a CANCELLED task returns it unchanged; any other finished task raises
    TaskFinished (409). A result that arrives later is recorded on the timeline only.
    """
    now = timezone.now()
    with transaction.atomic():
        task = Task.objects.select_related("user").get(pk=task_id)
        who = "support" if actor is not None and actor.pk != task.user_id else "you"
        message = f"Cancelled by {who}." + (f" {reason}" if reason else "")
        if not _transition(
            task_id,
            Task.UNFINISHED,
            S.CANCELLED,
            finished_at=now,
            expires_at=now + _ttl(task),
            error_code="cancelled",
            error_message=message,
            error_kind="user",
            next_poll_at=None,
            cancel_requested_at=now,
        ):
            task.refresh_from_db()
            if task.status == S.CANCELLED:
                return task
            raise TaskFinished(
                f"This task already finished ({task.status}).", extra={"status": task.status}
            )
        # Re-read under our row lock: a concurrent submission may have stored the upstream id.
        task.refresh_from_db()
        percent = task.billing_policy.get("cancel_charge_percent", 0) or 0
        charge = task.reserved_micro * percent // 100 if task.submitted_at and percent else 0
        Task.objects.filter(pk=task_id).update(
            charged_micro=charge, refunded_micro=task.reserved_micro - charge
        )
        _settle(task, charge, f"{task.model_slug}: cancellation charge ({percent}%)")
        _event(task_id, "cancelled", message, actor=getattr(actor, "pk", None))
        _event(
            task_id,
            "credits_captured" if charge else "credits_released",
            f"Billing policy: {percent}% of the price is charged for cancelling work the "
            "provider accepted."
            if charge
            else "Refunded in full.",
            amount_micro=charge or task.reserved_micro,
        )
        if who == "support":
            _notify(
                task,
                Notification.Kind.GENERATION_CANCELLED,
                "Your generation was cancelled",
                f"{task.model_slug}: {message} "
                + ("Your credits were refunded." if not charge else ""),
            )
        if task.upstream_id:
            transaction.on_commit(lambda: _enqueue_cancel_upstream(task_id))
    task.refresh_from_db()
    return task


def _enqueue_cancel_upstream(task_id: Any) -> None:
    from tasks import tasks as celery_tasks

    celery_tasks.cancel_upstream.delay(str(task_id))


def task_cancel_upstream(*, task_id: Any) -> None:
    """Ask the provider to stop a cancelled task's job. Raises ProviderError (retryable or
    not); the job stopping or having finished already are both fine."""
    task = Task.objects.filter(pk=task_id).first()
    if task is None or not task.upstream_id:
        return
    get_provider(task.provider).cancel(task.upstream_id)
    _event(task_id, "upstream_cancel_requested", "The provider was asked to stop the job.")


def task_delete(*, user: Any, task_id: Any) -> None:
    """Remove a task from the user's history at once (a running one is cancelled first).

    Soft delete: the row, its billing and its timeline stay for support; its files follow the
    expiry rules. Raises NotFound for someone else's (or an already deleted) task.
    """
    task = Task.objects.filter(pk=task_id, user=user, deleted_at__isnull=True).first()
    if task is None:
        raise NotFound("No such task.")
    if task.status in Task.UNFINISHED:
        with contextlib.suppress(TaskFinished):  # it finished meanwhile: delete it as it is
            task_cancel(task_id=task.pk, actor=user)
    with transaction.atomic():
        if Task.objects.filter(pk=task.pk, deleted_at__isnull=True).update(
            deleted_at=timezone.now()
        ):
            _event(task.pk, "deleted", "Deleted by the user (hidden from their history).")


# --- expiry ---------------------------------------------------------------------------------


def results_expire_due(*, limit: int = 200) -> int:
    """Purge the result files of finished tasks whose retention is over; returns how many tasks.

    Safe to run twice or concurrently: rows are claimed with SKIP LOCKED and marked in the same
    transaction that deletes their files (a crash before commit leaves them to the next run;
    deleting a missing file is a no-op).
    """
    now = timezone.now()
    with transaction.atomic():
        due = list(
            Task.objects.select_for_update(skip_locked=True)
            .filter(results_expired_at__isnull=True, expires_at__lte=now)
            .order_by("expires_at")
            .only("id", "results")[:limit]
        )
        for task in due:
            for result in task.results:
                _delete_stored(result["name"])
        if due:
            Task.objects.filter(pk__in=[t.pk for t in due]).update(results_expired_at=now)
            TaskEvent.objects.bulk_create(
                [
                    TaskEvent(
                        task_id=t.pk,
                        kind="results_expired",
                        message=f"Retention over: {len(t.results)} result file(s) deleted.",
                    )
                    for t in due
                ]
            )
    return len(due)


def _delete_stored(name: str) -> None:
    default_storage.delete(name)
    try:  # filesystem storage: drop the now empty attempt and task directories too
        path = Path(default_storage.path(name)).parent
        for directory in (path, path.parent):
            directory.rmdir()
    except (NotImplementedError, OSError):
        pass


def results_warn_expiring() -> int:
    """One results-expiring notification per successful task, TASK_EXPIRY_WARNING seconds
    before its files are purged. Returns how many were sent."""
    now = timezone.now()
    soon = now + timedelta(seconds=settings.TASK_EXPIRY_WARNING)
    sent = 0
    candidates = Task.objects.select_related("user").filter(
        status=S.SUCCESS,
        results_expired_at__isnull=True,
        expiry_warned_at__isnull=True,
        deleted_at__isnull=True,
        expires_at__gt=now,
        expires_at__lte=soon,
    )[:500]
    for task in candidates:
        with transaction.atomic():
            if Task.objects.filter(pk=task.pk, expiry_warned_at__isnull=True).update(
                expiry_warned_at=now
            ):
                _notify(
                    task,
                    Notification.Kind.RESULTS_EXPIRING,
                    "Results expiring soon",
                    f"The results of your {task.model_slug} generation will be deleted at "
                    f"{task.expires_at:%Y-%m-%d %H:%M} UTC. Download them before then.",
                )
                sent += 1
    return sent
