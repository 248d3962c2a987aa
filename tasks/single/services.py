"""Running a single (synchronous) task: docs/single.md.

A request goes through three phases; the view runs them (``tasks.single.api``), the gate slot
held around all three:

1. ``single_start`` (sync, one short database phase): validate (model access, the type's request
   serializer, payload and file validators), store the files as a dataset, then in one
   transaction create the task GENERATING with its hold (or FAILED ``insufficient_credits``) and
   its ``sync_deadline_at``. Nothing is sent anywhere yet.
2. ``single_execute`` (async, no database): the handler's provider call, bounded by the task's
   time budget; its answer or its error as a value.
3. ``single_finish`` (sync, short): store the result file; SUCCESS capturing the price, or
   FAILED / REJECTED refunding it.

A task whose process dies between 1 and 3 is refunded by ``single_settle_interrupted`` (beat)
once its deadline has passed. With ``Prefer: respond-async`` phase 1 records the task and a
worker runs 2 and 3 (``single_run_deferred``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import transaction
from django.utils import timezone

from billing import services as billing
from rivya.errors import (
    MAX_JSON_DEPTH,
    DomainError,
    InsufficientCredits,
    NotFound,
    ValidationFailed,
    contains_nul,
    json_depth,
)
from tasks.catalog import SINGLE_DEFAULT_MODELS
from tasks.models import AIModel, DatasetFile, Task
from tasks.pricing import task_price
from tasks.providers.base import InputFile, InputRejected, ProviderError
from tasks.providers.registry import get_provider
from tasks.services import enqueue
from tasks.services.common import SUBJECT, S, record_event
from tasks.services.outcomes import StoredOutput, task_fail, task_succeed
from tasks.services.submit import refuse_for_credits, task_for_model
from tasks.services.uploads import inspect_upload
from tasks.single.datasets import CheckedFile, dataset_store
from tasks.single.registry import (
    Files,
    SingleInput,
    SingleOutput,
    SingleService,
    get_service,
    validation_error,
)
from tasks.validation import FileCheck, check_prompt, normalize_params

logger = logging.getLogger(__name__)


class RequiresAsync(DomainError):
    code = "requires_async"
    status = 400


@dataclass(frozen=True)
class SingleRun:
    """Everything phases 2 and 3 need, so that they touch no request and no model row."""

    task_id: uuid.UUID
    single_type: str
    provider: str
    upstream_model: str
    input: SingleInput
    timeout_s: float
    # Whether the outcome is also a notification: only when the requester may not see the
    # answer (a task run by a worker); a request that waits for its answer gets it directly.
    notify: bool


@dataclass(frozen=True)
class SingleStart:
    task: Task
    run: SingleRun | None  # run it in this request
    deferred: bool = False  # recorded for a worker (Prefer: respond-async): 202
    replayed: bool = False  # an Idempotency-Key seen before: the first request's task


@dataclass(frozen=True)
class Failure:
    """Phase 2's error, as a value: how the task ends."""

    code: str
    message: str
    kind: str  # "user" (REJECTED) | "provider" | "infra"
    rejected: bool = False


Outcome = SingleOutput | Failure


# --- phase 1 ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Valid:
    model: AIModel
    prompt: str
    params: dict[str, Any]
    files: list[CheckedFile]
    price: int
    sync_refusal: str | None


def single_start(
    *,
    user: Any,
    single_type: str,
    data: Mapping[str, Any],
    files: Sequence[Any] = (),
    prefer_async: bool = False,
    idempotency_key: str | None = None,
    fingerprint: str = "",
) -> SingleStart:
    """Validate a single-task request and record it: phase 1.

    Before: nothing. After, if accepted: a GENERATING task with its hold and deadline, and
    ``run`` to execute (or, ``deferred``, a worker queued after commit). If the balance is too
    low: a FAILED ``insufficient_credits`` task without a hold, and a notification. With a
    replayed ``Idempotency-Key``: the first request's task, nothing new.
    Raises NotFound (unknown type), ValidationFailed / RequiresAsync (400; nothing written but
    a FAILED dataset when storing a file failed), UploadFailed (503), and the idempotency
    errors (409 / 422).
    """
    service = get_service(single_type)
    if service is None:
        raise NotFound(f"No single task type {single_type!r}.")
    record = None
    if idempotency_key is not None:
        claim = billing.idempotency_claim(user=user, key=idempotency_key, fingerprint=fingerprint)
        if claim.replay is not None:
            return _replay(user, claim.replay)
        record = claim.record
    try:
        valid = _validate(service, data, files)
        if valid.sync_refusal and not prefer_async:
            raise RequiresAsync(
                f"{valid.sync_refusal} Send it again with the header `Prefer: respond-async` "
                "to have it run in the background (the answer is 202 with the task's poll "
                "URL), or use a shorter file.",
            )
        return _record(user, service, valid, deferred=prefer_async, record=record)
    except BaseException:
        if record is not None:
            billing.idempotency_abandon(record=record)
        raise


