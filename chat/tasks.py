"""Celery tasks of chat."""

from __future__ import annotations

from celery import shared_task

from chat import services


@shared_task(name="chat.settle_abandoned", soft_time_limit=120, time_limit=180)
def settle_abandoned() -> int:
    return services.settle_abandoned_turns()
