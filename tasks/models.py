"""The model catalog, generation tasks (``ai_task``), their timeline, the provider callbacks
inbox and uploaded reference files."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q


class Category(models.TextChoices):
    IMAGE = "image", "Image"
    VIDEO = "video", "Video"
    AUDIO = "audio", "Audio"
    CHAT = "chat", "Chat"
    TEXT = "text", "Text"  # synchronous text services: transcription, completion, translation


class SingleType(models.TextChoices):
    """The synchronous ("single") task types served at ``/api/v1/single/<type>/``
    (``tasks.single.registry`` holds what each one runs)."""

    TRANSCRIPTION = "transcription", "Transcription"
    COMPLETION = "completion", "Completion"
    TRANSLATION = "translation", "Translation"
    TEXT_TO_SPEECH = "text_to_speech", "Text to speech"


class AIModel(models.Model):
    """One AI model users can run, with its price, parameters and rules."""

    class Runtime(models.TextChoices):
        ASYNC = "async", "Asynchronous (callback / polling)"
        SYNC = "sync", "Synchronous (inside the request)"

    class BillingType(models.TextChoices):
        PER_TASK = "per_task", "Per task"
        PER_OUTPUT = "per_output", "Per output (e.g. per image)"
        PER_OUTPUT_SECOND = "per_output_second", "Per output second"
        PER_TOKEN = "per_token", "Per token"
        PER_CHARACTER = "per_character", "Per input character"

    slug = models.SlugField(max_length=100, unique=True)
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    category = models.CharField(max_length=16, choices=Category.choices)
    provider = models.CharField(max_length=32, help_text="provider key, e.g. 'sandbox'")
    upstream_model = models.CharField(max_length=200, help_text="the provider's model id")
    runtime = models.CharField(max_length=8, choices=Runtime.choices, default=Runtime.ASYNC)
    single_type = models.CharField(
        max_length=32,
        choices=SingleType.choices,
        blank=True,
        help_text="synchronous models: the /api/v1/single/<type>/ service they run",
    )
    enabled = models.BooleanField(default=True, help_text="listed and usable")
    direct_generation = models.BooleanField(
        default=True, help_text="usable directly from the Studio / tasks API"
    )
    prompt_required = models.BooleanField(default=True)
    max_prompt_length = models.PositiveIntegerField(default=2000)
    params_schema = models.JSONField(
        default=dict, blank=True, help_text="JSON Schema (object) of the parameters, with defaults"
    )
    file_rules = models.JSONField(
        default=dict,
        blank=True,
        help_text='reference files: {"accept": [mime...], "min": 0, "max": 0, "max_bytes": n, '
        '"min_duration_ms": n, "max_duration_ms": n}',
    )
    price_micro = models.BigIntegerField(
        help_text="micro-credits per task / output / second / token, per billing type"
    )
    billing_type = models.CharField(
        max_length=24, choices=BillingType.choices, default=BillingType.PER_TASK
    )
    billing_policy = models.JSONField(
        default=dict,
        blank=True,
        help_text='{"failure_charge_percent": 0, "cancel_charge_percent": 0, '
        '"partial_success": true}',
    )
    # Chat models (billing type per_token): ``price_micro`` is the price of an output token,
    # ``input_price_micro`` of an input token; the context window and the largest reply.
    input_price_micro = models.BigIntegerField(
        null=True, blank=True, help_text="chat: micro-credits per input token"
    )
    context_window = models.PositiveIntegerField(
        null=True, blank=True, help_text="chat: tokens of context (history + reply)"
    )
    max_output_tokens = models.PositiveIntegerField(
        null=True, blank=True, help_text="chat: the largest max_tokens a turn may ask for"
    )
    timeout_seconds = models.PositiveIntegerField(default=600)
    poll_interval_seconds = models.PositiveIntegerField(default=2)
    result_ttl_seconds = models.PositiveIntegerField(
        null=True, blank=True, help_text="overrides TASK_RESULT_TTL for this model"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "AI model"
        ordering = ("category", "name")
        constraints = [
            models.CheckConstraint(
                name="aimodel_price_not_negative", condition=Q(price_micro__gte=0)
            ),
        ]

    def __str__(self) -> str:
        return self.slug


class Task(models.Model):
    """One generation: WAITING → GENERATING → SUCCESS / FAILED / REJECTED / CANCELLED.

    Statuses change only through conditional UPDATEs in ``tasks.services`` naming the states
    they leave; terminal states never change. Rows are never hard-deleted (``deleted_at``).
    """

    class Status(models.TextChoices):
        WAITING = "WAITING", "Waiting"
        GENERATING = "GENERATING", "Generating"
        SUCCESS = "SUCCESS", "Success"
        FAILED = "FAILED", "Failed"
        REJECTED = "REJECTED", "Rejected"
        CANCELLED = "CANCELLED", "Cancelled"

    UNFINISHED = (Status.WAITING, Status.GENERATING)
    TERMINAL = (Status.SUCCESS, Status.FAILED, Status.REJECTED, Status.CANCELLED)

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="tasks"
    )
    model = models.ForeignKey(AIModel, on_delete=models.PROTECT, related_name="tasks")
    # Snapshot at submit: later catalog edits never change a submitted task.
    model_slug = models.CharField(max_length=100)
    category = models.CharField(max_length=16, choices=Category.choices)
    provider = models.CharField(max_length=32)
    upstream_model = models.CharField(max_length=200)
    prompt = models.TextField(blank=True)
    params = models.JSONField(default=dict, blank=True)
    upload_ids = models.JSONField(default=list, blank=True)
    # Where this task's events are POSTed (docs/webhooks.md), and which of them (the short
    # names, as Replicate's webhook_events_filter); signed with the account's secret.
    webhook_url = models.CharField(max_length=2000, blank=True)
    webhook_events = models.JSONField(default=list, blank=True)
    # A synchronous ("single") task: its runtime and type, snapshotted from the model, the
    # dataset of files it was sent with, and the time by which the request (or, for one accepted
    # with ``Prefer: respond-async``, the worker) running it must have finished it. Past that the
    # reconciler refunds it: its process died mid-request. Async tasks leave these empty.
    runtime = models.CharField(max_length=8, default=AIModel.Runtime.ASYNC)
    single_type = models.CharField(max_length=32, choices=SingleType.choices, blank=True)
    dataset = models.ForeignKey(
        "Dataset", on_delete=models.PROTECT, null=True, blank=True, related_name="tasks"
    )
    sync_deadline_at = models.DateTimeField(null=True, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.WAITING)
    price_micro = models.BigIntegerField()
    billing_type = models.CharField(max_length=24)
    billing_policy = models.JSONField(default=dict, blank=True)
    timeout_seconds = models.PositiveIntegerField(default=600)
    poll_interval_seconds = models.PositiveIntegerField(default=2)
    result_ttl_seconds = models.PositiveIntegerField()
    reserved_micro = models.BigIntegerField(default=0)
    charged_micro = models.BigIntegerField(default=0)
    refunded_micro = models.BigIntegerField(default=0)
    # Outputs the provider was asked for, written with SUCCESS: the basis of a partial-success
    # charge (floor(price × len(results) / outputs_requested)), so ledger_check can verify it.
    outputs_requested = models.PositiveIntegerField(default=0)
    upstream_id = models.CharField(max_length=200, blank=True)
    results = models.JSONField(default=list, blank=True)
    error_code = models.CharField(max_length=64, blank=True)
    error_message = models.TextField(blank=True)
    error_kind = models.CharField(max_length=16, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    submitted_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    results_expired_at = models.DateTimeField(null=True, blank=True)
    deleted_at = models.DateTimeField(null=True, blank=True)
    next_poll_at = models.DateTimeField(null=True, blank=True)
    poll_count = models.PositiveIntegerField(default=0)
    submit_attempts = models.PositiveIntegerField(default=0)
    last_submit_at = models.DateTimeField(null=True, blank=True)
    # The capacity slots this task occupies while unfinished (tasks.capacity), given back by
    # the transition that finishes it.
    capacity_scopes = models.JSONField(default=list, blank=True)
    cancel_requested_at = models.DateTimeField(null=True, blank=True)
    expiry_warned_at = models.DateTimeField(null=True, blank=True)
    # When the provider is unclear, each decision reads these fields (never a count of timeline
    # events). Submission: the first attempt that may have reached the provider without a clear
    # answer (a read timeout, a 5xx, a 409 "in progress"): from then on the task is refunded
    # only after the provider, asked by idempotency key, says it has no such job.
    submit_ambiguous_at = models.DateTimeField(null=True, blank=True)
    # Flags for support (set once, with a timeline event): retries ran out and the provider
    # could not say whether it has the job; or the task was sent too often without an answer.
    submit_unconfirmed_at = models.DateTimeField(null=True, blank=True)
    submit_stuck_at = models.DateTimeField(null=True, blank=True)
    # An unbroken run of "job not found" answers: its start and length. Any real status resets
    # both; only a run long enough in both fails the task as lost.
    not_found_since = models.DateTimeField(null=True, blank=True)
    not_found_count = models.PositiveIntegerField(default=0)
    # Past the model's timeout without the provider confirming the job stopped: flagged; after
    # TASK_UNCONFIRMED_GRACE the task fails (upstream_unconfirmed), refunded.
    timeout_unconfirmed_at = models.DateTimeField(null=True, blank=True)
    # Storing the outputs of a finished job: a lease (no second processor while one downloads)
    # and the attempts that never ended cleanly (a worker killed or timed out by a poison
    # output), capped so that such an output is not fetched again forever.
    output_lease_until = models.DateTimeField(null=True, blank=True)
    output_attempts = models.PositiveIntegerField(default=0)
    # Stopping the upstream job of a finished task (cancelled, or given up on): a job accepted
    # only after the task had finished, and when its cancel was carried out (or given up). The
    # cancel sweep resends what has ``cancel_requested_at`` but no ``upstream_cancel_done_at``.
    late_upstream_id = models.CharField(max_length=200, blank=True)
    upstream_cancel_done_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "ai_task"
        # Support's actions on the task page (issue 15); ``manage.py setup_roles`` gives them
        # to the Support and Billing groups.
        permissions = [
            ("recheck_task", "Can re-check a task upstream"),
            ("cancel_task", "Can cancel a task"),
            ("resubmit_task", "Can resubmit a failed task (the user pays)"),
            ("refund_task", "Can mark a task failed with a refund, and refund a charged task"),
            ("resubmit_task_free", "Can resubmit a failed task at our cost"),
        ]
        constraints = [
            models.CheckConstraint(
                name="task_money_consistent",
                condition=Q(
                    reserved_micro__gte=0,
                    charged_micro__gte=0,
                    refunded_micro__gte=0,
                    charged_micro__lte=models.F("reserved_micro"),
                ),
            ),
            models.CheckConstraint(
                name="task_finished_iff_terminal",
                condition=(
                    Q(status__in=["WAITING", "GENERATING"], finished_at__isnull=True)
                    | Q(
                        status__in=["SUCCESS", "FAILED", "REJECTED", "CANCELLED"],
                        finished_at__isnull=False,
                    )
                ),
            ),
        ]
        indexes = [
            # History: the user's visible tasks, newest first.
            models.Index(
                fields=["user", "-created_at", "-id"],
                condition=Q(deleted_at=None),
                name="task_history",
            ),
            # The poller: GENERATING tasks by due time.
            models.Index(
                fields=["next_poll_at"], condition=Q(status="GENERATING"), name="task_poll_due"
            ),
            # The reconciler: WAITING tasks by age.
            models.Index(fields=["created_at"], condition=Q(status="WAITING"), name="task_waiting"),
            # Capacity: unfinished tasks per user.
            models.Index(
                fields=["user"],
                condition=Q(status__in=["WAITING", "GENERATING"]),
                name="task_unfinished_by_user",
            ),
            models.Index(fields=["provider", "upstream_id"], name="task_upstream"),
            # Support's "flagged" filter and the grace sweep: the few unfinished flagged tasks.
            models.Index(
                fields=["timeout_unconfirmed_at"],
                condition=Q(status="GENERATING", timeout_unconfirmed_at__isnull=False),
                name="task_timeout_unconfirmed",
            ),
            # The single-task reconciler: synchronous tasks still running, by deadline.
            models.Index(
                fields=["sync_deadline_at"],
                condition=Q(status="GENERATING", runtime="sync"),
                name="task_sync_deadline",
            ),
            # Expiry: finished tasks whose files are still stored, by expiry time.
            models.Index(
                fields=["expires_at"],
                condition=Q(results_expired_at=None, status="SUCCESS"),
                name="task_expiry_due",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.model_slug} {self.id} {self.status}"

    @property
    def is_finished(self) -> bool:
        return self.status in self.TERMINAL

    @property
    def results_available(self) -> bool:
        """Its result files can be shown and served: a SUCCESS not purged yet. The purge
        (``results_expire_due``, every 20 s) sets ``results_expired_at`` once ``expires_at``
        has passed; until then the files are served, as the results API does."""
        return self.status == self.Status.SUCCESS and self.results_expired_at is None


class SubmitOutbox(models.Model):
    """A committed task not handed to the worker queue yet: written in the transaction that
    accepts the task, deleted by the dispatcher (``manage.py dispatch_submits``) when it has
    queued it. A row of its own, not a column of the task, so that dispatching does not
    rewrite the task row and every index on it."""

    task = models.OneToOneField(Task, on_delete=models.PROTECT, primary_key=True, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    def __str__(self) -> str:
        return f"outbox {self.task_id}"


class TaskEvent(models.Model):
    """The task's timeline: every transition, submission, callback, poll and ledger operation."""

    # No index of its own: taskevent_timeline (task, created_at) serves lookups by task.
    task = models.ForeignKey(Task, on_delete=models.PROTECT, related_name="events", db_index=False)
    kind = models.CharField(max_length=48)
    message = models.TextField(blank=True)
    data = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [models.Index(fields=["task", "created_at"], name="taskevent_timeline")]

    def __str__(self) -> str:
        return f"{self.kind} @ {self.created_at:%Y-%m-%d %H:%M:%S}"