def _replay(user: Any, record: Any) -> SingleStart:
    """The first request's task, as its record names it (answered 202 when it was deferred)."""
    body = record.response_body
    task_id = body.get("single_task_id") if isinstance(body, dict) else None
    task = Task.objects.filter(pk=task_id, user=user).first() if task_id else None
    if task is None:  # pragma: no cover - the record names the task it created
        raise NotFound("The task of this idempotency key no longer exists.")
    return SingleStart(task=task, run=None, deferred=record.response_status == 202, replayed=True)


def _validate(service: SingleService, data: Mapping[str, Any], files: Sequence[Any]) -> _Valid:
    if json_depth(dict(data)) > MAX_JSON_DEPTH:
        raise ValidationFailed({"body": [f"Nested deeper than {MAX_JSON_DEPTH} levels."]})
    if contains_nul(dict(data)):
        raise ValidationFailed(
            {"body": ["Must not contain NUL characters or unpaired surrogates."]}
        )
    serializer = service.request_serializer(data=data)
    if not serializer.is_valid():
        raise validation_error(serializer.errors)
    fields = dict(serializer.validated_data)
    # (The view takes multipart files out of ``data``: a JSON ``files`` is an unknown field.)
    unknown = sorted(set(data) - set(serializer.fields) - {"csrfmiddlewaretoken"})
    if unknown:
        raise ValidationFailed({k: ["Unknown field."] for k in unknown})
    model = _model(service, fields.get("model"))
    payload = service.validate_payload(fields)
    prompt = check_prompt(model, payload.prompt)
    try:
        params = normalize_params(model.params_schema, payload.params)
    except ValidationFailed as exc:
        # A body field that is a model parameter is reported under its own name.
        renamed = {
            name.removeprefix("params.")
            if name.removeprefix("params.").split(".")[0] in service.param_fields
            else name: messages
            for name, messages in exc.fields.items()
        }
        raise ValidationFailed(renamed, code=exc.code) from None

    if service.files is Files.NONE and files:
        raise ValidationFailed({"files": ["This service takes no files."]})
    if service.files is Files.REQUIRED and not files:
        raise ValidationFailed(
            {"files": ["Send the audio file as a multipart part named `files`."]},
            code="file_required",
        )
    checked = []
    for file in files:
        if file.size > settings.MAX_UPLOAD_BYTES:
            raise ValidationFailed(
                {"files": [f"{file.name}: over the {settings.MAX_UPLOAD_BYTES}-byte limit."]},
                code="file_too_large",
            )
        checked.append(CheckedFile(file, file.name or "file", inspect_upload(file), file.size))
    sync_refusal = service.validate_files(
        model, [FileCheck(c.name, c.info, c.size) for c in checked]
    )
    price = task_price(
        model=model,
        params=params,
        durations_ms=[c.info.duration_ms or 0 for c in checked],
        characters=payload.characters,
    )
    return _Valid(model, prompt, params, checked, price, sync_refusal)


def _model(service: SingleService, slug: Any) -> AIModel:
    slug = slug or SINGLE_DEFAULT_MODELS.get(service.type.value)
    model = AIModel.objects.filter(slug=slug, enabled=True).first() if slug else None
    if model is None:
        raise ValidationFailed({"model": [f"No model {slug!r}."]}, code="unknown_model")
    if (
        model.runtime != AIModel.Runtime.SYNC
        or model.single_type != service.type
        or model.category != service.category
        or not model.direct_generation
    ):
        raise ValidationFailed(
            {"model": [f"{model.name} does not run {service.type.label.lower()} tasks."]},
            code="model_not_available",
        )
    if model.provider not in service.providers:
        raise ValidationFailed(
            {"model": [f"{model.name} is not available right now; try another model."]},
            code="model_not_available",
        )
    return model


