"""A support action in Chromium (issue 15): a superuser logs in to the admin, opens the refund
form of a charged task (screenshot ``admin-action``), gives a reason and a part of the charge,
and the user has it back; the task page says so."""

from __future__ import annotations

from typing import Any

import pytest
from playwright.sync_api import expect

from billing import selectors as billing_selectors
from billing import services as billing
from billing.models import LedgerTransaction
from rivya.models import User
from tasks import services as tasks
from tasks.models import Task, TaskEvent
from tests.e2e import wait_for

C = 1_000_000


@pytest.mark.usefixtures("e2e")
def test_a_superuser_refunds_part_of_a_charge_from_the_admin(page: Any, shoot: Any) -> None:
    # given a user charged for a finished generation (the worker and the sandbox ran it)
    user = User.objects.create_user(username="charged", email="charged@example.com", password="x")
    billing.grant(user=user, amount=10 * C, reason="test funds")
    outcome = tasks.task_submit(
        user=user, model_slug="sandbox-image", prompt="a lighthouse", params={"num_outputs": 2}
    )
    task = outcome.task
    wait_for(
        lambda: Task.objects.filter(pk=task.pk, status=Task.Status.SUCCESS).exists(),
        timeout=60,
        what="the generation",
    )
    User.objects.create_superuser(
        username="boss", email="boss@example.com", password="a-Long-pass-1"
    )

    # when a superuser opens its refund form and refunds half a credit with a reason
    page.goto("/admin/login/")
    page.fill("#id_username", "boss")
    page.fill("#id_password", "a-Long-pass-1")
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(lambda url: "/admin/login/" not in url)
    page.goto(f"/admin/tasks/task/{task.pk}/refund/")
    expect(page.get_by_text("Left to refund")).to_contain_text("2")
    page.fill("#id_reason", "The second image came out blank.")
    page.fill("#id_amount", "0.5")
    shoot(page, "admin-action")
    page.get_by_role("button", name="Refund").click()

    # then the task page says it is done, and the user has the half credit back
    page.wait_for_url(f"**/admin/tasks/task/{task.pk}/change/")
    expect(page.locator(".messagelist")).to_contain_text("Refunded 0.5 credits")
    assert billing_selectors.balance_for_user(user=user).balance == 8 * C + C // 2
    txn = LedgerTransaction.objects.get(subject_id=str(task.pk), actor__username="boss")
    assert txn.reason.endswith("The second image came out blank.")
    assert TaskEvent.objects.filter(task=task, kind="support_refund").count() == 1
