"""The outbox of submitted tasks and its dispatcher (``tasks.services.dispatch``), on the real
PostgreSQL: a committed submit is handed to the worker once, at once (NOTIFY), also when the
dispatcher was not running at the time, and never at once by dispatchers side by side."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone

from billing.models import Hold
from billing.tests.concurrency import run_concurrently
from tasks.models import SubmitOutbox, Task
from tasks.services import accept, enqueue
from tasks.services.dispatch import NOTIFY_CHANNEL, dispatch_all, run_dispatcher
from tasks.tests.lifecycle import submit

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("catalog", "ledger_ok"),
]
C = 1_000_000
TASKS = "/api/v1/tasks/"


def wait_until(condition: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {seconds} s for {what}")
        time.sleep(0.05)


@contextmanager
def running_dispatcher() -> Iterator[None]:
    """``run_dispatcher`` in a thread for the block; stopped (and seen to stop) after it."""
    stop = threading.Event()

    def dispatcher() -> None:
        try:
            run_dispatcher(stop.is_set)
        finally:
            connection.close()

    thread = threading.Thread(target=dispatcher)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        with connection.cursor() as cursor:  # wake it, so that it sees it should stop
            cursor.execute("SELECT pg_notify(%s, '')", [NOTIFY_CHANNEL])
        thread.join(timeout=35)
    assert not thread.is_alive()


@pytest.mark.parametrize("one_statement", [True, False], ids=["one-statement", "step-by-step"])
def test_a_committed_submit_is_queued_at_once_by_its_notification(
    funded: Any,
    api_for: Any,
    settings: Any,
    monkeypatch: pytest.MonkeyPatch,
    one_statement: bool,
) -> None:
    # The dispatcher would look at the outbox on its own only every 30 s: a task queued within
    # seconds was woken by the submit's notification. What it queues is committed: another
    # connection sees the task WAITING with its hold.
    settings.DISPATCH_POLL_S = 30
    monkeypatch.setattr(accept, "fast_path_available", lambda: one_statement)
    seen: list[tuple[str, Any, bool]] = []

    def look(task_id: str) -> None:
        try:
            row = Task.objects.filter(pk=task_id).values_list("status", "reserved_micro").first()
            seen.append((task_id, row, Hold.objects.filter(subject_id=task_id).exists()))
        finally:
            connection.close()

    def publish(task_id: Any) -> None:
        other = threading.Thread(target=look, args=(str(task_id),))
        other.start()
        other.join()

    monkeypatch.setattr(enqueue, "submit", publish)
    client = api_for(funded(10))
    before = client.post(TASKS, {"model": "sandbox-image", "prompt": "a fox"}, format="json")
    with running_dispatcher():
        # What was committed before it started is queued when it starts (it LISTENs first).
        wait_until(lambda: len(seen) == 1, 10, "the dispatcher to queue the earlier task")
        after = client.post(TASKS, {"model": "sandbox-image", "prompt": "a cat"}, format="json")
        assert (before.status_code, after.status_code) == (202, 202)
        wait_until(lambda: len(seen) == 2, 10, "the notification to wake the dispatcher")
    assert seen == [
        (before.json()["id"], ("WAITING", C), True),
        (after.json()["id"], ("WAITING", C), True),
    ]
    assert not SubmitOutbox.objects.exists()


def test_the_outbox_keeps_tasks_until_a_dispatcher_runs_and_queues_each_once(
    funded: Any, queued: dict[str, list[Any]]
) -> None:
    user = funded(10)
    tasks = [submit(user) for _ in range(3)]

    assert queued["submit"] == []  # nothing is queued by the request itself
    assert SubmitOutbox.objects.count() == 3
    assert (dispatch_all(), dispatch_all()) == (3, 0)
    assert sorted(queued["submit"]) == sorted(str(t.pk) for t in tasks)
    assert not SubmitOutbox.objects.exists()


def test_a_broker_outage_leaves_the_tasks_in_the_outbox(
    funded: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    user = funded(10)
    tasks = {str(submit(user).pk) for _ in range(3)}
    published: list[str] = []

    def down(task_id: Any) -> None:
        if len(published) == 1:
            raise ConnectionError("the broker is down")
        published.append(str(task_id))

    monkeypatch.setattr(enqueue, "submit", down)
    with pytest.raises(ConnectionError):
        dispatch_all()

    # Nothing is taken out of the outbox, the one published included: it is published again
    # (the worker sends only WAITING tasks, under the task id as the provider's idempotency key).
    assert SubmitOutbox.objects.count() == 3
    monkeypatch.setattr(enqueue, "submit", lambda task_id: published.append(str(task_id)))
    assert dispatch_all() == 3
    assert set(published) == tasks
    assert len(published) == 4


def test_the_running_dispatcher_outlives_a_broker_outage(
    funded: Any, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The process keeps going through failures (here the broker's, as kombu raises them) and
    # empties the outbox once the broker is back; a dead dispatcher would leave the tasks for
    # the 30 s reconciler.
    from kombu.exceptions import OperationalError

    from tasks.services import dispatch

    settings.DISPATCH_POLL_S = 0.2
    monkeypatch.setattr(dispatch, "RETRY_MIN_S", 0.05)
    user = funded(10)
    tasks = {str(submit(user).pk) for _ in range(2)}
    failures, published = [0], []

    def flaky(task_id: Any) -> None:
        if failures[0] < 2:
            failures[0] += 1
            raise OperationalError("Error 111 connecting to the broker. Connection refused.")
        published.append(str(task_id))

    monkeypatch.setattr(enqueue, "submit", flaky)

    with running_dispatcher():
        wait_until(lambda: set(published) == tasks, 10, "the dispatcher to recover")
    assert failures == [2]
    assert not SubmitOutbox.objects.exists()


def test_dispatchers_side_by_side_never_queue_a_task_twice(
    funded: Any, queued: dict[str, list[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Race on PostgreSQL: 8 dispatchers empty an outbox of 60 tasks at once, in batches of 5.
    users = [funded(100) for _ in range(3)]
    ids = {str(submit(users[n % 3]).pk) for n in range(60)}
    from tasks.services import dispatch

    monkeypatch.setattr(dispatch, "BATCH", 5)

    counts = run_concurrently([dispatch_all] * 8)

    assert all(isinstance(c, int) for c in counts), counts
    assert sum(counts) == 60
    assert sorted(queued["submit"]) == sorted(ids)
    assert not SubmitOutbox.objects.exists()


def test_ledger_check_reports_a_task_left_in_the_outbox(funded: Any) -> None:
    from billing.invariants import run_reports

    task = submit(funded(10))

    def stale() -> list[str]:
        return [b.detail for b in run_reports() if b.check == "outbox_stale"]

    assert stale() == []  # just submitted: the dispatcher has a minute
    SubmitOutbox.objects.filter(task=task).update(created_at=timezone.now() - timedelta(minutes=2))
    notes = stale()
    assert len(notes) == 1
    assert str(task.pk) in notes[0]
    assert "dispatch_submits" in notes[0]
    assert dispatch_all() == 1
    assert stale() == []
