"""The whole way a new user goes, in Chromium: sign up, generate in the Studio, watch it finish,
find it in History, and come back to it from the notification bell."""

from __future__ import annotations

from typing import Any

import pytest
from playwright.sync_api import expect

pytestmark = pytest.mark.usefixtures("e2e")


def test_sign_up_generate_find_it_in_history_and_open_it_from_the_bell(
    page: Any, signed_up: str, shoot: Any
) -> None:
    # Given a new account (10 signup credits), in the Studio
    page.goto("/studio/")
    expect(page.get_by_test_id("header-credits")).to_have_text("10 credits")
    page.evaluate("window.__sameDocument = true")

    # When it generates an image
    page.fill("#id_prompt", "a lighthouse in a storm")
    page.get_by_test_id("submit").click()

    # Then the run finishes in place, without a reload, and the header follows
    card = page.locator("[data-testid=task][data-status=SUCCESS]", has_text="lighthouse")
    card.locator("img").first.wait_for(timeout=30_000)
    page.wait_for_function(
        "[...document.querySelectorAll('[data-testid=task][data-status=SUCCESS] img')]"
        ".every(img => img.complete && img.naturalWidth > 0)"
    )
    assert page.evaluate("window.__sameDocument") is True
    expect(page.get_by_test_id("header-credits")).to_have_text("9 credits")
    expect(page.get_by_test_id("unread-count")).to_have_text("1", timeout=15_000)
    shoot(page, "studio-first-result")

    # And History lists it first, with its thumbnail
    page.get_by_role("link", name="History", exact=True).click()
    first = page.locator("li.task").first
    expect(first).to_contain_text("a lighthouse in a storm")
    expect(first.locator(".status")).to_have_text("Success")
    first.locator("img.thumb").wait_for()
    assert first.locator("img.thumb").evaluate("img => img.complete && img.naturalWidth > 0")

    # And the bell leads to the notification, which opens the task's page
    page.get_by_test_id("bell").click()
    page.wait_for_url("**/notifications/")
    note = page.get_by_test_id("notification").first
    expect(note).to_contain_text("Your generation is ready")
    note.get_by_test_id("notification-link").click()
    page.wait_for_url("**/history/*/")
    expect(page.locator("#task-state .status")).to_have_text("Success")
    expect(page.locator(".task-results img")).to_have_count(1)
    expect(page.get_by_test_id("charged")).to_have_text("1")
    expect(page.locator("ol.timeline")).to_contain_text("1 credit charged")
