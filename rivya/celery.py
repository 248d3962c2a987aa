"""The Celery application; tasks are discovered in each app's ``tasks.py``."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery.signals import task_postrun, task_prerun

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "rivya.settings")

app = Celery("rivya")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@task_prerun.connect
@task_postrun.connect
def _close_old_connections(**kwargs: Any) -> None:
    """Database connections in a worker follow the same rule as in a web request.

    Celery's Django fix-up closes every connection before and after each task unless
    ``CELERY_DB_REUSE_MAX`` is set, which costs a new PostgreSQL backend (a fork and an
    authentication) per task: `make bench` measured a quarter of the machine's CPU going to
    that during callback finalization. Settings set ``CELERY_DB_REUSE_MAX`` so the fix-up keeps
    connections, and this does what Django does around each request: close a connection that
    is broken, left in a transaction or older than ``CONN_MAX_AGE`` (with
    ``CONN_HEALTH_CHECKS`` the next use checks it first).
    """
    task = kwargs.get("task")
    if task is not None and getattr(task.request, "is_eager", False):
        return  # run in the caller's process (tests, .apply()): its connection is the caller's
    from django.db import close_old_connections

    close_old_connections()
