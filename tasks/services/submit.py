"""Submitting a generation: validate, record, hold credits, take capacity."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from billing import services as billing
from billing.models import Hold, IdempotencyRecord
from notifications.models import Notification
from notifications.webhooks import check_task_webhook
from rivya.errors import (
    MAX_JSON_DEPTH,
    InsufficientCredits,
    ValidationFailed,
    contains_nul,
    json_depth,
)
from rivya.key_cache import Credential
from tasks import model_cache
from tasks.capacity import capacity_acquire, capacity_plan, capacity_release
from tasks.media import MediaInfo
from tasks.models import AIModel, SubmitOutbox, Task, TaskEvent, Upload
from tasks.pricing import task_price
from tasks.services import accept, dispatch
from tasks.services.common import (
    SUBJECT,
    S,
    notify_user,
    record_event,
    result_ttl,
    task_event,
    transition_task,
)
from tasks.services.uploads import inspect_upload, upload_create
from tasks.validation import FileCheck, check_files, check_prompt, normalize_params


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
    webhook_url: Any = "",
    webhook_events: Any = None,
) -> SubmitOutcome:
    """Validate a generation request, record it and hold its credits.

    Before: nothing. After, if accepted: a WAITING task with its hold, in the outbox (the
    dispatcher queues its upstream submission as soon as it is committed). If the balance is
    too low: a FAILED task (``insufficient_credits``, no hold) and a notification, both
    committed; ``accepted`` False.
    Raises ValidationFailed (400) or CapacityExceeded (429); then nothing was written.

    On PostgreSQL a request without files is accepted by one statement
    (``tasks.services.accept``) against the process's copy of the model; whatever that
    statement refuses, and every request elsewhere, goes step by step (``accept_step_by_step``).
    """
    check_request_shape(model_slug, prompt, params, upload_ids)
    webhook = check_task_webhook(webhook_url, webhook_events)
    if not files:
        task = _accept_against_copy(
            user=user,
            model_slug=model_slug,
            prompt=prompt,
            params=params,
            upload_ids=upload_ids,
            webhook=webhook,
        )
        if task is not None:
            return SubmitOutcome(task=task, accepted=True)
    model = AIModel.objects.filter(slug=model_slug, enabled=True).first()
    if model is None:
        raise ValidationFailed({"model": [f"No model {model_slug!r}."]}, code="unknown_model")
    task, uploads = prepare_task(
        user=user,
        model=model,
        prompt=prompt,
        params=params,
        upload_ids=upload_ids,
        files=files,
        webhook=webhook,
    )
    return accept_step_by_step(task, uploads=uploads, files=files)


def task_submit_in_one_statement(
    *,
    user: Any,
    model_slug: Any,
    prompt: Any = "",
    params: Any = None,
    upload_ids: Sequence[Any] = (),
    webhook_url: Any = "",
    webhook_events: Any = None,
    record_for: Callable[[Task], IdempotencyRecord] | None = None,
    credential: Credential | None = None,
) -> Task | None:
    """``task_submit`` by the one statement only (PostgreSQL), for the requests it can answer
    alone: the accepted task, or None, and then nothing was written and the caller answers by
    the ordinary way. None when the balance is short, a capacity scope is full, the request is
    not valid by the process's copy of the model, or:

    - ``record_for``: the request's ``Idempotency-Key`` record (completed, with the answer,
      built from the task), stored by the same statement; None if the key has a record already;
    - ``credential``: the request was authenticated by a copied API key (``rivya.key_cache``),
      checked by the same statement; None if it is revoked or its user deactivated.

    Raises ValidationFailed for a malformed request."""
    check_request_shape(model_slug, prompt, params, upload_ids)
    return _accept_against_copy(
        user=user,
        model_slug=model_slug,
        prompt=prompt,
        params=params,
        upload_ids=upload_ids,
        webhook=check_task_webhook(webhook_url, webhook_events),
        record_for=record_for,
        credential=credential,
    )


def _accept_against_copy(
    *,
    user: Any,
    model_slug: Any,
    prompt: Any,
    params: Any,
    upload_ids: Sequence[Any],
    webhook: tuple[str, list[str]] = ("", []),
    record_for: Callable[[Task], IdempotencyRecord] | None = None,
    credential: Credential | None = None,
) -> Task | None:
    """Validate against the process's copy of the model and accept in one statement: the
    accepted task, or None (refused, not valid by the copy, or no such statement on this
    database: the caller goes step by step, and answers with the row as it is now)."""
    if not accept.fast_path_available():
        return None
    for _ in range(2):  # a second time only if the cached model row had changed
        cached = model_cache.cached_model(model_slug)
        if cached is None:
            return None  # unknown or disabled: the step-by-step path answers
        try:
            task, _ = prepare_task(
                user=user,
                model=cached.model,
                prompt=prompt,
                params=params,
                upload_ids=upload_ids,
                webhook=webhook,
            )
        except ValidationFailed:
            # The copy may be out of date (a limit raised, a parameter added since): a refusal
            # is given by the row as it is now.
            model_cache.forget_model(model_slug)
            return None
        outcome = accept_fast(
            task, cached.fingerprint, record_for=record_for, credential=credential
        )
        if outcome is accept.Accept.ACCEPTED:
            return task
        if outcome is not accept.Accept.MODEL_CHANGED:
            return None
        model_cache.forget_model(model_slug)
    return None


def check_request_shape(model_slug: Any, prompt: Any, params: Any, upload_ids: Any) -> None:
    """What must hold of a submit's fields before any model is looked up (400 otherwise)."""
    if not isinstance(model_slug, str) or not model_slug:
        raise ValidationFailed({"model": ["Give the slug of a model from /api/v1/models/."]})
    for name, value in (
        ("model", model_slug),
        ("prompt", prompt),
        ("params", params),
        ("upload_ids", upload_ids),
    ):
        if json_depth(value) > MAX_JSON_DEPTH:
            raise ValidationFailed({name: [f"Nested deeper than {MAX_JSON_DEPTH} levels."]})
        if contains_nul(value):
            raise ValidationFailed(
                {name: ["Must not contain NUL characters or unpaired surrogates."]}
            )