def task_timeout_s(model: AIModel, *, deferred: bool) -> int:
    """A single task's time budget: inside a request the model's timeout, capped by
    SINGLE_TASK_TIMEOUT_S; in a worker (Prefer: respond-async, for inputs too big for a
    request) SINGLE_ASYNC_TIMEOUT_S."""
    if deferred:
        return max(1, settings.SINGLE_ASYNC_TIMEOUT_S)
    return max(1, min(model.timeout_seconds, settings.SINGLE_TASK_TIMEOUT_S))


def _record(
    user: Any, service: SingleService, valid: _Valid, *, deferred: bool, record: Any
) -> SingleStart:
    model = valid.model
    dataset = (
        dataset_store(user=user, purpose=service.type.value, files=valid.files)
        if valid.files
        else None
    )
    timeout_s = task_timeout_s(model, deferred=deferred)
    now = timezone.now()
    with transaction.atomic():
        task = task_for_model(
            user=user,
            model=model,
            prompt=valid.prompt,
            params=valid.params,
            price=valid.price,
            runtime=AIModel.Runtime.SYNC,
            single_type=service.type,
            dataset=dataset,
            timeout_seconds=timeout_s,
        )
        task.save(force_insert=True)
        record_event(
            task.pk,
            "created",
            f"{service.type.label} request for {model.slug} at {valid.price} micro-credits"
            + (f", with dataset {dataset.pk}." if dataset else "."),
            price_micro=valid.price,
            billing_policy=task.billing_policy,
            **({"dataset_id": str(dataset.pk)} if dataset else {}),
        )
        if record is not None:
            # Completed with the work: a retry with this key gets this task, never a second.
            billing.idempotency_complete(
                record=record,
                status=202 if deferred else 200,
                body={"single_task_id": str(task.pk)},
                headers={},
            )
        if valid.price:
            try:
                billing.hold_create(
                    user=user, amount=valid.price, subject_type=SUBJECT, subject_id=str(task.pk)
                )
            except InsufficientCredits as exc:
                refuse_for_credits(task, exc)
                task.refresh_from_db()
                return SingleStart(task=task, run=None)
            record_event(task.pk, "credits_held", amount_micro=valid.price)
        else:
            record_event(task.pk, "free", "Free model: no credits held.")
        # In a worker the budget starts at its claim (which sets the deadline again): until
        # then the deadline leaves the budget once more for the time in the queue.
        deadline = now + timedelta(
            seconds=timeout_s * (2 if deferred else 1) + settings.SINGLE_DEADLINE_MARGIN_S
        )
        Task.objects.filter(pk=task.pk).update(
            status=S.GENERATING,
            reserved_micro=valid.price,
            started_at=now,
            sync_deadline_at=deadline,
            # In the request the handler runs right away; a worker counts its own start (and
            # ``last_submit_at`` is when the task was last handed to the workers).
            **(
                {"last_submit_at": now}
                if deferred
                else {"submitted_at": now, "submit_attempts": 1, "last_submit_at": now}
            ),
        )
        record_event(
            task.pk,
            "started",
            "Queued for a worker (the client asked Prefer: respond-async)."
            if deferred
            else "Running inside the request.",
            deadline=deadline.isoformat(),
            timeout_s=timeout_s,
        )
        if deferred:
            transaction.on_commit(lambda: enqueue.run_single(task.pk), robust=True)
    task.refresh_from_db()
    if deferred:
        return SingleStart(task=task, run=None, deferred=True)
    return SingleStart(task=task, run=_run_of(task, valid.files, notify=False))


def _run_of(task: Task, files: Sequence[CheckedFile], *, notify: bool) -> SingleRun:
    inputs = []
    for checked in files:
        checked.file.seek(0)
        inputs.append(InputFile(checked.name, checked.info.mime, checked.file.read()))
    return SingleRun(
        task_id=task.pk,
        single_type=task.single_type,
        provider=task.provider,
        upstream_model=task.upstream_model,
        input=SingleInput(prompt=task.prompt, params=task.params, files=tuple(inputs)),
        timeout_s=float(task.timeout_seconds),
        notify=notify,
    )


