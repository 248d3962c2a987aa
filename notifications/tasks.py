"""Celery tasks of outbound webhooks (notifications.webhooks does the work)."""

from __future__ import annotations

from celery import shared_task

from notifications import webhooks


@shared_task(name="notifications.deliver_webhook", soft_time_limit=60, time_limit=90)
def deliver_webhook(message_id: str) -> str:
    return webhooks.webhook_deliver(message_id=message_id)


@shared_task(name="notifications.deliver_due_webhooks", soft_time_limit=30, time_limit=60)
def deliver_due_webhooks() -> int:
    """The backstop: messages whose queued delivery was lost, retries too far ahead to queue,
    and messages a worker died holding."""
    due = webhooks.webhooks_due()
    for message_id in due:
        deliver_webhook.delay(message_id)
    return len(due)


@shared_task(name="notifications.purge_webhook_messages", soft_time_limit=600, time_limit=660)
def purge_webhook_messages() -> int:
    return webhooks.webhooks_purge()
