"""Logging filters (configured from ``LOGGING`` in settings)."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from celery.app.trace import LOG_RECEIVED, LOG_SUCCESS

# The INFO line beat writes for every task it sends (args: entry name, task name); the worker's
# "received" and "succeeded" lines carry a dict with the task's name.
BEAT_SENDING = "Scheduler: Sending due task %s (%s)"


class RoutineTaskFilter(logging.Filter):
    """Demote Celery's per-run INFO lines for routine tasks to DEBUG.

    Beat fires its periodic tasks every few seconds whether or not there is work, and each run
    wrote three INFO lines (beat's "Sending due task", the worker's "received" and "succeeded"),
    burying what an operator acts on. For the task names given, those lines become DEBUG records
    and are kept only where DEBUG is enabled (``LOG_LEVEL=DEBUG``). Anything else passes
    untouched: other tasks' lines, and every warning or error (failures, retries) of any task.

    Attach it to the loggers that write those lines (``celery.beat``, ``celery.worker.strategy``,
    ``celery.app.trace``), not to a handler: Celery's worker and beat replace the root logger's
    handlers with their own.
    """

    def __init__(self, tasks: Iterable[str] = ()) -> None:
        super().__init__()
        self.tasks = frozenset(tasks)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO or self.task_name(record) not in self.tasks:
            return True
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)

    @staticmethod
    def task_name(record: logging.LogRecord) -> str | None:
        """The task a routine line is about, or None for any other line."""
        if record.msg in (LOG_RECEIVED, LOG_SUCCESS) and isinstance(record.args, dict):
            return record.args.get("name")
        if record.msg == BEAT_SENDING and isinstance(record.args, tuple) and len(record.args) == 2:
            return str(record.args[1])
        return None