# --- phase 2 ----------------------------------------------------------------------------------


async def single_execute(run: SingleRun) -> Outcome:
    """Call the provider through the type's handler, within ``run.timeout_s``. Never raises
    (but for cancellation): an error is returned as the Failure the task ends with."""
    service = get_service(run.single_type)
    if service is None:  # pragma: no cover - the type was checked at start
        return Failure("unknown_type", "This task type is no longer available.", "infra")
    try:
        provider = get_provider(run.provider)
        async with asyncio.timeout(run.timeout_s):
            return await service.handler(provider, run.upstream_model, run.input, run.timeout_s)
    except InputRejected as exc:
        return Failure(exc.code, f"The provider refused the input: {exc.message}", "user", True)
    except ProviderError as exc:
        if exc.code == "upstream_timeout":
            return Failure(exc.code, _timeout_message(run), "provider")
        return Failure(exc.code, f"The provider failed: {exc.message}", "provider")
    except TimeoutError:
        return Failure("upstream_timeout", _timeout_message(run), "provider")
    except Exception:
        logger.exception("single task %s: the handler failed", run.task_id)
        return Failure("internal_error", "Rivya failed while running this task.", "infra")


def _timeout_message(run: SingleRun) -> str:
    return f"The provider did not answer within {run.timeout_s:g} s."


# --- phase 3 ----------------------------------------------------------------------------------


def single_finish(run: SingleRun, outcome: Outcome) -> tuple[Task, dict[str, Any] | None]:
    """Record the outcome: phase 3. Returns the task as it now is, and the result when this call
    finished it with SUCCESS (None when it failed, or another outcome won: the deadline's
    refund, a cancellation)."""
    won = False
    # The finish may have waited for a database thread: its deadline starts again now, so the
    # reconciler does not refund a task whose answer is being recorded (the transition below is
    # conditional all the same).
    now = timezone.now()
    Task.objects.filter(pk=run.task_id, status=S.GENERATING, sync_deadline_at__gt=now).update(
        sync_deadline_at=now + timedelta(seconds=settings.SINGLE_DEADLINE_MARGIN_S)
    )
    if isinstance(outcome, SingleOutput):
        name = default_storage.save(
            f"results/{run.task_id}/{uuid.uuid4().hex[:12]}/0.{outcome.file.ext}",
            ContentFile(outcome.file.data),
        )
        stored = StoredOutput(
            name=name,
            mime=outcome.file.mime,
            bytes=len(outcome.file.data),
            width=None,
            height=None,
            duration_ms=outcome.file.duration_ms,
        )
        # An error here may come after the commit (a connection lost during COMMIT): the file is
        # left for the storage sweep, which deletes it only if no row refers to it.
        won = task_succeed(task_id=run.task_id, outputs=[stored], notify=run.notify)
        if not won:
            default_storage.delete(name)
            record_event(
                run.task_id,
                "late_result",
                "The provider answered after the task had ended; the answer was discarded.",
            )
    else:
        task_fail(
            task_id=run.task_id,
            code=outcome.code,
            message=outcome.message,
            kind=outcome.kind,
            status=S.REJECTED if outcome.rejected else S.FAILED,
            sources=[S.GENERATING],
            charge_policy=False,
            notify=run.notify,
        )
    task = Task.objects.get(pk=run.task_id)
    return task, (outcome.result if won and isinstance(outcome, SingleOutput) else None)


def single_result(task: Task) -> dict[str, Any] | None:
    """The stored result of a finished single task (None unless SUCCESS with its file still
    stored): the JSON document of a text type; for speech, what the audio file is."""
    if not task.results_available or not task.results:
        return None
    output = task.results[0]
    if output.get("mime") == "application/json":
        try:
            with default_storage.open(output["name"], "rb") as fh:
                return json.loads(fh.read())
        except (OSError, ValueError):
            logger.warning("single task %s: its result file could not be read", task.pk)
            return None
    return {
        "mime": output.get("mime"),
        "bytes": output.get("bytes"),
        "duration_ms": output.get("duration_ms"),
        "voice": task.params.get("voice"),
        "characters": len(task.prompt),
    }


# --- a worker's run (Prefer: respond-async) ---------------------------------------------------


