"""The outbox of submitted tasks, and the dispatcher that empties it.

A submit commits, in the transaction that stores the task and its hold, a row of
``SubmitOutbox`` naming it: there is no moment where a task is committed and nothing is on its
way to send it upstream. The dispatcher (``manage.py dispatch_submits``, started by ``make run``
and by the test stacks) hands each such task to the Celery worker (``tasks.submit``) and deletes
its outbox row.

On PostgreSQL it LISTENs on ``NOTIFY_CHANNEL``: the submit's transaction notifies at commit, so
a task is queued within milliseconds. It also empties the outbox when it starts and every
``DISPATCH_POLL_S`` seconds, in case a notification was missed (say, its connection dropped).
Elsewhere (the embedded SQLite setup) it polls every ``DISPATCH_POLL_S`` seconds. If the
dispatcher is not running at all, the reconciler (``tasks.reconcile_waiting``) still submits
what has waited ``TASK_RESUBMIT_AFTER`` seconds.

Handing a task over twice is harmless (a crash between publishing and deleting does that): the
worker sends only WAITING tasks upstream, under the task's id as the provider's idempotency key.
"""

from __future__ import annotations

import logging
import select
import time
from collections.abc import Callable

from django.conf import settings
from django.db import connection, transaction

from tasks.models import SubmitOutbox
from tasks.services import enqueue
from tasks.services.accept import NOTIFY_CHANNEL

logger = logging.getLogger(__name__)

BATCH = 200
RETRY_MIN_S, RETRY_MAX_S = 0.5, 30.0


def notify_dispatcher() -> None:
    """Wake the dispatcher when the current transaction commits (PostgreSQL; elsewhere it
    polls). The one-statement accept notifies inside its own statement instead."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_notify(%s, '')", [NOTIFY_CHANNEL])


def dispatch_pending(limit: int = BATCH) -> int:
    """Hand up to ``limit`` tasks of the outbox, oldest first, to the worker and take them out
    of it; how many.

    Rows are locked (``SKIP LOCKED`` where the database has it) so that two dispatchers never
    queue the same task at the same time; publishing happens before the delete commits, so a
    crash in between publishes again rather than never.
    """
    with transaction.atomic():
        pending = SubmitOutbox.objects.order_by("created_at")
        if connection.features.has_select_for_update_skip_locked:
            pending = pending.select_for_update(skip_locked=True)
        ids = list(pending.values_list("task_id", flat=True)[:limit])
        for task_id in ids:
            enqueue.submit(task_id)
        if ids:
            SubmitOutbox.objects.filter(task_id__in=ids).delete()
    return len(ids)


def dispatch_all() -> int:
    """Empty the outbox; how many tasks were queued."""
    total = 0
    while True:
        queued = dispatch_pending()
        total += queued
        if queued < BATCH:
            return total


def run_dispatcher(should_stop: Callable[[], bool]) -> None:
    """Empty the outbox whenever a submit commits (or every ``DISPATCH_POLL_S`` seconds) until
    ``should_stop()``. Whatever fails (the broker, the database, its connection) is logged and
    tried again after a pause that doubles up to ``RETRY_MAX_S``: the tasks stay in the outbox
    meanwhile, and the process never exits on an outage."""
    poll_s = settings.DISPATCH_POLL_S
    pause = RETRY_MIN_S
    while not should_stop():
        try:
            listening = _listen()
            while not should_stop():
                queued = dispatch_all()
                if queued:
                    logger.info("dispatched %s task(s) to the worker", queued)
                pause = RETRY_MIN_S
                _wait(listening, poll_s)
        except Exception:  # noqa: BLE001 - an outage of anything it uses must not end it
            logger.exception("the dispatcher failed; trying again in %.1f s", pause)
            connection.close()
            _sleep_unless(should_stop, pause)
            pause = min(pause * 2, RETRY_MAX_S)


def _sleep_unless(should_stop: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not should_stop() and time.monotonic() < deadline:
        time.sleep(min(0.1, seconds))


def _listen() -> bool:
    if connection.vendor != "postgresql":
        return False
    with connection.cursor() as cursor:
        cursor.execute(f"LISTEN {NOTIFY_CHANNEL}")
    return True


def _wait(listening: bool, timeout: float) -> None:
    """Until a submit commits (a notification) or ``timeout`` seconds pass."""
    if not listening:
        time.sleep(timeout)
        return
    raw = connection.connection
    if not raw.notifies:
        select.select([raw], [], [], timeout)
        with connection.wrap_database_errors:  # a dropped connection: a DatabaseError
            raw.poll()
    raw.notifies.clear()
