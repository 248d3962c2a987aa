"""Tools a chat model may call: ``generate_image``, ``generate_video`` and ``generate_audio``
(``docs/chat.md``, "Tool calls").

Each tool is an ordinary generation: the catalog model it uses is ``CHAT_TOOL_MODELS[tool]``,
its arguments are that model's prompt and parameters (the tool's JSON Schema is derived from
the catalog entry, so they stay the catalog's), and a call creates a task through
``tasks.services.task_submit``, the Studio's own service. The task is billed as a task, with
its own hold, apart from the turn's tokens, and is listed in History.

The calls a turn's model made are run inside the transaction that settles the turn
(``chat.services.finish_turn``), so that each call creates its task exactly once: a turn
settled twice (a retried settlement) finds the first settlement and does nothing. A call that
cannot run (an unknown tool, arguments that are not valid, too little credit, capacity) is a
tool error recorded on the call: the user sees why, and the model is told in the next turn's
context (``context_note``). Nothing of a refused call is kept but the record, except a task
refused for credits, which History lists as every refused submit is.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from django.conf import settings
from django.db import transaction

from rivya.errors import DomainError, ValidationFailed, contains_nul, json_depth, without_nul
from tasks.models import AIModel
from tasks.providers.base import ChatTool, ChatToolCall

DESCRIPTIONS = {
    "generate_image": "Generate images from a text prompt. The images appear in the "
    "conversation when they are ready; they are billed as a generation, apart from this chat.",
    "generate_video": "Generate a video from a text prompt. The video appears in the "
    "conversation when it is ready; it is billed as a generation, apart from this chat.",
    "generate_audio": "Generate audio (speech) from a text prompt. The audio appears in the "
    "conversation when it is ready; it is billed as a generation, apart from this chat.",
}
MAX_ARGUMENTS_CHARS = 20_000
MAX_ARGUMENTS_DEPTH = 8
# What a call's record keeps of arguments that were refused as they came (the text the model
# sent), and of the provider's names for the call and its tool.
KEPT_TEXT_CHARS = 1_000
KEPT_NAME_CHARS = 100


def tool_models() -> dict[str, AIModel]:
    """Each tool's catalog model, for the tools whose model is enabled and generates as an
    asynchronous task (a tool whose model is missing is not offered)."""
    slugs = {tool: settings.CHAT_TOOL_MODELS.get(tool) for tool in DESCRIPTIONS}
    models = {
        m.slug: m
        for m in AIModel.objects.filter(
            slug__in=[s for s in slugs.values() if s],
            enabled=True,
            runtime=AIModel.Runtime.ASYNC,
            direct_generation=True,
        )
    }
    return {tool: models[slug] for tool, slug in slugs.items() if slug in models}


def tool_parameters(model: AIModel) -> dict[str, Any]:
    """The JSON Schema of a tool's arguments: the model's prompt and its catalog parameters."""
    prompt: dict[str, Any] = {
        "type": "string",
        "maxLength": model.max_prompt_length,
        "description": "What to generate, in words.",
    }
    if model.prompt_required:
        prompt["minLength"] = 1
    properties = {"prompt": prompt, **model.params_schema.get("properties", {})}
    return {
        "type": "object",
        "properties": properties,
        "required": ["prompt"] if model.prompt_required else [],
        "additionalProperties": False,
    }


def tool_definitions(models: Mapping[str, AIModel]) -> tuple[ChatTool, ...]:
    """What a turn offers its model: one tool per available catalog model."""
    return tuple(
        ChatTool(name=tool, description=DESCRIPTIONS[tool], parameters=tool_parameters(model))
        for tool, model in models.items()
    )


def _error(code: str, message: str) -> dict[str, str]:
    return {"code": code, "message": message}


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def _arguments(text: str) -> tuple[dict[str, Any] | None, dict[str, str] | None]:
    """The call's arguments as an object, or the tool error saying why they are not one. Text
    the database cannot store (NUL, an unpaired surrogate) or JSON's non-standard constants
    (NaN, Infinity) are refused here, as the API refuses them: they must never reach the
    settling transaction's writes."""
    if len(text) > MAX_ARGUMENTS_CHARS:
        return None, _error(
            "invalid_arguments", f"The arguments are over {MAX_ARGUMENTS_CHARS} characters."
        )
    try:
        value = json.loads(text or "{}", parse_constant=_not_json)
    except (ValueError, RecursionError):
        return None, _error("invalid_arguments", "The arguments are not valid JSON.")
    if not isinstance(value, dict):
        return None, _error("invalid_arguments", "The arguments must be a JSON object.")
    if json_depth(value) > MAX_ARGUMENTS_DEPTH:
        return None, _error("invalid_arguments", "The arguments are nested too deeply.")
    if contains_nul(value):
        return None, _error(
            "invalid_arguments", "The arguments hold a NUL character or invalid Unicode."
        )
    return value, None


