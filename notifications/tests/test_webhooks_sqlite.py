"""Outbound webhooks on the embedded SQLite database (``make run`` without PostgreSQL): the
migrations apply, an endpoint's event filter holds, and a delivery reaches the receiver. Run in
a subprocess of its own, since the suite's Django is on PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from notifications.tests.receiver import Receiver

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def test_webhooks_on_sqlite(tmp_path: Path, webhook_receiver: Receiver) -> None:
    env = dict(
        os.environ,
        DATABASE_URL=f"sqlite:///{tmp_path / 'webhooks.sqlite3'}",
        REDIS_URL="",
        CELERY_BROKER_URL="filesystem://",  # the embedded default: files, under BROKER_DIR
        BROKER_DIR=str(tmp_path / "broker"),
        DJANGO_SETTINGS_MODULE="rivya.settings",
        WEBHOOK_ALLOW_PRIVATE="1",
        WEBHOOK_ALLOW_HTTP="1",
    )
    done = subprocess.run(  # noqa: S603 - our own module, our own arguments
        [sys.executable, "-m", "notifications.tests.test_webhooks_sqlite", webhook_receiver.url()],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"recorded": [1, 0], "statuses": ["succeeded"]}
    (request,) = webhook_receiver.received()
    assert json.loads(request["body"])["type"] == "task.failed"


def _run(url: str) -> dict[str, Any]:
    import django

    django.setup()
    from datetime import timedelta

    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    from notifications import webhooks
    from notifications.models import WebhookMessage

    call_command("migrate", verbosity=0, interactive=False)
    user = get_user_model().objects.create_user(username="sqlite-webhooks")
    webhooks.endpoint_create(user=user, url=url, event_types=["task.failed"])
    recorded = [  # each queued to the file broker after its commit (no worker runs here)
        webhooks.webhook_event_record(
            user_id=user.pk,
            event_type=event_type,
            subject_type="tasks.task",
            subject_id="1",
            data=lambda: {"status": "FAILED"},
        )
        for event_type in ("task.failed", "task.completed")
    ]
    for message_id in webhooks.webhooks_due(grace=timedelta(0)):  # what the worker does
        webhooks.webhook_deliver(message_id=message_id)
    return {
        "recorded": recorded,
        "statuses": list(WebhookMessage.objects.values_list("status", flat=True)),
    }


if __name__ == "__main__":
    print(json.dumps(_run(sys.argv[1])))
