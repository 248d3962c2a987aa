"""The sandbox's chat completions: what a request asks for and what the reply is (docs/sandbox.md).

Pure functions and data, no I/O: ``server.py`` streams the plan. Everything is deterministic:
the reply's words come from a hash of the last user message, and the token counts follow the
formulas below, so tests can predict every byte and every count.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")
OUTCOMES = ("success", "fail", "reject", "drop")
USAGE_MODES = ("exact", "over", "omit")

MAX_LATENCY_MS = 600_000
DEFAULT_TOKEN_DELAY_MS = 2
MAX_TOKEN_DELAY_MS = 5_000
DEFAULT_REPLY_TOKENS = 120
MAX_REPLY_TOKENS = 8_192
MAX_MESSAGES = 10_000

# The reply's vocabulary: each token is one of these words, with a leading space after the first.
WORDS = (
    "the", "sandbox", "answers", "with", "a", "steady", "stream", "of", "plain", "words",
    "that", "mean", "nothing", "in", "particular", "but", "arrive", "one", "by", "and",
    "always", "same", "order", "for", "question", "river", "stone", "light", "quiet", "model",
    "token", "every", "count", "is", "exact", "so", "tests", "can", "predict", "it",
    "blue", "green", "morning", "evening", "paper", "window", "garden", "letter", "signal", "echo",
    "north", "south", "slow", "fast", "small", "large", "bright", "simple", "careful", "patient",
    "credit", "ledger", "reply", "upstream",
)  # fmt: skip

MAX_TOOL_CALLS = 8

REJECT_MESSAGE = "The sandbox refused the conversation (sandbox_outcome=reject)."
FAIL_MESSAGE = "The sandbox failed mid-reply (sandbox_outcome=fail)."


class InvalidChat(ValueError):
    """The request body is not a valid chat request: a 400 ``invalid_request``."""


@dataclass(frozen=True)
class ChatPlan:
    """One chat request, validated: what to stream, when, and how it ends."""

    model: str
    stream: bool
    tokens: tuple[str, ...]  # the reply as streamed (already cut by max_tokens)
    finish_reason: str  # "stop" | "length": what a complete reply ends with
    prompt_tokens: int
    latency_s: float  # before the first token
    token_delay_s: float  # between tokens
    outcome: str
    fail_after: int  # tokens streamed before a fail/drop (at most len(tokens))
    usage_mode: str
    # (tool name, its arguments as a JSON text), as OpenAI sends them: what the
    # ``sandbox_tool_call`` knob asks the model to call, each among the request's ``tools``.
    tool_calls: tuple[tuple[str, str], ...] = ()

    @property
    def streamed_count(self) -> int:
        """How many tokens go out before the end (the failure point for fail/drop)."""
        return self.fail_after if self.outcome in ("fail", "drop") else len(self.tokens)

    def usage(self, streamed: int) -> dict[str, int] | None:
        """The usage reported after ``streamed`` tokens, per ``sandbox_usage``."""
        if self.usage_mode == "omit":
            return None
        if self.usage_mode == "over":
            return {
                "prompt_tokens": 2 * self.prompt_tokens,
                "completion_tokens": 3 * streamed + 100,
            }
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": streamed}


def message_tokens(content: str) -> int:
    """One message's share of the input count: 4 + ceil(UTF-8 bytes / 4)."""
    return 4 + (len(content.encode("utf-8")) + 3) // 4


def prompt_tokens(contents: Sequence[str]) -> int:
    """The input token count: 3 + the sum of ``message_tokens`` over the messages."""
    return 3 + sum(message_tokens(content) for content in contents)


def reply_tokens(seed_text: str, count: int) -> list[str]:
    """The deterministic reply: word ``i`` is ``WORDS[sha256(sha256(seed) + i) % len]`` (the
    first 8 bytes, big-endian, ``i`` as 4 bytes big-endian); every token but the first has a
    leading space."""
    seed = hashlib.sha256(seed_text.encode("utf-8")).digest()
    tokens = []
    for i in range(count):
        digest = hashlib.sha256(seed + i.to_bytes(4, "big")).digest()
        word = WORDS[int.from_bytes(digest[:8], "big") % len(WORDS)]
        tokens.append(word if i == 0 else " " + word)
    return tokens


def _integer(params: Mapping[str, Any], name: str, low: int, high: int, default: int) -> int:
    value = params.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidChat(f"{name} must be a number.")
    if isinstance(value, float) and not value.is_integer():  # 2.5, NaN, inf
        raise InvalidChat(f"{name} must be a whole number.")
    if not low <= value <= high:
        raise InvalidChat(f"{name} must be between {low} and {high}.")
    return int(value)


