"""Single (synchronous) tasks in the Studio, in Chromium against the live server and the sandbox:
each of the four types filled in, submitted to POST /api/v1/single/<type>/ by the page, and its
result shown in place (a translation, a completion, speech that plays, a transcription with word
timings); a provider failure's refund and a field refused; the result on the task's page."""

from __future__ import annotations

from typing import Any

import pytest

from tasks.sandbox.speech import synthesize
from tests.browser.studio_steps import MEDIA_DURATION, pick, set_knobs

pytestmark = pytest.mark.usefixtures("e2e")

ANSWER = "#single-result [data-testid=single-answer]"


def header_credits_are(page: Any, credits: str) -> None:
    page.wait_for_function(
        "want => document.querySelector('[data-testid=header-credits]')"
        ".textContent.trim() === want",
        arg=credits,
    )


def price_is(page: Any, price: str) -> None:
    page.wait_for_function(
        "want => document.querySelector('#quote [data-testid=price]').textContent.trim() === want",
        arg=price,
    )


def submit_and_wait(page: Any) -> Any:
    page.get_by_test_id("submit").click()
    answer = page.locator(ANSWER)
    answer.wait_for(timeout=30_000)
    return answer


def test_a_translation_answers_in_place(page: Any, signed_up: str, shoot: Any) -> None:
    page.goto("/studio/")
    pick(page, "text", "sandbox-translate")
    assert page.locator("#id_param_source_language").input_value() == "en"
    assert page.locator("#id_param_target_language").input_value() == "hi"
    page.evaluate("window.__sameDocument = true")

    page.fill("#id_prompt", "Thank you, see you tomorrow.")  # 28 characters

    price_is(page, "0.00056 credits")
    assert page.get_by_test_id("price-detail").inner_text() == "28 characters × 0.00002"
    answer = submit_and_wait(page)
    translated = answer.get_by_test_id("single-text")
    assert translated.get_attribute("lang") == "hi"
    assert any("\u0900" <= ch <= "\u097f" for ch in translated.inner_text())  # Devanagari
    assert "English → Hindi" in answer.inner_text()
    assert "Charged 0.00056 credits" in answer.get_by_test_id("single-charged").inner_text()
    assert page.evaluate("window.__sameDocument") is True  # no reload
    header_credits_are(page, "9.99944 credits")
    card = page.locator("#studio-runs [data-testid=task]").first
    card.wait_for()
    assert card.get_attribute("data-status") == "SUCCESS"
    assert card.get_by_test_id("single-label").inner_text() == "Translation en→hi"
    shoot(page, "studio-single-translation")


def test_a_completion_answers_in_place(page: Any, signed_up: str) -> None:
    page.goto("/studio/")
    pick(page, "text", "sandbox-complete")
    price_is(page, "0.05 credits")

    page.fill("#id_prompt", "Tell me about rivers.")
    page.fill("#id_param_max_tokens", "5")
    answer = submit_and_wait(page)

    words = answer.get_by_test_id("single-text").inner_text().split()
    assert len(words) == 5  # cut by max_tokens
    assert "cut at max_tokens" in answer.inner_text()
    assert "5 out" in answer.inner_text()
    header_credits_are(page, "9.95 credits")


def test_speech_plays_in_place(page: Any, signed_up: str, shoot: Any) -> None:
    page.goto("/studio/")
    pick(page, "audio", "sandbox-tts")
    page.fill("#id_prompt", "Hello there, friend.")  # 20 characters × 50
    page.locator("#id_param_voice").select_option("meera")
    price_is(page, "0.001 credits")

    answer = submit_and_wait(page)

    audio = answer.get_by_test_id("single-audio")
    audio.scroll_into_view_if_needed()
    status, mime = audio.evaluate(
        "el => fetch(el.src).then(r => [r.status, r.headers.get('content-type')])"
    )
    assert (status, mime) == (200, "audio/wav")
    assert audio.evaluate(MEDIA_DURATION) > 0
    assert "voice meera" in page.locator("#studio-runs [data-testid=task]").first.inner_text()
    header_credits_are(page, "9.999 credits")
    shoot(page, "studio-single-speech")


