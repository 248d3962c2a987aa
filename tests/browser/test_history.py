"""History in Chromium, against the live server with the real worker, beat and sandbox: finished
work appears with thumbnails and players, a task's page tells its story and updates itself while
the task runs, cancel and delete (asked first, by keyboard) work in place, and another user's
task is a 404."""

from __future__ import annotations

import re
from typing import Any

import pytest
from playwright.sync_api import expect

from rivya.models import User
from tasks import services as tasks
from tasks.models import Task
from tests.e2e import wait_for


def generate(username: str, prompt: str, slug: str = "sandbox-image", **params: Any) -> Task:
    """A generation submitted through the service (the real worker and sandbox run it)."""
    user = User.objects.get(username=username)
    outcome = tasks.task_submit(user=user, model_slug=slug, prompt=prompt, params=params)
    assert outcome.accepted
    return outcome.task


def finished(*some: Task) -> bool:
    ids = [t.pk for t in some]
    return Task.objects.filter(pk__in=ids, status__in=Task.TERMINAL).count() == len(ids)


def status_of(task: Task) -> str:
    return Task.objects.values_list("status", flat=True).get(pk=task.pk)


def row(page: Any, task: Task) -> Any:
    return page.locator(f"#task-{task.pk}")


@pytest.mark.usefixtures("e2e")
def test_finished_work_shows_in_history_and_its_page_tells_what_happened(
    page: Any, signed_up: str, shoot: Any
) -> None:
    # given generations of every kind, run by the worker against the sandbox
    image = generate(signed_up, "a red fox in fresh snow, morning light", num_outputs=2)
    speech = generate(signed_up, "Welcome to Rivya.", "sandbox-speech", duration_s=2)
    clip = generate(signed_up, "waves rolling onto a pebble beach", "sandbox-video", duration_s=1)
    failed = generate(signed_up, "a castle made of clouds", sandbox_outcome="fail")
    wait_for(lambda: finished(image, speech, clip, failed), timeout=60, what="the generations")

    # when the user opens History
    page.goto("/history/")

    # then each shows, newest first, with its thumbnails or players, status and credits
    expect(page.locator("li.task")).to_have_count(4)
    thumbs = row(page, image).locator("img.thumb")
    expect(thumbs).to_have_count(2)
    for n in range(2):
        thumbs.nth(n).scroll_into_view_if_needed()
        page.wait_for_function(
            "img => img.complete && img.naturalWidth > 0", arg=thumbs.nth(n).element_handle()
        )
    assert thumbs.first.evaluate("img => img.naturalWidth") > 0
    audio = row(page, speech).locator("audio")
    expect(audio).to_have_attribute("preload", "metadata")
    page.wait_for_function("a => a.duration > 0", arg=audio.element_handle())
    expect(row(page, clip).locator("video")).to_have_attribute("preload", "metadata")
    expect(row(page, image).locator(".status")).to_have_text("Success")
    expect(row(page, image)).to_contain_text("Charged 2")
    expect(row(page, image)).to_contain_text("Results kept until")
    expect(row(page, failed).locator(".status")).to_have_text("Failed")
    expect(row(page, failed)).to_contain_text("Refunded 1")
    expect(row(page, failed).locator(".task-error")).to_be_visible()
    expect(row(page, image).get_by_role("link", name="Re-run")).to_have_attribute(
        "href", f"/studio/?rerun={image.pk}"
    )
    shoot(page, "history")

    # and the filters narrow the list in place
    page.get_by_label("Category").select_option("audio")
    expect(page.locator("li.task")).to_have_count(1)
    expect(page).to_have_url(re.compile(r"category=audio"))
    page.get_by_role("link", name="Clear").click()
    page.get_by_label("Search prompts").fill("castle")
    expect(page.locator("li.task")).to_have_count(1)
    expect(row(page, failed)).to_be_visible()
    page.goto("/history/")

    # when the user opens the image task
    row(page, image).get_by_role(
        "link", name="a red fox in fresh snow, morning light", exact=True
    ).click()

    # then its page shows the full-size results, downloads, credits and a plain timeline
    expect(page).to_have_url(f"/history/{image.pk}/")
    results = page.locator(".task-results img")
    expect(results).to_have_count(2)
    page.wait_for_function(
        "imgs => imgs.every(i => i.complete && i.naturalWidth > 0)",
        arg=results.element_handles(),
    )
    expect(page.get_by_role("link", name="Download result 1")).to_be_visible()
    expect(page.get_by_test_id("charged")).to_have_text("2")
    expect(page.get_by_test_id("refunded")).to_have_text("0")
    timeline = page.locator("ol.timeline")
    expect(timeline).to_contain_text("You asked for this generation; its price is 2 credits.")
    expect(timeline).to_contain_text("Sent to the provider, which accepted the job.")
    expect(timeline).to_contain_text("Finished: your 2 results are ready.")
    expect(timeline).to_contain_text("2 credits charged.")
    shoot(page, "task")

    # and the failed one says what went wrong, on whose side, and the refund
    page.goto(f"/history/{failed.pk}/")
    expect(page.get_by_test_id("error-kind")).to_have_text("The provider failed")
    expect(page.get_by_test_id("refunded")).to_have_text("1")
    expect(page.locator("ol.timeline")).to_contain_text("returned to your balance")
    shoot(page, "task-failed")


