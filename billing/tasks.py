"""Celery tasks of billing."""

from __future__ import annotations

from celery import shared_task

from billing import services


@shared_task(name="billing.purge_idempotency_keys", soft_time_limit=120, time_limit=180)
def purge_idempotency_keys() -> int:
    return services.idempotency_purge_expired()
