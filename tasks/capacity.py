"""Capacity: bounded unfinished tasks per user (and per user and category) and in all.

Exact under concurrency: a submit takes a slot of every scope with a conditional UPDATE in its
own transaction, and the transition that finishes the task returns them in its transaction.
The global limit is split over ``SHARDS`` rows so that submits from different users do not all
wait on one row lock; a submit takes a slot in any shard with room (``SKIP LOCKED`` first, then
waiting), and is refused only when every shard is full.
"""

from __future__ import annotations

import random

from django.conf import settings
from django.db import connection
from django.db.models import F

from rivya.errors import CapacityExceeded
from tasks.models import CapacityCounter, Task

SHARDS = 16


def _shard_limit(shard: int, total: int) -> int:
    return total // SHARDS + (1 if shard < total % SHARDS else 0)


def _user_scopes(task: Task) -> list[tuple[str, int]]:
    scopes = [(f"user:{task.user_id}", settings.TASK_MAX_RUNNING_PER_USER)]
    per_category = settings.TASK_MAX_RUNNING_PER_CATEGORY.get(task.category)
    if per_category is not None:
        scopes.append((f"user:{task.user_id}:{task.category}", int(per_category)))
    return scopes


def _ensure(scopes: list[str]) -> None:
    CapacityCounter.objects.bulk_create(
        [CapacityCounter(scope=s) for s in scopes], ignore_conflicts=True
    )


def _take(scope: str, limit: int) -> bool:
    return (
        CapacityCounter.objects.filter(scope=scope, running__lt=limit).update(
            running=F("running") + 1
        )
        == 1
    )


def capacity_acquire(*, task: Task) -> None:
    """Take the task's slots (call inside the submit transaction, before the hold: capacity
    is part of validation, so 429 comes before 402).

    Raises CapacityExceeded (429, with Retry-After); the caller's transaction then rolls back,
    so a refused submit leaves nothing behind.
    """
    # Rows are created, and slots taken, in the lock order of every writer (the user's scopes,
    # then a global shard): a row inserted here is locked until commit, so creating the global
    # shards before taking the user's slot could wait in a cycle with a submit that holds that
    # slot and is creating a shard (tasks/tests/test_submit_paths.py, the credits race).
    user_scopes = _user_scopes(task)
    _ensure([s for s, _ in user_scopes])
    for scope, limit in user_scopes:
        if not _take(scope, limit):
            what = "generations" if ":" not in scope[5:] else f"{task.category} generations"
            raise CapacityExceeded(
                f"You already have {limit} {what} running. Wait for one to finish, then try again.",
                retry_after=10,
                code="too_many_running_tasks",
            )
    _ensure([f"global:{k}" for k in range(SHARDS)])
    shard = _take_global_slot(settings.TASK_MAX_RUNNING)
    if shard is None:
        raise CapacityExceeded(
            "Rivya is at capacity right now. Try again in a minute.",
            retry_after=30,
            code="system_busy",
        )
    task.capacity_scopes = [s for s, _ in user_scopes] + [f"global:{shard}"]
    Task.objects.filter(pk=task.pk).update(capacity_scopes=task.capacity_scopes)


def capacity_plan(*, task: Task) -> list[tuple[str, int]]:
    """The scopes a one-statement accept (``tasks.services.accept``) takes, with their limits:
    the user's scopes and one global shard picked at random. That statement takes each with the
    condition ``_take`` uses (``running < limit``); if the shard is full it refuses, and the
    submit falls back to ``capacity_acquire``, which tries every shard before refusing."""
    shard = random.randrange(SHARDS)  # noqa: S311 - spreading load, not a secret
    return [
        *_user_scopes(task),
        (f"global:{shard}", _shard_limit(shard, settings.TASK_MAX_RUNNING)),
    ]


def _take_global_slot(total: int) -> int | None:
    shards = list(range(SHARDS))
    random.shuffle(shards)  # spread submits over the shards
    if connection.features.has_select_for_update_skip_locked:
        # A shard with room that nobody else is updating right now: no waiting.
        for shard in shards:
            free = (
                CapacityCounter.objects.select_for_update(skip_locked=True)
                .filter(scope=f"global:{shard}", running__lt=_shard_limit(shard, total))
                .values_list("scope", flat=True)
            )
            if list(free) and _take(f"global:{shard}", _shard_limit(shard, total)):
                return shard
    # Every shard with room is busy (or the database cannot skip locks): wait for each in turn,
    # so a refusal always means every shard really is full.
    for shard in shards:
        if _take(f"global:{shard}", _shard_limit(shard, total)):
            return shard
    return None


def capacity_release(*, task: Task) -> None:
    """Give back the slots of a task that just finished (call in the transition's
    transaction, only from the call that won the transition)."""
    # One row at a time, in the order they were taken (user scopes, then the global shard), so
    # that a release and a concurrent acquire of the same user never wait on each other in a
    # cycle. Callers release before touching the hold and the account, as the submit does.
    for scope in task.capacity_scopes or []:
        CapacityCounter.objects.filter(scope=scope).update(running=F("running") - 1)


def capacity_counts() -> dict[str, int]:
    return dict(CapacityCounter.objects.values_list("scope", "running"))