class CallbackDelivery(models.Model):
    """The provider callbacks inbox: each verified delivery stored once, processed in Celery."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        PROCESSED = "processed", "Processed"
        IGNORED = "ignored", "Ignored (no such task)"
        FAILED = "failed", "Failed (gave up after its attempts; the task is polled)"

    provider = models.CharField(max_length=32)
    event_id = models.CharField(max_length=200)
    upstream_id = models.CharField(max_length=200, blank=True)
    task = models.ForeignKey(
        Task, on_delete=models.PROTECT, null=True, blank=True, related_name="callbacks"
    )
    payload = models.JSONField(default=dict)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    # When a processor last took it: a lease, so that the sweeper or a redelivered message do
    # not process it a second time while the first is still at work (a long download).
    last_attempt_at = models.DateTimeField(null=True, blank=True)
    received_at = models.DateTimeField(auto_now_add=True)
    processed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name_plural = "callback deliveries"
        constraints = [
            models.UniqueConstraint(
                fields=["provider", "event_id"], name="callback_once_per_event"
            ),
        ]
        indexes = [
            models.Index(
                fields=["received_at"], condition=Q(status="pending"), name="callback_pending"
            )
        ]

    def __str__(self) -> str:
        return f"{self.provider}:{self.event_id}"


def upload_path(instance: Upload, filename: str) -> str:
    # Never the user's file name: a fixed name under a random directory.
    return f"uploads/{instance.user_id}/{instance.id}/file"


class Upload(models.Model):
    """A reference file a user uploaded, its type and size verified by content."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    # No index of its own: upload_recent (user, …) serves lookups by user.
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="uploads", db_index=False
    )
    file = models.FileField(upload_to=upload_path, max_length=300)
    original_name = models.CharField(max_length=255, blank=True)
    mime = models.CharField(max_length=100)
    bytes = models.BigIntegerField()
    sha256 = models.CharField(max_length=64)
    width = models.PositiveIntegerField(null=True, blank=True)
    height = models.PositiveIntegerField(null=True, blank=True)
    duration_ms = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [models.Index(fields=["user", "-created_at"], name="upload_recent")]

    def __str__(self) -> str:
        return f"{self.id} ({self.mime}, {self.bytes} B)"


