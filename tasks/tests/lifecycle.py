"""Helpers the lifecycle tests share (not a test module): submitting and running a task through
the services, the sandbox's view of a job, signed callbacks, a WAV file. Fixtures live in
``conftest.py``; these are plain functions."""

from __future__ import annotations

import io
import json
import wave
from datetime import UTC, datetime
from typing import Any

import httpx
from django.conf import settings
from rest_framework.test import APIClient
from standardwebhooks import Webhook

from notifications.models import Notification
from tasks import services
from tasks.models import Task

C = 1_000_000


def submit(user: Any, slug: str = "sandbox-image", **params: Any) -> Task:
    """An accepted submit of ``slug`` with these params (through the service)."""
    outcome = services.task_submit(
        user=user, model_slug=slug, prompt="a lighthouse at dusk", params=params
    )
    assert outcome.accepted
    return outcome.task


def run_to_end(task: Task) -> Task:
    """Send the task upstream and check it once (the sandbox's default latency is 0)."""
    services.task_send_upstream(task_id=task.pk)
    services.task_refresh(task_id=task.pk)
    task.refresh_from_db()
    return task


def notifications(task: Task) -> list[str]:
    return list(Notification.objects.filter(subject_id=str(task.pk)).values_list("kind", flat=True))


def stats(sandbox: Any) -> dict[str, Any]:
    return httpx.get(f"{sandbox.base_url}/v1/stats", trust_env=False).json()


def job_status(task: Task) -> str:
    """The sandbox's status of the task's job."""
    url = f"{settings.SANDBOX_URL}/v1/jobs/{task.upstream_id}"
    return httpx.get(url, trust_env=False).json()["status"]


def wav(seconds: float) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\x00\x01" * int(8000 * seconds))
    return buf.getvalue()


def job_event(upstream_id: str = "job_123", status: str = "succeeded") -> str:
    return json.dumps({"type": "job.updated", "data": {"id": upstream_id, "status": status}})


def signed_headers(
    webhook: Webhook, body: str, msg_id: str = "msg_1", at: datetime | None = None
) -> dict[str, str]:
    at = at or datetime.now(UTC)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": webhook.sign(msg_id, at, body),
    }


def deliver(body: str, headers: dict[str, str], provider: str = "sandbox") -> Any:
    return APIClient().post(
        f"/api/v1/callbacks/{provider}/",
        data=body,
        content_type="application/json",
        headers=headers,
    )


def signed_callback(body: str, msg_id: str = "msg_robust") -> Any:
    """``body`` delivered as the sandbox would: signed with its secret, now."""
    return deliver(body, signed_headers(Webhook(settings.SANDBOX_WEBHOOK_SECRET), body, msg_id))
