"""Handing work to Celery after commit (tests replace these to run the services directly)."""

from __future__ import annotations

from typing import Any


def submit(task_id: Any) -> None:
    from tasks import tasks as celery_tasks

    celery_tasks.submit.delay(str(task_id))


def callback(delivery_id: int) -> None:
    from tasks import tasks as celery_tasks

    celery_tasks.process_callback.delay(delivery_id)


def run_single(task_id: Any) -> None:
    from tasks import tasks as celery_tasks

    celery_tasks.run_single.delay(str(task_id))


def cancel_upstream(task_id: Any, upstream_id: str | None = None) -> None:
    from tasks import tasks as celery_tasks

    celery_tasks.cancel_upstream.delay(str(task_id), upstream_id)
