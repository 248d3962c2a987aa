"""The chat pages in Chromium, against Rivya under uvicorn (``chat_server``: streams need ASGI)
and the sandbox as the provider, its knobs set through the message box's Testing section: a
reply streamed token by token and settled, Stop mid-stream, another user's chat, and a turn
refused for credits."""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable
from typing import Any

import pytest
from django.contrib.auth import get_user_model

from billing.invariants import run_checks
from billing.models import Entry, Hold
from billing.selectors import balance_for_user
from chat import services as chat_services
from chat.models import ChatMessage, ChatSession
from rivya.money import format_credits
from tests.browser.studio_steps import set_knobs

pytestmark = pytest.mark.usefixtures("e2e")

_names = itertools.count()
PASSWORD = "a-Long-pass-123"
REPLY = "[data-testid=message][data-role=assistant]"

# Records the length of the streaming reply's text at every change of the conversation.
WATCH_REPLY = """() => {
  window.__lengths = [];
  window.__stopSeen = false;
  new MutationObserver(() => {
    const text = document.querySelector(
      "[data-role=assistant][data-status=STREAMING] [data-testid=message-text]");
    if (!text) return;
    window.__lengths.push(text.textContent.length);
    if (!document.querySelector("[data-testid=stop]").hidden) window.__stopSeen = true;
  }).observe(document.getElementById("chat-log"),
             {subtree: true, childList: true, characterData: true});
}"""


def new_name() -> str:
    return f"chat{os.getpid()}x{next(_names)}"