def single_run_deferred(*, task_id: Any) -> bool:
    """Run a task recorded with ``Prefer: respond-async``: claim it (once: ``submit_attempts``
    0 → 1, so a redelivered message does nothing), then phases 2 and 3. Returns whether this
    call ran it."""
    now = timezone.now()
    timeout_s = Task.objects.filter(pk=task_id).values_list("timeout_seconds", flat=True).first()
    if timeout_s is None:
        return False
    # One UPDATE claims it (once) and starts its budget; never past its deadline, when the
    # reconciler may be refunding it.
    claimed = Task.objects.filter(
        pk=task_id,
        status=S.GENERATING,
        runtime=AIModel.Runtime.SYNC,
        submit_attempts=0,
        sync_deadline_at__gt=now,
    ).update(
        submit_attempts=1,
        submitted_at=now,
        last_submit_at=now,
        sync_deadline_at=now + timedelta(seconds=timeout_s + settings.SINGLE_DEADLINE_MARGIN_S),
    )
    if not claimed:
        return False
    task = Task.objects.get(pk=task_id)
    inputs = tuple(
        InputFile(f.original_name or f"file{f.position}", f.mime, _read(f))
        for f in (DatasetFile.objects.filter(dataset_id=task.dataset_id) if task.dataset_id else [])
    )
    run = SingleRun(
        task_id=task.pk,
        single_type=task.single_type,
        provider=task.provider,
        upstream_model=task.upstream_model,
        input=SingleInput(prompt=task.prompt, params=task.params, files=inputs),
        timeout_s=float(task.timeout_seconds),
        notify=True,
    )
    record_event(task.pk, "worker_started", "A worker is running the task.")
    outcome = asyncio.run(_execute_and_close(run))
    single_finish(run, outcome)
    return True


async def _execute_and_close(run: SingleRun) -> Outcome:
    from tasks.providers import http

    try:
        return await single_execute(run)
    finally:
        await http.aclose_clients()


def _read(dataset_file: DatasetFile) -> bytes:
    with dataset_file.file.open("rb") as fh:
        return fh.read()


# --- the reconciler ---------------------------------------------------------------------------


def single_requeue_unclaimed(*, now: Any = None, limit: int = 200) -> int:
    """Hand again to the workers the respond-async tasks no worker has claimed
    (``submit_attempts`` 0) SINGLE_REQUEUE_AFTER_S after they were last handed over: the
    broker may have lost the message (it is sent after commit). A duplicate message is harmless
    (the claim runs a task once). Returns how many were queued again."""
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=settings.SINGLE_REQUEUE_AFTER_S)
    due = list(
        Task.objects.filter(
            status=S.GENERATING,
            runtime=AIModel.Runtime.SYNC,
            submit_attempts=0,
            last_submit_at__lt=cutoff,
            sync_deadline_at__gt=now,
        ).values_list("pk", flat=True)[:limit]
    )
    queued = 0
    for task_id in due:
        if Task.objects.filter(pk=task_id, submit_attempts=0, last_submit_at__lt=cutoff).update(
            last_submit_at=now
        ):
            record_event(task_id, "requeued", "No worker had taken it yet: queued again.")
            enqueue.run_single(task_id)
            queued += 1
    return queued


INTERRUPTED_MESSAGE = (
    "The server running this task stopped before it finished (a restart or a crash), so it "
    "was not completed."
)


def single_settle_interrupted(*, now: Any = None, limit: int = 200) -> int:
    """Refund single tasks still GENERATING past their ``sync_deadline_at``: the process
    running them died (a request's handler and its finish always end before the deadline).
    Each is FAILED ``interrupted`` (kind ``infra``), refunded in full, and notified (its
    requester got no answer). Safe to run concurrently: each outcome is a conditional UPDATE.
    Returns how many this call settled."""
    now = now or timezone.now()
    due = list(
        Task.objects.filter(
            status=S.GENERATING, runtime=AIModel.Runtime.SYNC, sync_deadline_at__lt=now
        )
        .order_by("sync_deadline_at")
        .values_list("pk", flat=True)[:limit]
    )
    settled = 0
    for task_id in due:
        settled += task_fail(
            task_id=task_id,
            code="interrupted",
            message=INTERRUPTED_MESSAGE,
            kind="infra",
            sources=[S.GENERATING],
            charge_policy=False,
        )
    return settled
