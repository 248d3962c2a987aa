"""The Dashboard, the Notifications Center and the signed-out home page in Chromium, against the
live server with the real worker, beat and sandbox: the signup credits and the spend chart,
generations finishing into the dashboard, the bell counting a new notification without a
reload, marking read one by one (by keyboard) and all at once."""

from __future__ import annotations

from typing import Any

import pytest
from playwright.sync_api import expect

from notifications import services as notifications
from notifications.models import Notification
from rivya.models import User
from tasks import services as tasks
from tasks.models import Task
from tests.e2e import wait_for

# The header polls every 10 s: a change shows within one period, plus a margin for a busy box.
POLL_MS = 20_000


def generate(username: str, prompt: str, **params: Any) -> Task:
    """A generation submitted as the Studio does (the real worker and sandbox run it)."""
    user = User.objects.get(username=username)
    outcome = tasks.task_submit(user=user, model_slug="sandbox-image", prompt=prompt, params=params)
    assert outcome.accepted
    return outcome.task


def finished(*some: Task) -> bool:
    ids = [t.pk for t in some]
    return Task.objects.filter(pk__in=ids, status__in=Task.TERMINAL).count() == len(ids)


@pytest.mark.usefixtures("e2e")
def test_the_dashboard_shows_the_signup_credits_the_chart_and_finished_work(
    page: Any, signed_up: str, shoot: Any
) -> None:
    # given a new account: its 10 signup credits and an empty 30-day chart
    page.goto("/dashboard/")
    expect(page.get_by_test_id("available")).to_have_text("10")
    expect(page.get_by_test_id("balance")).to_have_text("10")
    expect(page.locator("svg.chart rect.bar")).to_have_count(30)
    expect(page.get_by_role("img", name="Bar chart of credits spent per day")).to_be_visible()
    expect(page.get_by_text("Ask support to add credits")).to_be_visible()

    # when two image generations (3 images, 1 credit each) finish through the worker
    fox = generate(signed_up, "a red fox in fresh snow, morning light", num_outputs=2)
    lighthouse = generate(signed_up, "a lighthouse at dusk")
    wait_for(lambda: finished(fox, lighthouse), timeout=60, what="both generations to finish")
    page.reload()

    # then the credits, the charges, today's bar and the thumbnails show them
    expect(page.get_by_test_id("available")).to_have_text("7")
    expect(page.get_by_test_id("spend-total")).to_have_text("3")
    today = page.locator("svg.chart rect.bar.today")
    assert float(today.get_attribute("height")) > 0
    recent = page.get_by_test_id("recent-tasks")
    expect(recent.locator("li")).to_have_count(2)
    expect(recent.locator(".status.SUCCESS")).to_have_count(2)
    thumb = recent.locator(f'a[href="/history/{fox.pk}/"] img')
    expect(thumb).to_be_visible()
    page.wait_for_function(
        "img => img.complete && img.naturalWidth > 0", arg=thumb.element_handle()
    )
    expect(page.get_by_test_id("recent-entries")).to_contain_text("sandbox-image generation")
    page.get_by_text("Show as a table").click()
    expect(page.locator("details.chart-table tbody tr")).to_have_count(30)
    page.get_by_text("Show as a table").click()
    shoot(page, "dashboard")


@pytest.mark.usefixtures("e2e")
def test_the_bell_counts_a_new_notification_without_a_reload(page: Any, signed_up: str) -> None:
    page.goto("/dashboard/")
    expect(page.get_by_test_id("unread-count")).to_have_text("")
    page.evaluate("window.stillTheSamePage = true")

    # when a notification arrives (written by another process: here, the test's)
    user = User.objects.get(username=signed_up)
    notifications.notification_create(
        user=user, kind=Notification.Kind.CREDITS, title="Support added 5 credits"
    )

    # then the bell shows it within one polling period, on the same page
    expect(page.get_by_test_id("unread-count")).to_have_text("1", timeout=POLL_MS)
    expect(page.get_by_test_id("bell")).to_have_attribute("aria-label", "Notifications, 1 unread")
    assert page.evaluate("window.stillTheSamePage") is True


@pytest.mark.usefixtures("e2e")
def test_the_notifications_center_marks_one_then_all_read_and_the_bell_empties(
    page: Any, signed_up: str, shoot: Any, settings: Any
) -> None:
    # given real notifications: a finished image, a failure, and a results-expiring notice
    ready = generate(signed_up, "a watercolour of a harbour town")
    broken = generate(signed_up, "a kite in a storm", sandbox_outcome="fail")
    wait_for(lambda: finished(ready, broken), timeout=60, what="both generations to finish")
    settings.TASK_EXPIRY_WARNING = 30 * 24 * 3600  # the finished image's results expire "soon"
    assert tasks.results_warn_expiring() == 1
    ready.refresh_from_db()

    page.goto("/notifications/")
    items = page.get_by_test_id("notification")
    expect(items).to_have_count(3)
    expect(page.locator("li.unread")).to_have_count(3)
    expect(page.get_by_test_id("unread-count")).to_have_text("3")
    expiring = items.filter(has_text="Results expiring soon")
    expect(expiring).to_contain_text(f"will be deleted at {ready.expires_at:%Y-%m-%d %H:%M} UTC")
    expect(expiring.get_by_test_id("notification-link")).to_have_attribute(
        "href", f"/history/{ready.pk}/"
    )

    # when one is marked read from the keyboard
    failed = items.filter(has=page.locator(f'a[href="/history/{broken.pk}/"]'))
    failed_id = failed.get_attribute("id")
    failed.get_by_test_id("mark-read").focus()
    page.keyboard.press("Enter")

    # then that item is read in place, keeps the focus, and the bell counts one less at once
    read_item = page.locator(f"#{failed_id}")
    expect(read_item).not_to_have_class("unread")
    expect(read_item).to_be_focused()
    expect(page.get_by_test_id("unread-count")).to_have_text("2")
    expect(page.get_by_test_id("unread-summary")).to_contain_text("2 unread")
    page.evaluate("document.activeElement.blur()")  # a screenshot without the focus ring
    shoot(page, "notifications")

    # when all are marked read
    page.get_by_test_id("mark-all-read").click()

    # then none is unread and the bell's badge is empty, without a reload
    expect(page.get_by_test_id("unread-summary")).to_have_text("You are all caught up.")
    expect(page.locator("li.unread")).to_have_count(0)
    expect(page.get_by_test_id("unread-count")).to_have_text("")
    expect(page.get_by_test_id("bell")).to_have_attribute("aria-label", "Notifications, 0 unread")
    page.reload()
    expect(page.locator("li.unread")).to_have_count(0)


@pytest.mark.usefixtures("e2e")
def test_a_visitor_sees_what_rivya_does_the_catalog_and_how_to_sign_up(
    browser: Any, live_server: Any, shoot: Any
) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, base_url=live_server.url)
    try:
        page = context.new_page()
        page.goto("/")

        expect(page.get_by_role("heading", level=1)).to_contain_text("Make images, video")
        for category in ("Image", "Video", "Audio", "Chat"):
            expect(page.get_by_role("heading", level=3, name=category)).to_be_visible()
        image = page.get_by_test_id("model-sandbox-image")
        expect(image).to_contain_text("Sandbox Image")
        expect(image.get_by_test_id("price")).to_have_text("1 credit per image")
        expect(page.get_by_test_id("model-sandbox-video").get_by_test_id("price")).to_have_text(
            "0.5 credits per second"
        )
        shoot(page, "home")

        page.get_by_test_id("cta-signup").click()
        expect(page).to_have_url(f"{live_server.url}/signup/")
    finally:
        context.close()