@pytest.mark.usefixtures("e2e")
def test_a_running_task_page_updates_itself_until_it_finishes(page: Any, signed_up: str) -> None:
    # given a generation that takes a few seconds upstream
    task = generate(signed_up, "a slow sunrise", sandbox_latency_ms=4000)

    # when its page is opened while it runs
    page.goto(f"/history/{task.pk}/")
    page.evaluate("window.notReloaded = true")
    expect(page.locator("#task-state .status")).to_have_text(re.compile("Waiting|Generating"))
    expect(page.get_by_role("button", name="Cancel")).to_be_visible()

    # then it turns into the result without a reload, and stops polling
    expect(page.locator("#task-state .status")).to_have_text("Success", timeout=30_000)
    expect(page.locator(".task-results img")).to_have_count(1)
    expect(page.get_by_role("button", name="Cancel")).to_have_count(0)
    expect(page.locator("#task-announce")).to_have_text("Finished: your result is ready.")
    assert page.evaluate("window.notReloaded") is True
    assert page.locator("#task-live").get_attribute("hx-trigger") is None
    assert page.evaluate("document.activeElement === document.body")  # polling took no focus


@pytest.mark.usefixtures("e2e")
def test_cancel_on_the_task_page_by_keyboard(page: Any, signed_up: str) -> None:
    # given a long generation's page
    task = generate(signed_up, "a very long night", sandbox_latency_ms=120_000)
    page.goto(f"/history/{task.pk}/")
    expect(page.get_by_test_id("header-credits")).to_have_text("9 credits")

    # when the user cancels it with the keyboard
    page.get_by_role("button", name="Cancel").focus()
    page.keyboard.press("Enter")

    # then the page says so (announced), keeps focus on the status, and the credit is back
    expect(page.locator("#task-state .status")).to_have_text("Cancelled")
    expect(page.locator("#task-announce")).to_have_text("Cancelled. 1 credit returned.")
    expect(page.locator("#task-state")).to_be_focused()
    expect(page.get_by_test_id("refunded")).to_have_text("1")
    expect(page.locator("ol.timeline")).to_contain_text("Cancelled by you.")
    expect(page.get_by_test_id("header-credits")).to_have_text("10 credits")


@pytest.mark.usefixtures("e2e")
def test_a_running_row_finishes_in_place(page: Any, signed_up: str) -> None:
    # given a generation that takes a few seconds, seen in History while it runs
    task = generate(signed_up, "a slow moonrise", sandbox_latency_ms=4000)
    page.goto("/history/")
    expect(row(page, task).locator(".status")).to_have_text(re.compile("Waiting|Generating"))
    page.evaluate("window.notReloaded = true")

    # then it turns into its result without a reload, says so, and the header follows
    expect(row(page, task).locator(".status")).to_have_text("Success", timeout=30_000)
    thumb = row(page, task).locator("img.thumb")
    page.wait_for_function("i => i.complete && i.naturalWidth > 0", arg=thumb.element_handle())
    expect(page.locator("#history-live")).to_contain_text("a slow moonrise")
    expect(page.get_by_test_id("header-credits")).to_have_text("9 credits")
    assert page.evaluate("window.notReloaded") is True