def test_a_transcription_shows_its_words_with_timings(
    page: Any, signed_up: str, shoot: Any
) -> None:
    speech = synthesize("Hello there friend", "aria")  # the sandbox's own speech generator
    page.goto("/studio/")
    pick(page, "text", "sandbox-transcribe")
    assert page.locator("#id_param_language").input_value() == ""  # detect
    price_is(page, "from 0.01 credits")

    page.set_input_files(
        "#id_files", files=[{"name": "hello.wav", "mimeType": "audio/wav", "buffer": speech.wav}]
    )
    page.locator("#id_param_language").select_option("en")
    answer = submit_and_wait(page)

    assert answer.get_by_test_id("single-text").inner_text() == "Hello there friend"
    rows = answer.locator("[data-testid=words] tbody tr")
    assert rows.count() == 3
    first = rows.first.locator("td")
    assert first.nth(0).inner_text() == "Hello"
    start, end = first.nth(1).inner_text(), first.nth(2).inner_text()
    assert start.startswith("0:00.")
    assert end > start
    seconds = -(-speech.duration_ms // 1000)
    header_credits_are(page, f"{10 - seconds * 0.01:g} credits")
    shoot(page, "studio-single-transcription")

    answer.get_by_role("link", name="Details in History").click()
    page.wait_for_url("**/history/*/")
    assert page.get_by_test_id("single-text").inner_text() == "Hello there friend"
    assert page.locator("[data-testid=words] tbody tr").count() == 3
    assert "Transcription (en)" in page.locator("h1").inner_text()
    shoot(page, "task-single")


def test_a_provider_failure_says_so_and_refunds(page: Any, signed_up: str) -> None:
    page.goto("/studio/")
    pick(page, "text", "sandbox-translate")
    page.fill("#id_prompt", "Good morning")  # 12 characters
    set_knobs(page, outcome="fail")

    page.get_by_test_id("submit").click()

    notice = page.locator("#form-notice [data-testid=notice][data-kind=error]")
    notice.wait_for(timeout=30_000)
    said = notice.inner_text()
    assert "The provider failed." in said
    assert "Cause: the provider failed." in said
    assert "the 0.00024 credits set aside went back to your balance" in said
    assert "Try again in a moment" in said
    card = page.locator("#studio-runs [data-testid=task][data-status=FAILED]").first
    card.wait_for()
    assert card.get_by_test_id("refund").inner_text() == "0.00024 credits refunded."
    assert page.locator(ANSWER).count() == 0
    header_credits_are(page, "10 credits")


def test_a_refused_field_is_shown_next_to_it(page: Any, signed_up: str) -> None:
    page.goto("/studio/")
    pick(page, "text", "sandbox-translate")
    page.fill("#id_prompt", "Good morning")
    page.locator("#id_param_target_language").select_option("en")  # the same as the source

    page.get_by_test_id("submit").click()

    slot = page.locator("#err-params-target_language")
    slot.get_by_text("Must differ from source_language.").wait_for()
    assert "nothing was charged" in page.get_by_test_id("notice").inner_text()
    assert page.locator("#studio-runs [data-testid=task]").count() == 0  # nothing recorded
    assert page.evaluate("document.activeElement.id") == "id_param_target_language"


def test_a_recording_too_long_for_the_request_runs_in_the_background(
    page: Any, signed_up: str
) -> None:
    import io
    import wave

    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:  # 2:01 of silence: over the 2 minutes of a request
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(8000)
        out.writeframes(bytes(2 * 8000 * 121))
    page.goto("/studio/")
    pick(page, "text", "sandbox-transcribe")
    page.set_input_files(
        "#id_files",
        files=[{"name": "long.wav", "mimeType": "audio/wav", "buffer": buffer.getvalue()}],
    )

    page.get_by_test_id("submit").click()

    offer = page.get_by_test_id("run-async")
    offer.wait_for(timeout=30_000)
    assert "Too long to run here." in page.get_by_test_id("notice").inner_text()
    assert page.locator("#studio-runs [data-testid=task]").count() == 0
    offer.click()
    page.get_by_text("Running in the background.").wait_for()
    card = page.locator("#studio-runs [data-testid=task][data-status=SUCCESS]").first
    card.wait_for(timeout=60_000)  # polled while a worker runs it
    assert card.get_by_test_id("single-label").inner_text() == "Transcription"
    assert "Charged 1.21 credits." in card.inner_text()
    header_credits_are(page, "8.79 credits")