def prepare_task(
    *,
    user: Any,
    model: AIModel,
    prompt: Any,
    params: Any,
    upload_ids: Any,
    files: Sequence[Any] = (),
    webhook: tuple[str, list[str]] = ("", []),
) -> tuple[Task, list[Upload]]:
    """Validate the request against the enabled ``model`` and price it: the unsaved WAITING
    task, with the uploads it names. Raises ValidationFailed (400)."""
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
        checks.append(FileCheck(file.name or "file", inspect_upload(file), file.size))
    check_files(model.file_rules, checks)
    price = task_price(
        model=model, params=params, durations_ms=[c.info.duration_ms or 0 for c in checks]
    )
    task = task_for_model(
        user=user,
        model=model,
        prompt=prompt,
        params=params,
        price=price,
        upload_ids=[str(u.pk) for u in uploads],
        webhook_url=webhook[0],
        webhook_events=webhook[1],
    )
    return task, uploads


def task_for_model(
    *, user: Any, model: AIModel, prompt: str, params: dict[str, Any], price: int, **fields: Any
) -> Task:
    """A new WAITING task of ``model`` (unsaved): what it takes from the catalog row at submit
    (later catalog edits never change a submitted task); ``fields`` add to it or override it."""
    values = {
        "user": user,
        "model": model,
        "model_slug": model.slug,
        "category": model.category,
        "provider": model.provider,
        "upstream_model": model.upstream_model,
        "prompt": prompt,
        "params": params,
        "price_micro": price,
        "billing_type": model.billing_type,
        "billing_policy": task_policy(model),
        "timeout_seconds": model.timeout_seconds,
        "poll_interval_seconds": model.poll_interval_seconds,
        "result_ttl_seconds": model.result_ttl_seconds or settings.TASK_RESULT_TTL,
    }
    return Task(**{**values, **fields})


