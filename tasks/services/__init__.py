"""Writes for generation tasks, one module per part of the lifecycle.

Every status change is one conditional UPDATE naming the states it leaves
(``common.transition_task``); the code branches on the row count, and the winner writes the ledger
operation, the timeline event and the notification in the same database transaction
(no double charge or refund, whatever the order of callbacks, polls and retries).
Lock order everywhere: task row → hold row → account row → capacity rows.
Side effects (Celery, providers) happen after commit (``enqueue``).
"""

from __future__ import annotations

from tasks.providers.registry import get_provider
from tasks.services.callbacks import (
    CALLBACK_MAX_ATTEMPTS,
    callback_process,
    callback_receive,
    callbacks_pending,
)
from tasks.services.cancel import (
    cancels_unsent,
    task_cancel,
    task_cancel_upstream,
    task_cancel_upstream_gave_up,
    task_delete,
)
from tasks.services.common import SUBJECT, task_link
from tasks.services.expiry import results_expire_due, results_warn_expiring
from tasks.services.outcomes import StoredOutput, task_fail, task_succeed
from tasks.services.refresh import poll_claim_due, task_refresh
from tasks.services.storage import SweepReport, storage_sweep
from tasks.services.submit import SubmitOutcome, task_submit, task_submit_in_one_statement
from tasks.services.support import (
    ActionRefused,
    SupportOutcome,
    task_refundable,
    task_support_cancel,
    task_support_fail,
    task_support_recheck,
    task_support_refund,
    task_support_resubmit,
)
from tasks.services.uploads import upload_create
from tasks.services.upstream import (
    callback_url,
    retry_delay,
    task_send_upstream,
    task_submit_attempt_failed,
    task_submit_attempts,
    task_submit_failed,
    waiting_due_for_resubmit,
)

__all__ = [
    "ActionRefused",
    "CALLBACK_MAX_ATTEMPTS",
    "SUBJECT",
    "StoredOutput",
    "SubmitOutcome",
    "SupportOutcome",
    "SweepReport",
    "callback_process",
    "callback_receive",
    "callback_url",
    "callbacks_pending",
    "cancels_unsent",
    "get_provider",
    "poll_claim_due",
    "results_expire_due",
    "results_warn_expiring",
    "retry_delay",
    "storage_sweep",
    "task_cancel",
    "task_cancel_upstream",
    "task_cancel_upstream_gave_up",
    "task_delete",
    "task_fail",
    "task_link",
    "task_refresh",
    "task_refundable",
    "task_send_upstream",
    "task_submit",
    "task_submit_in_one_statement",
    "task_submit_attempt_failed",
    "task_submit_attempts",
    "task_submit_failed",
    "task_succeed",
    "task_support_cancel",
    "task_support_fail",
    "task_support_recheck",
    "task_support_refund",
    "task_support_resubmit",
    "upload_create",
    "waiting_due_for_resubmit",
]