class CapacityCounter(models.Model):
    """Unfinished tasks per capacity scope, kept in step with task transitions.

    Scopes: ``global:<shard>`` (the global limit split over shards, so that concurrent submits
    do not all queue on one row), ``user:<id>`` and ``user:<id>:<category>``. A submit takes one
    slot of each scope with a conditional UPDATE (``running < limit``) in its transaction; the
    transition that finishes the task gives them back in its own. ``ledger_check`` verifies the
    counters against the unfinished tasks.
    """

    scope = models.CharField(max_length=100, primary_key=True)
    running = models.IntegerField(default=0)

    class Meta:
        constraints = [
            models.CheckConstraint(
                name="capacity_running_not_negative", condition=Q(running__gte=0)
            ),
        ]

    def __str__(self) -> str:
        return f"{self.scope}: {self.running}"


def dataset_file_path(instance: DatasetFile, filename: str) -> str:
    # Never the user's file name: the dataset's directory and the file's position in it.
    return f"datasets/{instance.dataset.user_id}/{instance.dataset_id}/{instance.position}"


class Dataset(models.Model):
    """The files sent with a synchronous task, stored before the task is created.

    PENDING while its files are uploaded to storage; COMPLETED when all are stored and their
    ``DatasetFile`` rows written; FAILED when a file could not be stored (the files already
    stored are removed, so nothing is left behind). A COMPLETED dataset is attached to its task.
    """

    class Status(models.TextChoices):
        PENDING = "PENDING", "Pending"
        COMPLETED = "COMPLETED", "Completed"
        FAILED = "FAILED", "Failed"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    # No index of its own: dataset_recent (user, …) serves lookups by user.
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="datasets", db_index=False
    )
    purpose = models.CharField(max_length=32, help_text="the single task type it was sent to")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    file_count = models.PositiveIntegerField(default=0)
    total_bytes = models.BigIntegerField(default=0)
    error_message = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [models.Index(fields=["user", "-created_at"], name="dataset_recent")]

    def __str__(self) -> str:
        return f"{self.id} ({self.status}, {self.file_count} files)"


