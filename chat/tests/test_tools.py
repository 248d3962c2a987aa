"""Tool-backed chat (issue 21): a turn whose model calls ``generate_image``, ``generate_video``
or ``generate_audio`` creates an ordinary task, billed as a task with its own hold, apart from
the turn's tokens. Against the sandbox process: its chat model calls the tool the
``sandbox_tool_call`` knob names."""

from __future__ import annotations

from typing import Any

import pytest

from billing import selectors as billing_selectors
from billing.models import Hold
from chat.models import ChatMessage
from tasks.models import Task
from tasks.tests.lifecycle import run_to_end

C = 1_000_000
pytestmark = pytest.mark.usefixtures("chat_catalog", "queued", "ledger_ok")


def tool_call(tool: str = "generate_image", **arguments: Any) -> dict[str, Any]:
    return {"sandbox_tool_call": {"tool": tool, "arguments": arguments}}


def race(*works: Any) -> list[BaseException]:
    """Run ``works`` in threads started together; what they raised."""
    import threading

    from django.db import connection

    barrier = threading.Barrier(len(works))
    failures: list[BaseException] = []

    def run(work: Any) -> None:
        try:
            barrier.wait()
            work()
        except BaseException as exc:  # noqa: BLE001 - returned to the test
            failures.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(work,)) for work in works]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return failures


def settle_calling(message_id: Any, *calls: tuple[str, str]) -> ChatMessage:
    """Settle a started turn as a provider would end it: a short reply, usage reported, and
    ``calls`` (tool, arguments text) made."""
    from chat import services
    from tasks.providers.base import ChatToolCall, ChatUsage

    return services.finish_turn(
        message_id=message_id,
        content="Here it comes.",
        usage=ChatUsage(input_tokens=10, output_tokens=3),
        streamed_tokens=3,
        finish_reason="tool_calls",
        tool_calls=[
            ChatToolCall(id=f"call_{n}", name=tool, arguments=arguments)
            for n, (tool, arguments) in enumerate(calls)
        ],
    )


FOX = ("generate_image", '{"prompt": "a fox"}')


def test_a_tool_call_creates_a_task_billed_apart_from_the_turn(
    chatter: Any, open_session: Any, say: Any
) -> None:
    user, client = chatter(10 * C)
    session = open_session(client)

    status, body = say(client, session, "Draw me a fox", params=tool_call(prompt="a red fox"))

    assert status == 201, body
    assert body["status"] == "COMPLETE"
    assert len(body["task_ids"]) == 1
    [call] = body["tool_calls"]
    assert call["tool"] == "generate_image"
    assert call["arguments"] == {"prompt": "a red fox"}
    assert call["error"] is None
    assert call["task_id"] == body["task_ids"][0]
    task = Task.objects.get(pk=call["task_id"])
    assert (task.user_id, task.model_slug, task.prompt) == (user.pk, "sandbox-image", "a red fox")
    assert Hold.objects.get(subject_id=str(task.pk)).amount == task.price_micro
    turn = ChatMessage.objects.get(pk=body["id"])
    assert turn.charged_micro > 0

    task = run_to_end(task)
    assert task.status == Task.Status.SUCCESS
    balance = billing_selectors.balance_for_user(user=user)
    assert balance.available == 10 * C - turn.charged_micro - task.charged_micro
    assert balance.held == 0


def test_a_tool_task_that_fails_is_refunded_as_any_task(
    chatter: Any, open_session: Any, say: Any
) -> None:
    user, client = chatter(10 * C)
    session = open_session(client)

    _, body = say(client, session, params=tool_call(prompt="a fox", sandbox_outcome="fail"))
    task = run_to_end(Task.objects.get(pk=body["task_ids"][0]))

    assert (task.status, task.charged_micro, task.refunded_micro) == (
        Task.Status.FAILED,
        0,
        task.price_micro,
    )
    turn = ChatMessage.objects.get(pk=body["id"])
    assert turn.status == ChatMessage.Status.COMPLETE  # the turn is settled on its own
    balance = billing_selectors.balance_for_user(user=user)
    assert (balance.available, balance.held) == (10 * C - turn.charged_micro, 0)


