"""Edges every page shares, in Chromium: a polled task deleted elsewhere stops being polled, a
form sent without its CSRF token gets the styled page, and screenshots of the pages the other
browser tests do not visit (account, login, signup, the error pages)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from rivya.models import User
from tasks import services as tasks

pytestmark = pytest.mark.usefixtures("e2e")
TEMPLATES = Path(__file__).resolve().parents[2] / "templates"


def test_a_task_deleted_in_another_tab_stops_its_page_polling(page: Any, signed_up: str) -> None:
    # Given a running task's page, which polls itself
    user = User.objects.get(username=signed_up)
    slow = {"sandbox_latency_ms": 60000}
    task = tasks.task_submit(
        user=user, model_slug="sandbox-image", prompt="slow fox", params=slow
    ).task
    page.goto(f"/history/{task.pk}/")
    expect(page.locator("#task-live")).to_have_attribute("hx-trigger", "every 2s")
    polls: list[str] = []
    page.on("request", lambda r: polls.append(r.url) if "/live/" in r.url else None)

    # When it is deleted elsewhere
    tasks.task_delete(user=user, task_id=task.pk)

    # Then the page says so and stops asking
    expect(page.get_by_text("This is no longer available (it was deleted).")).to_be_visible(
        timeout=10_000
    )
    asked = len(polls)
    page.wait_for_timeout(4_500)
    assert len(polls) == asked


def test_a_form_without_its_csrf_token_gets_the_styled_page(
    page: Any, signed_up: str, shoot: Any
) -> None:
    page.goto("/account/")
    shoot(page, "account")
    page.context.clear_cookies(name="csrftoken")

    page.get_by_role("button", name="Create API key").click()

    expect(page.get_by_role("heading", name="Please try that again")).to_be_visible()
    assert not User.objects.get(username=signed_up).api_keys.exists()
    shoot(page, "403-csrf")


def test_signed_out_pages_and_the_500_page(browser: Any, live_server: Any, shoot: Any) -> None:
    context = browser.new_context(base_url=live_server.url)
    try:
        page = context.new_page()
        for path, name in (("/login/", "login"), ("/signup/", "signup")):
            page.goto(path)
            expect(page.locator("main h1")).to_be_visible()
            shoot(page, name)
        # The 500 page is plain HTML (no template tags can fail there): shown as served
        page.goto("/login/")
        page.set_content((TEMPLATES / "500.html").read_text())
        expect(page.get_by_role("heading", name="Something went wrong on our side")).to_be_visible()
        shoot(page, "500")
    finally:
        context.close()
