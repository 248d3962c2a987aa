"""Fixtures of the webhook tests: delivering what is due the way the Celery task does (the
services are called directly here; tests/test_e2e_webhooks.py runs the real worker)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from notifications import webhooks
from notifications.models import WebhookMessage


@pytest.fixture
def deliver_due() -> Any:
    """Run one delivery attempt for every message due now (after moving ``later`` retries to
    now, as if their delay had passed); returns the statuses by message id."""

    def run(*, later: bool = False) -> dict[str, str]:
        if later:
            WebhookMessage.objects.filter(status=WebhookMessage.Status.PENDING).update(
                next_attempt_at=timezone.now() - timedelta(seconds=1)
            )
        return {i: webhooks.webhook_deliver(message_id=i) for i in webhooks.webhooks_due()}

    return run
