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
