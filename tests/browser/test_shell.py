"""Every page's shell in Chromium: the header (credits, unread bell), error pages."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.mark.usefixtures("e2e")
def test_a_new_account_sees_its_credits_and_bell_in_the_header(page: Any, signed_up: str) -> None:
    page.goto("/dashboard/")

    assert page.get_by_test_id("header-credits").inner_text() == "10 credits"
    assert page.get_by_test_id("bell").is_visible()


@pytest.mark.usefixtures("e2e")
def test_an_unknown_page_is_a_styled_404(page: Any, signed_up: str, shoot: Any) -> None:
    response = page.goto("/history/00000000-0000-0000-0000-000000000000/nope/")

    assert response.status == 404
    assert page.get_by_role("heading", name="We could not find that page").is_visible()
    shoot(page, "404")