def accept_fast(
    task: Task,
    model_fingerprint: str,
    *,
    record_for: Callable[[Task], IdempotencyRecord] | None = None,
    credential: Credential | None = None,
) -> accept.Accept:
    """The one-statement accept of a prepared task (PostgreSQL)."""
    scopes = capacity_plan(task=task)
    task.capacity_scopes = [scope for scope, _ in scopes]
    price = task.price_micro
    if price:
        task.reserved_micro = price
        hold = Hold(amount=price, subject_type=SUBJECT, subject_id=str(task.pk))
        events = [created_event(task), task_event(task.pk, "credits_held", amount_micro=price)]
    else:
        hold, events = None, [created_event(task), free_event(task)]
    outcome = accept.accept_in_one_statement(
        task=task,
        model_fingerprint=model_fingerprint,
        scopes=scopes,
        events=events,
        hold=hold,
        record_for=record_for,
        credential=credential,
    )
    if outcome is not accept.Accept.ACCEPTED:
        task.reserved_micro, task.capacity_scopes = 0, []
    return outcome


def accept_step_by_step(
    task: Task, *, uploads: list[Upload], files: Sequence[Any] = ()
) -> SubmitOutcome:
    """Store a prepared task with the ORM, one step at a time (any database; the answer to
    everything the one-statement accept refuses)."""
    price = task.price_micro
    with transaction.atomic():
        if files:
            uploads.extend(upload_create(user=task.user, file=file) for file in files)
            task.upload_ids = [str(u.pk) for u in uploads]
        task.save(force_insert=True)
        created_event(task).save()
        # Capacity is part of validation (429, nothing stored), so it comes before credits.
        # Exact under concurrency: conditional UPDATEs on capacity counters; a refusal raises
        # and rolls back the task, so a refused submit leaves nothing behind.
        capacity_acquire(task=task)
        if price:
            try:
                billing.hold_create(
                    user=task.user, amount=price, subject_type=SUBJECT, subject_id=str(task.pk)
                )
            except InsufficientCredits as exc:
                refuse_for_credits(task, exc)
                task.refresh_from_db()
                return SubmitOutcome(task=task, accepted=False)
            Task.objects.filter(pk=task.pk).update(reserved_micro=price)
            task.reserved_micro = price
            task_event(task.pk, "credits_held", amount_micro=price).save()
        else:
            # A free model (price 0, which the catalog allows): nothing to hold, so no hold; the
            # outcome settles nothing and ledger_check expects no hold for it.
            free_event(task).save()
        # In the outbox; the dispatcher is woken when this commits.
        SubmitOutbox.objects.create(task=task)
        dispatch.notify_dispatcher()
    return SubmitOutcome(task=task, accepted=True)


def created_event(task: Task) -> TaskEvent:
    price = task.price_micro
    return task_event(
        task.pk,
        "created",
        f"Submitted {task.model_slug} at {price} micro-credits.",
        price_micro=price,
        billing_policy=task.billing_policy,
    )


def free_event(task: Task) -> TaskEvent:
    return task_event(task.pk, "free", "Free model: no credits held.")


def task_policy(model: AIModel) -> dict[str, Any]:
    """The model's billing policy, normalized: percentages are integers within 0-100 (a
    malformed catalog entry must never make a task impossible to settle)."""
    raw = model.billing_policy if isinstance(model.billing_policy, dict) else {}

    def percent(name: str) -> int:
        try:
            return min(100, max(0, int(raw.get(name, 0) or 0)))
        except (TypeError, ValueError):
            return 0

    return {
        "failure_charge_percent": percent("failure_charge_percent"),
        "cancel_charge_percent": percent("cancel_charge_percent"),
        "partial_success": bool(raw.get("partial_success", True)),
    }


def refuse_for_credits(task: Task, exc: InsufficientCredits) -> None:
    """WAITING → FAILED ``insufficient_credits`` without a hold, and a notification: what a
    submit (async or single) records when the balance is too low."""
    now = timezone.now()
    transition_task(
        task.pk,
        [S.WAITING],
        S.FAILED,
        error_code="insufficient_credits",
        error_message=exc.message,
        error_kind="user",
        finished_at=now,
        expires_at=now + result_ttl(task),
    )
    capacity_release(task=task)
    record_event(
        task.pk,
        "failed",
        "Not enough credits; nothing was sent upstream.",
        code="insufficient_credits",
        **exc.extra,
    )
    notify_user(
        task,
        Notification.Kind.INSUFFICIENT_CREDITS,
        "Not enough credits",
        f"Your {task.model_slug} generation needs {exc.extra.get('required')} credits; "
        f"{exc.extra.get('available')} are available. Add credits and try again.",
    )