def _choice(params: Mapping[str, Any], name: str, values: tuple[str, ...]) -> str:
    value = params.get(name, values[0])
    if value not in values:
        raise InvalidChat(f"{name} must be one of {', '.join(values)}.")
    return str(value)


def _offered_tools(body: Mapping[str, Any]) -> set[str]:
    """The names of the request's ``tools`` (OpenAI's shape: ``{"type": "function",
    "function": {"name", "description", "parameters"}}``)."""
    tools = body.get("tools")
    if tools is None:
        return set()
    if not isinstance(tools, list):
        raise InvalidChat("tools must be a list.")
    names = set()
    for n, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if (
            not isinstance(function, dict)
            or tool.get("type") != "function"  # type: ignore[union-attr]
            or not isinstance(name, str)
        ):
            raise InvalidChat(f"tools[{n}] must be {{type: function, function: {{name, ...}}}}.")
        if not isinstance(function.get("parameters", {}), dict):
            raise InvalidChat(f"tools[{n}].function.parameters must be an object.")
        names.add(name)
    return names


def _tool_calls(params: Mapping[str, Any], offered: set[str]) -> tuple[tuple[str, str], ...]:
    """``sandbox_tool_call``: one ``{"tool", "arguments"}`` or a list of them, each naming a
    tool the request offered; the arguments are passed through as the model would write them
    (a JSON text; a string is sent as it is, so a client can send malformed arguments)."""
    wanted = params.get("sandbox_tool_call")
    if wanted is None:
        return ()
    calls = wanted if isinstance(wanted, list) else [wanted]
    if len(calls) > MAX_TOOL_CALLS:
        raise InvalidChat(f"sandbox_tool_call: at most {MAX_TOOL_CALLS} calls.")
    out = []
    for call in calls:
        if not isinstance(call, dict) or not isinstance(call.get("tool"), str):
            raise InvalidChat("sandbox_tool_call must be {tool, arguments} or a list of them.")
        if call["tool"] not in offered:
            raise InvalidChat(
                f"sandbox_tool_call names {call['tool']!r}, a tool the request did not offer."
            )
        arguments = call.get("arguments", {})
        text = arguments if isinstance(arguments, str) else json.dumps(arguments)
        out.append((call["tool"], text))
    return tuple(out)


def parse(body: Any) -> ChatPlan:
    """Validate a ``POST /v1/chat/completions`` body. Raises ``InvalidChat``.

    Unknown params (e.g. the job knobs ``sandbox_callback``, ``sandbox_status``) are ignored, so
    one parameter schema can serve both kinds of model."""
    if not isinstance(body, dict):
        raise InvalidChat("The body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidChat("model is required.")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidChat("messages must be a non-empty list.")
    if len(messages) > MAX_MESSAGES:
        raise InvalidChat(f"At most {MAX_MESSAGES} messages.")
    contents: list[str] = []
    last_user = ""
    for n, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidChat(f"messages[{n}] must be an object.")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise InvalidChat(f"messages[{n}].role must be one of {', '.join(ROLES)}.")
        if not isinstance(content, str):
            raise InvalidChat(f"messages[{n}].content must be a string.")
        try:
            content.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate ("\\ud800") survives JSON decoding
            raise InvalidChat(f"messages[{n}].content is not valid Unicode.") from None
        contents.append(content)
        if role == "user":
            last_user = content
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise InvalidChat("max_tokens must be an integer of at least 1.")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidChat("stream must be true or false.")
    params = body.get("params")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise InvalidChat("params must be an object.")

    latency_ms = _integer(params, "sandbox_latency_ms", 0, MAX_LATENCY_MS, 0)
    delay_ms = _integer(
        params, "sandbox_token_delay_ms", 0, MAX_TOKEN_DELAY_MS, DEFAULT_TOKEN_DELAY_MS
    )
    wanted = _integer(params, "sandbox_reply_tokens", 0, MAX_REPLY_TOKENS, DEFAULT_REPLY_TOKENS)
    outcome = _choice(params, "sandbox_outcome", OUTCOMES)
    usage_mode = _choice(params, "sandbox_usage", USAGE_MODES)
    length = min(wanted, max_tokens)
    fail_after = _integer(params, "sandbox_fail_after_tokens", 0, MAX_REPLY_TOKENS, length // 2)
    tool_calls = _tool_calls(params, _offered_tools(body))
    finish_reason = "length" if max_tokens < wanted else "stop"
    return ChatPlan(
        model=model,
        stream=stream,
        tokens=tuple(reply_tokens(last_user, length)),
        finish_reason="tool_calls" if tool_calls else finish_reason,
        prompt_tokens=prompt_tokens(contents),
        latency_s=latency_ms / 1000,
        token_delay_s=delay_ms / 1000,
        outcome=outcome,
        fail_after=min(fail_after, length),
        usage_mode=usage_mode,
        tool_calls=tool_calls,
    )
