"""Support's admin pages in Chromium, against the live server with the real worker, beat and
sandbox: the task list with its filters, and a finished task's page with its previews,
diagnosis and timeline (screenshots ``admin-task-list`` and ``admin-task``)."""

from __future__ import annotations

from typing import Any

import pytest
from playwright.sync_api import expect

from rivya.models import User
from tasks import services as tasks
from tasks.models import Task
from tests.e2e import wait_for

PASSWORD = "a-Long-staff-pass-123"


def log_in_as_staff(page: Any) -> User:
    staff = User.objects.create_user(
        username="support-ann",
        email="ann@example.com",
        password=PASSWORD,
        is_staff=True,
        is_superuser=True,
    )
    page.goto("/admin/login/")
    page.fill("#id_username", staff.username)
    page.fill("#id_password", PASSWORD)
    page.locator("input[type=submit]").click()
    page.wait_for_url(lambda url: "/admin/login/" not in url)
    return staff


@pytest.mark.usefixtures("e2e")
def test_support_sees_the_task_list_and_a_finished_tasks_page(page: Any, shoot: Any) -> None:
    # given a customer's finished generations, one of them failed
    customer = User.objects.create_user(
        username="customer-bo", email="bo@example.com", password=PASSWORD
    )
    from billing import services as billing

    billing.grant(user=customer, amount=20_000_000, reason="test funds")
    done = tasks.task_submit(
        user=customer,
        model_slug="sandbox-image",
        prompt="a lighthouse at dusk, oil painting",
        params={"num_outputs": 2},
    ).task
    failed = tasks.task_submit(
        user=customer,
        model_slug="sandbox-image",
        prompt="a castle made of clouds",
        params={"sandbox_outcome": "fail"},
    ).task
    wait_for(
        lambda: (
            Task.objects.filter(pk__in=[done.pk, failed.pk], status__in=Task.TERMINAL).count() == 2
        ),
        timeout=60,
        what="the generations",
    )
    done.refresh_from_db()
    assert done.status == Task.Status.SUCCESS

    # when support opens the task list
    log_in_as_staff(page)
    page.goto("/admin/tasks/task/")
    page.locator("#toggle-nav-sidebar").click()  # the list's columns need the width

    # then the tasks show with their amounts in credits and the support filters
    expect(page.locator("#result_list tbody tr")).to_have_count(2)
    expect(page.locator("#changelist-filter")).to_contain_text("stuck")
    expect(page.locator("#changelist-filter")).to_contain_text("hold still open")
    expect(page.locator("#result_list")).to_contain_text("customer-bo")
    shoot(page, "admin-task-list")

    # and the finished task's page shows its previews, diagnosis and timeline, without Save
    page.goto(f"/admin/tasks/task/{done.pk}/change/")
    diagnosis = page.locator("#diagnosis")
    expect(diagnosis).to_contain_text("task type: image generation")
    expect(diagnosis).to_contain_text("credits held")
    expect(diagnosis).to_contain_text("provider accepted")
    expect(diagnosis).to_contain_text("outcome: success; captured 2 credits")
    expect(diagnosis).to_contain_text("refund due before a re-run: no")
    images = page.locator("#previews img")
    expect(images).to_have_count(2)
    for n in range(2):
        images.nth(n).scroll_into_view_if_needed()
        page.wait_for_function(
            "img => img.complete && img.naturalWidth > 0", arg=images.nth(n).element_handle()
        )
    timeline = page.locator("#timeline")
    expect(timeline).to_contain_text("ledger charge")
    expect(timeline).to_contain_text("notification")
    expect(page.locator("input[name=_save]")).to_have_count(0)
    expect(page.locator("a.deletelink")).to_have_count(0)
    shoot(page, "admin-task")