def _kept(text: str, limit: int) -> str:
    """Provider text kept on a record as it came: storable, and bounded."""
    return str(without_nul(text[:limit]))


def _refusal(exc: DomainError) -> dict[str, str]:
    if isinstance(exc, ValidationFailed) and exc.fields:
        detail = "; ".join(
            f"{name.removeprefix('params.')}: {' '.join(messages)}"
            for name, messages in exc.fields.items()
        )
        return _error(exc.code, f"The arguments are not valid: {detail}")
    return _error(exc.code, exc.message)


def run_tool_calls(
    *, user: Any, calls: Sequence[ChatToolCall], stopped: bool = False
) -> list[dict[str, Any]]:
    """Run the calls a turn's model made; one record per call, in order:
    ``{id, tool, model, arguments, task_id, error}`` (``error``: ``{code, message}`` or None).
    ``stopped``: the user pressed Stop on the reply, so nothing it asked for is generated.
    Call inside the transaction that settles the turn."""
    from tasks.services import task_submit  # tasks.services imports chat via notifications

    models = tool_models()
    records = []
    for n, call in enumerate(calls):
        record: dict[str, Any] = {
            "id": _kept(call.id, KEPT_NAME_CHARS),
            "tool": _kept(call.name, KEPT_NAME_CHARS),
            "model": "",
            "arguments": _kept(call.arguments, KEPT_TEXT_CHARS),
            "task_id": None,
            "error": None,
        }
        records.append(record)
        model = models.get(call.name)
        if stopped:
            record["error"] = _error(
                "stopped", "You stopped this reply, so what it asked to generate was not run."
            )
            continue
        if n >= settings.CHAT_MAX_TOOL_CALLS:
            record["error"] = _error(
                "too_many_tool_calls",
                f"At most {settings.CHAT_MAX_TOOL_CALLS} tool calls run per message.",
            )
            continue
        if model is None:
            record["error"] = _error("unknown_tool", f"No tool {call.name!r} is available.")
            continue
        record["model"] = model.slug
        arguments, error = _arguments(call.arguments)
        if arguments is None:
            record["error"] = error
            continue
        record["arguments"] = arguments
        params = dict(arguments)
        prompt = params.pop("prompt", "")
        try:
            with transaction.atomic():  # a refusal writes nothing, and the turn goes on
                outcome = task_submit(
                    user=user, model_slug=model.slug, prompt=prompt, params=params
                )
        except DomainError as exc:
            record["error"] = _refusal(exc)
            continue
        record["task_id"] = str(outcome.task.pk)
        if not outcome.accepted:
            record["error"] = _error(
                outcome.task.error_code or "insufficient_credits", outcome.task.error_message
            )
    return records


def task_ids(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The ids of the tasks a message's tool calls created, in order."""
    return [r["task_id"] for r in records if r.get("task_id")]


def context_note(records: Sequence[Mapping[str, Any]]) -> str:
    """What the model is told, in the next turn's context, about the calls it made."""
    lines = []
    for record in records:
        error = record.get("error")
        if error:
            lines.append(f"- {record['tool']} failed ({error['code']}): {error['message']}")
        else:
            lines.append(f"- {record['tool']} started task {record['task_id']}.")
    return "Tool results:\n" + "\n".join(lines) if lines else ""