class DatasetFile(models.Model):
    """One stored file of a COMPLETED dataset, its type and size verified by content."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    # No index of its own: dataset_file_once (dataset, …) serves lookups by dataset.
    dataset = models.ForeignKey(
        Dataset, on_delete=models.PROTECT, related_name="files", db_index=False
    )
    position = models.PositiveIntegerField()
    file = models.FileField(upload_to=dataset_file_path, max_length=300)
    original_name = models.CharField(max_length=255, blank=True)
    mime = models.CharField(max_length=100)
    bytes = models.BigIntegerField()
    sha256 = models.CharField(max_length=64)
    width = models.PositiveIntegerField(null=True, blank=True)
    height = models.PositiveIntegerField(null=True, blank=True)
    duration_ms = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ("dataset", "position")
        constraints = [
            models.UniqueConstraint(fields=["dataset", "position"], name="dataset_file_once"),
        ]

    def __str__(self) -> str:
        return f"{self.dataset_id}/{self.position} ({self.mime}, {self.bytes} B)"


class GateSlot(models.Model):
    """One slot of a concurrency gate kept in the database (``tasks.single.gate``), used when
    no Redis is configured: a holder takes a free or expired slot with a conditional UPDATE and
    keeps it until it gives it back or its lease ends (a killed process loses its slots when
    their leases run out)."""

    gate = models.CharField(max_length=32)
    slot = models.PositiveIntegerField()
    holder = models.CharField(max_length=64, blank=True)
    lease_until = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["gate", "slot"], name="gate_slot_once"),
        ]

    def __str__(self) -> str:
        return f"{self.gate}:{self.slot} {self.holder or 'free'}"