@pytest.mark.usefixtures("e2e")
def test_cancel_from_history_refunds_in_place(page: Any, signed_up: str) -> None:
    # given a generation that would run for a long time
    task = generate(signed_up, "an endless tide", sandbox_latency_ms=120_000)
    wait_for(lambda: status_of(task) == "GENERATING", timeout=30, what="the job to start")
    page.goto("/history/")
    expect(page.get_by_test_id("header-credits")).to_have_text("9 credits")
    page.evaluate("window.notReloaded = true")

    # when the user cancels it from the list
    row(page, task).get_by_role("button", name="Cancel").click()

    # then the row says so, the credit is back in the header, without a reload
    expect(row(page, task).locator(".status")).to_have_text("Cancelled")
    expect(row(page, task)).to_contain_text("1 credit returned to your balance")
    expect(page.get_by_test_id("header-credits")).to_have_text("10 credits")
    assert page.evaluate("window.notReloaded") is True
    assert status_of(task) == "CANCELLED"


@pytest.mark.usefixtures("e2e")
def test_delete_asks_first_and_then_removes_the_task(page: Any, signed_up: str) -> None:
    # given two finished generations
    kept = generate(signed_up, "a kept lighthouse")
    doomed = generate(signed_up, "a doomed sandcastle")
    wait_for(lambda: finished(kept, doomed), timeout=60, what="the generations")
    page.goto("/history/")
    expect(page.locator("li.task")).to_have_count(2)
    dialog = page.locator("#delete-dialog")

    # when Delete is chosen, it asks first, and Escape keeps the task
    row(page, doomed).get_by_role("link", name="Delete").click()
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text("a doomed sandcastle")
    expect(dialog.get_by_role("button", name="Keep it")).to_be_focused()
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    expect(row(page, doomed)).to_be_visible()
    expect(row(page, doomed).get_by_role("link", name="Delete")).to_be_focused()

    # when it is confirmed with the keyboard
    page.keyboard.press("Enter")
    expect(dialog).to_be_visible()
    page.keyboard.press("Shift+Tab")
    expect(dialog.get_by_role("button", name="Delete")).to_be_focused()
    page.keyboard.press("Enter")

    # then the row goes away in place, the page says so, and it stays gone
    expect(dialog).to_be_hidden()
    expect(row(page, doomed)).to_have_count(0)
    expect(page.locator("#history-live")).to_have_text("Deleted from your history.")
    page.reload()
    expect(page.locator("li.task")).to_have_count(1)
    expect(row(page, kept)).to_be_visible()
    assert page.goto(f"/history/{doomed.pk}/").status == 404


@pytest.mark.usefixtures("e2e")
def test_another_users_task_is_a_404(
    page: Any, browser: Any, live_server: Any, sign_up: Any
) -> None:
    # given a task of one user
    sign_up(page, "owner_of_fox")
    task = generate("owner_of_fox", "the owner's private fox")
    assert page.goto(f"/history/{task.pk}/").status == 200

    # when another user, in another browser, opens its address (or the old link form)
    context = browser.new_context(base_url=live_server.url)
    try:
        other = context.new_page()
        sign_up(other, "someone_else")
        response = other.goto(f"/history/{task.pk}/")

        # then it is the styled 404, with nothing of the task
        assert response.status == 404
        expect(other.get_by_role("heading", name="We could not find that page")).to_be_visible()
        expect(other.locator("body")).not_to_contain_text("private fox")
        assert other.goto(f"/history/?task={task.pk}").status == 404
        other.goto("/history/")
        expect(other.locator("li.task")).to_have_count(0)
    finally:
        context.close()
