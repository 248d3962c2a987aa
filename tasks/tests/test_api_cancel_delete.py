"""The cancel and delete endpoints: status codes, bodies and isolation between users."""

from __future__ import annotations

from typing import Any

import pytest

from tasks.models import Task
from tasks.tests.lifecycle import run_to_end, submit

S = Task.Status
pytestmark = [
    pytest.mark.django_db,
    pytest.mark.usefixtures("sandbox", "catalog", "queued", "ledger_ok"),
]


def test_cancel_answers_200_with_the_task_and_again_when_repeated(
    funded: Any, api_for: Any
) -> None:
    user = funded(10)
    task = submit(user)
    client = api_for(user)

    first = client.post(f"/api/v1/tasks/{task.pk}/cancel/")
    second = client.post(f"/api/v1/tasks/{task.pk}/cancel/")

    assert (first.status_code, second.status_code) == (200, 200)
    assert first.json()["status"] == second.json()["status"] == "CANCELLED"
    assert first.json()["credits"]["refunded_micro"] == 1_000_000


def test_cancel_of_a_finished_task_is_409_with_its_status(funded: Any, api_for: Any) -> None:
    user = funded(10)
    task = run_to_end(submit(user))

    response = api_for(user).post(f"/api/v1/tasks/{task.pk}/cancel/")

    assert response.status_code == 409
    assert response.json()["error"]["code"] == "task_finished"
    assert response.json()["error"]["status"] == "SUCCESS"


def test_cancel_and_delete_of_someone_elses_task_are_404(funded: Any, api_for: Any) -> None:
    task = submit(funded(10))
    intruder = api_for(funded(10))

    assert intruder.post(f"/api/v1/tasks/{task.pk}/cancel/").status_code == 404
    assert intruder.delete(f"/api/v1/tasks/{task.pk}/").status_code == 404
    task.refresh_from_db()
    assert (task.status, task.deleted_at) == (S.WAITING, None)


def test_delete_answers_204_then_the_task_and_its_results_are_404(
    funded: Any, api_for: Any
) -> None:
    user = funded(10)
    task = run_to_end(submit(user))
    client = api_for(user)

    response = client.delete(f"/api/v1/tasks/{task.pk}/")

    assert response.status_code == 204
    assert client.get(f"/api/v1/tasks/{task.pk}/").status_code == 404
    assert client.get(f"/api/v1/tasks/{task.pk}/results/0/").status_code == 404
    assert str(task.pk) not in [t["id"] for t in client.get("/api/v1/tasks/").json()["results"]]
    assert client.delete(f"/api/v1/tasks/{task.pk}/").status_code == 404
    assert Task.objects.filter(pk=task.pk).exists()  # kept for support


def test_delete_of_a_running_task_cancels_and_refunds_it(funded: Any, api_for: Any) -> None:
    user = funded(10)
    task = submit(user, sandbox_latency_ms=60_000)
    client = api_for(user)

    assert client.delete(f"/api/v1/tasks/{task.pk}/").status_code == 204

    task.refresh_from_db()
    assert task.status == S.CANCELLED
    assert client.get("/api/v1/credits/").json()["available_micro"] == 10_000_000


@pytest.mark.parametrize(("outcome", "status"), [("fail", "FAILED"), ("reject", "REJECTED")])
def test_cancel_of_a_failed_or_rejected_task_is_409_with_its_status(
    funded: Any, api_for: Any, outcome: str, status: str
) -> None:
    user = funded(10)
    task = run_to_end(submit(user, sandbox_outcome=outcome))

    response = api_for(user).post(f"/api/v1/tasks/{task.pk}/cancel/")

    assert response.status_code == 409
    assert response.json()["error"]["code"] == "task_finished"
    assert response.json()["error"]["status"] == status
    task.refresh_from_db()
    assert task.status == status


def test_delete_of_a_running_task_asks_the_upstream_to_stop_after_commit(
    funded: Any,
    api_for: Any,
    queued: dict[str, list[Any]],
    django_capture_on_commit_callbacks: Any,
) -> None:
    from tasks import services

    user = funded(10)
    task = submit(user, sandbox_latency_ms=60_000)
    services.task_send_upstream(task_id=task.pk)
    task.refresh_from_db()
    assert task.status == S.GENERATING

    with django_capture_on_commit_callbacks(execute=True):
        assert api_for(user).delete(f"/api/v1/tasks/{task.pk}/").status_code == 204

    assert queued["cancel"] == [str(task.pk)]


def test_expires_at_is_shown_while_the_results_are_still_there(
    funded: Any, api_for: Any, settings: Any
) -> None:
    from datetime import datetime, timedelta

    user = funded(10)
    task = run_to_end(submit(user))

    body = api_for(user).get(f"/api/v1/tasks/{task.pk}/").json()

    assert body["status"] == "SUCCESS"
    assert body["expired"] is False
    assert len(body["results"]) == 1
    expires = datetime.fromisoformat(body["expires_at"].replace("Z", "+00:00"))
    assert expires == task.finished_at + timedelta(seconds=settings.TASK_RESULT_TTL)
    assert api_for(user).get(body["results"][0]["url"]).status_code == 200


@pytest.mark.parametrize(
    ("outcome", "kinds"),
    [
        (
            "success",
            ["created", "credits_held", "submitted", "polled", "succeeded", "credits_captured"],
        ),
        ("fail", ["created", "credits_held", "submitted", "polled", "failed", "credits_released"]),
        (
            "reject",
            ["created", "credits_held", "submitted", "polled", "rejected", "credits_released"],
        ),
    ],
)
def test_the_timeline_records_every_step_of_a_task(
    funded: Any, outcome: str, kinds: list[str]
) -> None:
    from tasks.models import TaskEvent

    task = run_to_end(submit(funded(10), sandbox_outcome=outcome))

    events = TaskEvent.objects.filter(task=task).order_by("created_at", "id")
    assert list(events.values_list("kind", flat=True)) == kinds
    money = {e.kind: e.data for e in events if e.kind.startswith("credits_")}
    assert money["credits_held"]["amount_micro"] == task.price_micro
    settled = "credits_captured" if outcome == "success" else "credits_released"
    assert money[settled]["amount_micro"] == task.price_micro