def test_too_few_credits_for_the_tool_is_a_tool_error_and_the_turn_still_settles(
    chatter: Any, open_session: Any, say: Any
) -> None:
    user, client = chatter(C // 2)  # the turn's tokens, not a 1-credit image
    session = open_session(client)

    status, body = say(client, session, params=tool_call(prompt="a fox"))

    assert status == 201
    assert body["status"] == "COMPLETE"
    [call] = body["tool_calls"]
    assert call["error"]["code"] == "insufficient_credits"
    assert "credits" in call["error"]["message"]
    # The refused submit is in History, as every refused submit is, and holds nothing
    task = Task.objects.get(pk=call["task_id"])
    assert (task.status, task.error_code, task.reserved_micro) == (
        Task.Status.FAILED,
        "insufficient_credits",
        0,
    )
    assert not Hold.objects.filter(subject_id=str(task.pk)).exists()
    turn = ChatMessage.objects.get(pk=body["id"])
    balance = billing_selectors.balance_for_user(user=user)
    assert (balance.available, balance.held) == (C // 2 - turn.charged_micro, 0)


def test_two_tool_calls_in_one_turn_make_two_tasks_each_with_its_own_hold(
    chatter: Any, open_session: Any, say: Any
) -> None:
    user, client = chatter(10 * C)
    session = open_session(client)
    calls = [
        {"tool": "generate_image", "arguments": {"prompt": "a fox", "num_outputs": 2}},
        {"tool": "generate_audio", "arguments": {"prompt": "a fox's bark"}},
    ]

    _, body = say(client, session, params={"sandbox_tool_call": calls})

    assert [c["tool"] for c in body["tool_calls"]] == ["generate_image", "generate_audio"]
    assert [c["error"] for c in body["tool_calls"]] == [None, None]
    tasks = [Task.objects.get(pk=task_id) for task_id in body["task_ids"]]
    assert [t.model_slug for t in tasks] == ["sandbox-image", "sandbox-speech"]
    holds = [Hold.objects.get(subject_id=str(t.pk)).amount for t in tasks]
    assert holds == [t.price_micro for t in tasks]
    assert holds[0] == 2 * C  # two images
    for task in tasks:
        assert run_to_end(task).status == Task.Status.SUCCESS
    turn = ChatMessage.objects.get(pk=body["id"])
    balance = billing_selectors.balance_for_user(user=user)
    assert balance.available == 10 * C - turn.charged_micro - sum(holds)
    assert balance.held == 0


@pytest.mark.parametrize(
    ("arguments", "code", "says"),
    [
        ({"prompt": "a fox", "colour": "red"}, "validation_error", "colour"),
        ({"prompt": "a fox", "width": 99999}, "validation_error", "width"),
        ("{not json", "invalid_arguments", "not valid JSON"),
        ("[1, 2]", "invalid_arguments", "JSON object"),
        # JSON's non-standard constants, and text the database cannot store: refused before
        # the settling transaction writes anything (else the turn could never settle)
        ('{"prompt": NaN}', "invalid_arguments", "not valid JSON"),
        ('{"prompt": "a\\u0000fox"}', "invalid_arguments", "NUL"),
        ('{"prompt": "a \\ud800 fox"}', "invalid_arguments", "invalid Unicode"),
        ('{"prompt": "a fox", "x": "' + "y" * 20_000 + '"}', "invalid_arguments", "over"),
    ],
)
def test_arguments_that_are_not_valid_are_a_tool_error_and_nothing_is_created(
    arguments: Any, code: str, says: str, chatter: Any, open_session: Any, say: Any
) -> None:
    user, client = chatter(10 * C)
    session = open_session(client)

    status, body = say(
        client,
        session,
        params={"sandbox_tool_call": {"tool": "generate_image", "arguments": arguments}},
    )

    assert status == 201
    [call] = body["tool_calls"]
    assert call["error"]["code"] == code
    assert says in call["error"]["message"]
    assert (call["task_id"], body["task_ids"]) == (None, [])
    assert body["status"] == "COMPLETE"
    assert ChatMessage.objects.get(pk=body["id"]).charged_micro > 0  # the turn was settled
    assert len(str(call["arguments"])) <= 1_000  # what is kept of refused arguments
    assert not Task.objects.filter(user=user).exists()


def test_a_full_capacity_is_a_tool_error(
    chatter: Any, open_session: Any, say: Any, settings: Any
) -> None:
    settings.TASK_MAX_RUNNING_PER_USER = 1
    user, client = chatter(10 * C)
    session = open_session(client)
    say(client, session, params=tool_call(prompt="first"))  # running, so the user is at 1

    _, body = say(client, session, params=tool_call(prompt="second"))

    [call] = body["tool_calls"]
    assert call["error"]["code"] == "too_many_running_tasks"
    assert Task.objects.filter(user=user).count() == 1


def test_the_next_turn_tells_the_model_how_its_tool_calls_went(
    chatter: Any, open_session: Any, say: Any
) -> None:
    from chat import services

    user, client = chatter(C // 2)
    session = open_session(client)
    _, body = say(client, session, params=tool_call(prompt="a fox"))

    start = services.start_turn(user=user, session_id=session, content="Did it work?")

    assert start.request is not None
    told = [m.content for m in start.request.messages if m.role == "assistant"]
    assert told[-1].endswith(
        "Tool results:\n- generate_image failed (insufficient_credits): "
        + body["tool_calls"][0]["error"]["message"]
    )
    assert [t.name for t in start.request.tools] == [
        "generate_image",
        "generate_video",
        "generate_audio",
    ]


def test_a_turn_settled_twice_at_once_runs_its_tools_once(chatter: Any, open_session: Any) -> None:
    # Two settlements of one turn race (a retried settlement, the beat's sweep): the first
    # runs the tools in its transaction; the second finds the turn settled.
    from chat import services

    user, client = chatter(10 * C)
    session = open_session(client)
    start = services.start_turn(user=user, session_id=session, content="Draw a fox")
    settled: list[ChatMessage] = []

    def settle() -> None:
        settled.append(settle_calling(start.message.pk, FOX))

    assert race(settle, settle) == []

    assert len(settled) == 2
    assert settled[0].task_ids == settled[1].task_ids
    assert Task.objects.filter(user=user).count() == 1
    task = Task.objects.get(user=user)
    assert Hold.objects.filter(subject_id=str(task.pk)).count() == 1


def test_the_stream_says_when_a_tool_starts_and_when_its_task_finishes(
    chatter: Any, open_session: Any, stream: Any
) -> None:
    # The worker's part (send the task upstream, take its result) is played by a thread.
    import threading
    import time

    from django.db import connection

    user, client = chatter(10 * C)
    session = open_session(client)
    done = threading.Event()

    def worker() -> None:
        try:
            while not done.is_set():
                task = Task.objects.filter(user=user, status=Task.Status.WAITING).first()
                if task is not None:
                    run_to_end(task)
                    return
                time.sleep(0.05)
        finally:
            connection.close()

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        events = stream(client, session, "Draw a fox", params=tool_call(prompt="a red fox"))
    finally:
        done.set()
        thread.join()

    names = [name for name, _ in events]
    assert names[0] == "message"
    # The settlement is the turn's last word; the task's result follows it
    assert names[-3:] == ["tool_call", "settlement", "tool_result"]
    call, settlement, result = (data for _, data in events[-3:])
    assert call["tool"] == "generate_image"
    assert call["task_id"] == result["task_id"] == settlement["task_ids"][0]
    assert (result["id"], result["status"], result["error"], result["outputs"]) == (
        call["id"],
        "SUCCESS",
        None,
        1,
    )


def test_the_stream_reports_a_tool_error_at_once(
    chatter: Any, open_session: Any, stream: Any
) -> None:
    _, client = chatter(C // 2)
    session = open_session(client)

    events = stream(client, session, "Draw a fox", params=tool_call(prompt="a fox"))

    by_name = dict(events)
    assert by_name["tool_call"]["error"]["code"] == "insufficient_credits"
    assert by_name["tool_result"]["status"] == "FAILED"
    assert by_name["tool_result"]["error"]["code"] == "insufficient_credits"
    assert [name for name, _ in events][-2:] == ["settlement", "tool_result"]


def test_the_conversation_shows_the_tool_task_live_then_its_image(
    chatter: Any, open_session: Any, say: Any, make_user: Any
) -> None:
    from django.test import Client

    user, api = chatter(10 * C)
    session = open_session(api)
    _, body = say(api, session, "Draw a fox", params=tool_call(prompt="a red fox"))
    task_id = body["task_ids"][0]
    page = Client()
    page.force_login(user)

    html = page.get(f"/chat/{session}/").content.decode()
    assert 'data-testid="tool-call" data-tool="generate_image"' in html
    assert "“a red fox”" in html
    assert f'hx-get="/chat/tasks/{task_id}/"' in html  # live while it runs

    run_to_end(Task.objects.get(pk=task_id))
    card = page.get(f"/chat/tasks/{task_id}/").content.decode()
    assert 'data-status="SUCCESS"' in card
    assert f'src="/api/v1/tasks/{task_id}/results/0/"' in card
    assert "hx-get" not in card  # finished: no more polling
    assert (
        page.get(f"/chat/{session}/").content.decode().count('data-testid="tool-result-image"') == 1
    )

    # Another user's task is not shown to anyone else
    stranger = Client()
    stranger.force_login(make_user())
    assert stranger.get(f"/chat/tasks/{task_id}/").status_code == 404


def test_the_conversation_says_why_a_tool_did_not_generate(
    chatter: Any, open_session: Any, say: Any
) -> None:
    from django.test import Client

    user, api = chatter(C // 2)
    session = open_session(api)
    say(api, session, "Draw a fox", params=tool_call(prompt="a red fox"))
    page = Client()
    page.force_login(user)

    html = page.get(f"/chat/{session}/").content.decode()

    assert 'data-testid="tool-error" data-code="insufficient_credits"' in html
    assert "Not generated: Not enough credits" in html


def test_supports_timeline_of_a_turn_shows_its_tool_calls_and_links_their_tasks(
    chatter: Any, open_session: Any, say: Any, staff: Any
) -> None:
    from django.test import Client

    _, api = chatter(10 * C)
    session = open_session(api)
    calls = [
        {"tool": "generate_image", "arguments": {"prompt": "a red fox"}},
        {"tool": "generate_image", "arguments": {"prompt": "a fox", "colour": "red"}},
    ]
    _, body = say(api, session, params={"sandbox_tool_call": calls})
    admin = Client()
    admin.force_login(staff)

    html = admin.get(f"/admin/chat/chatmessage/{body['id']}/change/").content.decode()

    task_id = body["task_ids"][0]
    assert f'<a href="/admin/tasks/task/{task_id}/change/">task {task_id[:8]}</a>: WAITING' in html
    assert "“a red fox” (sandbox-image)" in html
    assert "refused: validation_error: The arguments are not valid: colour" in html


@pytest.mark.parametrize(
    ("tool", "model", "arguments"),
    [
        ("generate_video", "sandbox-video", {"prompt": "a fox running", "duration_s": 2}),
        ("generate_audio", "sandbox-speech", {"prompt": "hello, fox"}),
    ],
)
def test_video_and_audio_tools_generate_with_their_catalog_models(
    tool: str, model: str, arguments: dict[str, Any], chatter: Any, open_session: Any, say: Any
) -> None:
    _, client = chatter(10 * C)
    session = open_session(client)

    _, body = say(
        client, session, params={"sandbox_tool_call": {"tool": tool, "arguments": arguments}}
    )

    [call] = body["tool_calls"]
    assert (call["tool"], call["model"], call["error"]) == (tool, model, None)
    task = run_to_end(Task.objects.get(pk=call["task_id"]))
    assert (task.model_slug, task.status) == (model, Task.Status.SUCCESS)
    assert task.results[0]["mime"].split("/")[0] == model.split("-")[1].replace("speech", "audio")


def test_a_reply_stopped_by_its_user_generates_nothing(chatter: Any, open_session: Any) -> None:
    # Stop means the user no longer wants what the reply asks for: its tools are not run.
    from chat import services
    from tasks.providers.base import ChatToolCall, ChatUsage

    user, client = chatter(10 * C)
    session = open_session(client)
    start = services.start_turn(user=user, session_id=session, content="Draw a fox")

    message = services.finish_turn(
        message_id=start.message.pk,
        content="Here it",
        usage=ChatUsage(input_tokens=10, output_tokens=2),
        streamed_tokens=2,
        finish_reason="tool_calls",
        client_gone=True,
        tool_calls=[ChatToolCall(id="c", name="generate_image", arguments='{"prompt": "x"}')],
    )

    assert [c["error"]["code"] for c in message.tool_calls] == ["stopped"]
    assert message.task_ids == []
    assert not Task.objects.filter(user=user).exists()


def test_a_tool_calling_turn_settles_while_the_users_task_settles(
    chatter: Any, open_session: Any
) -> None:
    # Both take the user's capacity rows, holds and account: in the same order (capacity
    # first), so neither waits on the other in a cycle. Five rounds, each started together.
    from functools import partial

    from chat import services
    from tasks import services as task_services
    from tasks.tests.lifecycle import submit

    user, client = chatter(20 * C)
    session = open_session(client)
    for _ in range(5):
        task = submit(user)
        task_services.task_send_upstream(task_id=task.pk)
        start = services.start_turn(user=user, session_id=session, content="Draw a fox")

        failures = race(
            partial(task_services.task_refresh, task_id=task.pk),
            partial(settle_calling, start.message.pk, FOX),
        )

        assert failures == []
        task.refresh_from_db()
        assert task.status == Task.Status.SUCCESS
        assert len(ChatMessage.objects.get(pk=start.message.pk).task_ids) == 1
