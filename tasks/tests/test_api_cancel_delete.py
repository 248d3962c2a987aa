"""The cancel and delete endpoints: status codes, bodies and isolation between users."""

from __future__ import annotations

from typing import Any

import pytest

from tasks.models import Task
from tasks.tests.test_services import run_to_end, submit

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