def log_in(page: Any, username: str) -> None:
    page.goto("/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(lambda url: "/login/" not in url)


def start_chat(page: Any, model: str = "sandbox-chat") -> str:
    """Start a chat with ``model`` from the list page; returns the session id."""
    page.goto("/chat/")
    page.check(f"#model-{model}")
    page.get_by_test_id("start-chat").click()
    page.wait_for_url(re.compile(r"/chat/[0-9a-f-]{36}/$"))
    return page.url.rstrip("/").rsplit("/", 1)[1]


def header_credits(page: Any) -> str:
    return page.get_by_test_id("header-credits").inner_text().strip()


def wait_for_header(page: Any, text: str) -> None:
    page.wait_for_function(
        f"document.querySelector('[data-testid=header-credits]').textContent.trim() === '{text}'"
    )


def assistant_message(session_id: str) -> ChatMessage:
    return ChatMessage.objects.get(session_id=session_id, role=ChatMessage.Role.ASSISTANT)


def assert_shows_settlement(reply: Any, message: ChatMessage) -> None:
    """The turn's tokens and credits on the page are the database's."""
    shown = {
        name: reply.get_by_test_id(name).inner_text().strip()
        for name in (
            "tokens-in",
            "tokens-out",
            "credits-reserved",
            "credits-charged",
            "credits-refunded",
        )
    }
    assert shown == {
        "tokens-in": str(message.input_tokens),
        "tokens-out": str(message.output_tokens),
        "credits-reserved": format_credits(message.reserved_micro),
        "credits-charged": format_credits(message.charged_micro),
        "credits-refunded": format_credits(message.refunded_micro),
    }
    assert reply.get_by_test_id("credits-uncollected").count() == (
        1 if message.uncollected_micro else 0
    )


def test_a_reply_streams_in_token_by_token_then_shows_its_cost(
    chat_page: Any, sign_up: Callable[[Any, str], None], shoot: Any
) -> None:
    page = chat_page
    name = new_name()
    sign_up(page, name)
    user = get_user_model().objects.get(username=name)
    assert header_credits(page) == "10 credits"
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Chat").click()
    page.wait_for_url("**/chat/")
    assert page.get_by_test_id("price-sandbox-chat").inner_text() == (
        "10 credits per million input tokens, 30 per million output tokens"
    )
    session_id = start_chat(page)
    assert not page.locator("#id_param_sandbox_reply_tokens").is_visible()  # collapsed
    set_knobs(page, token_delay_ms="20", reply_tokens="60")
    page.evaluate(WATCH_REPLY)
    page.evaluate("window.__sameDocument = true")

    box = page.get_by_label("Message")
    box.fill("Tell me about foxes.")
    box.press("Shift+Enter")  # a new line, not a send
    box.type("Briefly, please.")
    assert box.input_value() == "Tell me about foxes.\nBriefly, please."
    assert page.locator(REPLY).count() == 0
    box.press("Enter")  # sends

    reply = page.locator(REPLY).last
    page.locator(f"{REPLY}[data-status=COMPLETE]").wait_for(timeout=20_000)
    lengths = page.evaluate("window.__lengths")
    assert len(set(lengths)) >= 20, lengths  # it grew token by token, not all at once
    assert lengths == sorted(lengths)
    assert page.evaluate("window.__stopSeen") is True  # Stop was offered while it streamed
    assert page.get_by_test_id("stop").is_hidden()
    assert page.evaluate("window.__sameDocument") is True  # no reload

    message = assistant_message(session_id)
    assert message.status == ChatMessage.Status.COMPLETE
    assert message.output_tokens == 60
    assert message.client_gone_at is None
    assert reply.get_by_test_id("message-text").inner_text() == message.content
    assert (
        page.locator("[data-testid=message][data-role=user]")
        .last.inner_text()
        .endswith("Tell me about foxes.\nBriefly, please.")
    )
    assert_shows_settlement(reply, message)
    assert message.charged_micro == message.input_tokens * 10 + 60 * 30
    available = balance_for_user(user=user).available
    assert available == 10_000_000 - message.charged_micro
    wait_for_header(page, f"{format_credits(available)} credits")
    assert box.input_value() == ""
    assert page.evaluate("document.activeElement.id") == "id_content"
    title = "Tell me about foxes. Briefly, please."  # named after its first message
    assert page.get_by_test_id("chat-title").inner_text() == title
    page.reload()  # the same turn as the page renders it
    assert_shows_settlement(page.locator(REPLY).last, message)
    assert page.get_by_test_id("chat-title").inner_text() == title
    shoot(page, "chat")

    page.goto("/chat/")
    assert page.get_by_test_id("session").count() == 1
    assert "Tell me about foxes." in page.get_by_test_id("session").inner_text()
    shoot(page, "chat-sessions")


def test_stop_mid_stream_shows_stopped_then_the_settled_turn(
    chat_page: Any, sign_up: Callable[[Any, str], None]
) -> None:
    page = chat_page
    name = new_name()
    sign_up(page, name)
    user = get_user_model().objects.get(username=name)
    session_id = start_chat(page)
    set_knobs(page, token_delay_ms="30", reply_tokens="200")

    page.get_by_label("Message").fill("Write me a long story.")
    page.get_by_test_id("send").click()
    reply = page.locator(REPLY).last
    page.wait_for_function(  # a few words in, well before its end (about 6 s)
        f"(document.querySelector('{REPLY} [data-testid=message-text]')?.textContent || '')"
        ".split(' ').length > 10"
    )
    page.get_by_test_id("stop").click()

    status = reply.get_by_test_id("message-status")
    assert status.inner_text() == "Stopped"
    shown_at_stop = len(reply.get_by_test_id("message-text").inner_text())
    assert page.get_by_test_id("stop").is_hidden()
    assert page.get_by_test_id("send").is_enabled()
    page.locator(f"{REPLY}[data-status=COMPLETE]").wait_for(timeout=15_000)

    message = assistant_message(session_id)
    assert message.status == ChatMessage.Status.COMPLETE
    assert message.client_gone_at is not None
    assert message.output_tokens == 200  # it ran to its end upstream
    hold = Hold.objects.get(subject_type="chat.message", subject_id=str(message.pk))
    assert hold.status != Hold.Status.OPEN
    assert hold.resolved_at is not None
    assert run_checks() == []
    settled = page.locator(f"{REPLY}[data-status=COMPLETE]")
    assert settled.get_by_test_id("message-status").inner_text() == "Stopped"
    assert settled.get_by_test_id("message-text").inner_text() == message.content
    assert len(message.content) > shown_at_stop
    assert "stopped on your screen" in settled.get_by_test_id("notices").inner_text()
    assert_shows_settlement(settled, message)
    available = balance_for_user(user=user).available
    wait_for_header(page, f"{format_credits(available)} credits")


def test_another_users_chat_is_the_styled_404(
    chat_page: Any, sign_up: Callable[[Any, str], None]
) -> None:
    owner = get_user_model().objects.create_user(username=new_name(), password=PASSWORD)
    theirs = chat_services.create_session(user=owner, model_slug="sandbox-chat", title="Private")
    page = chat_page
    sign_up(page, new_name())

    response = page.goto(f"/chat/{theirs.pk}/")

    assert response.status == 404
    assert page.get_by_role("heading", name="We could not find that page").is_visible()
    assert "Private" not in page.content()
    assert page.request.get(f"/chat/{theirs.pk}/delete/").status == 404
    page.goto("/chat/")
    assert page.get_by_test_id("session").count() == 0


def test_without_credits_sending_says_so_and_charges_nothing(chat_page: Any) -> None:
    name = new_name()
    user = get_user_model().objects.create_user(
        username=name, email=f"{name}@example.com", password=PASSWORD
    )
    page = chat_page
    log_in(page, name)
    assert header_credits(page) == "0 credits"
    session_id = start_chat(page, "sandbox-chat-mini")

    page.get_by_label("Message").fill("Hello?")
    page.get_by_label("Message").press("Enter")

    refusal = page.get_by_test_id("insufficient")
    refusal.wait_for()
    assert "Not enough credits" in refusal.inner_text()
    assert refusal.get_by_test_id("available").inner_text() == "0 credits"
    assert "nothing was charged" in refusal.inner_text()
    assert page.locator("[data-testid=message]").count() == 0  # the turn was not recorded
    assert page.get_by_label("Message").input_value() == "Hello?"  # given back
    assert page.get_by_test_id("send").is_enabled()
    assert not ChatMessage.objects.filter(session_id=session_id).exists()
    assert not Hold.objects.filter(account__user=user).exists()
    assert not Entry.objects.filter(account__user=user).exists()
    assert balance_for_user(user=user).balance == 0
    assert ChatSession.objects.get(pk=session_id).title == ""


def test_a_refused_field_and_a_failed_turn_say_what_happened(
    chat_page: Any, sign_up: Callable[[Any, str], None]
) -> None:
    page = chat_page
    sign_up(page, new_name())
    session_id = start_chat(page)
    box = page.get_by_label("Message")

    page.locator("details.options summary").click()
    page.get_by_label("Max tokens").fill("5000")  # over the model's 2,048
    box.fill("A reply that is too long")
    page.get_by_test_id("send").click()

    error = page.locator("#err-max_tokens")
    error.wait_for()
    assert "Must be between 1 and 2048." in error.inner_text()
    assert page.evaluate("document.activeElement.id") == "id_max_tokens"
    assert box.input_value() == "A reply that is too long"  # given back
    assert page.locator("[data-testid=message]").count() == 0

    page.get_by_label("Max tokens").fill("")
    set_knobs(page, outcome="fail", reply_tokens="20", fail_after_tokens="5")
    box.press("Enter")

    failed = page.locator(f"{REPLY}[data-status=FAILED]")
    failed.wait_for()
    assert page.locator("#err-max_tokens").inner_text() == ""
    message = assistant_message(session_id)
    assert message.status == ChatMessage.Status.FAILED
    assert failed.get_by_test_id("message-status").inner_text() == "Failed"
    assert failed.get_by_test_id("fault").inner_text() == "Cause: the provider failed."
    assert failed.get_by_test_id("error-message").inner_text() == message.error_message
    assert_shows_settlement(failed, message)  # the usage it reported before failing


def test_a_turn_whose_tool_makes_an_image_shows_it_in_the_conversation(
    chat_page: Any, sign_up: Callable[[Any, str], None], shoot: Any
) -> None:
    # The sandbox model is told (Testing section) to call generate_image; the stack's worker
    # runs the task; the conversation shows it live, then the image.
    from tasks.models import Task

    page = chat_page
    name = new_name()
    sign_up(page, name)
    session_id = start_chat(page)
    set_knobs(
        page,
        tool_call='{"tool": "generate_image", "arguments": {"prompt": "a red fox"}}',
        reply_tokens="12",
    )

    page.get_by_label("Message").fill("Draw me a fox, please.")
    page.get_by_label("Message").press("Enter")

    reply = page.locator(f"{REPLY}[data-status=COMPLETE]")
    reply.wait_for(timeout=20_000)
    call = reply.get_by_test_id("tool-call")
    assert call.get_attribute("data-tool") == "generate_image"
    assert "“a red fox”" in call.inner_text()
    image = call.get_by_test_id("tool-result-image")
    image.wait_for(timeout=30_000)
    page.wait_for_function(
        "document.querySelector('[data-testid=tool-result-image]').naturalWidth > 0"
    )
    assert call.get_by_test_id("tool-task").get_attribute("data-status") == "SUCCESS"

    message = assistant_message(session_id)
    task = Task.objects.get(pk=message.task_ids[0])
    assert (task.status, task.prompt, task.charged_micro) == (
        "SUCCESS",
        "a red fox",
        task.price_micro,
    )
    assert message.charged_micro < task.charged_micro  # billed apart: tokens, and the image
    user = get_user_model().objects.get(username=name)
    assert balance_for_user(user=user).available == (
        10_000_000 - message.charged_micro - task.charged_micro
    )
    assert run_checks() == []
    shoot(page, "chat-tool-image")
