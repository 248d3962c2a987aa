"""What the page modules share: htmx requests, the "something changed" signal for the header,
and how a failure's kind is said to the user."""

from __future__ import annotations

import json
from typing import Any

from django.http import HttpRequest, HttpResponse

from chat.services import chat_limits
from rivya.money import credits_phrase, format_credits
from tasks.models import AIModel, Category

# The header (credits and the bell) refreshes itself when a response triggers this event.
HX_CHANGED = "rivya:changed"

# Whose side a failure was on, by the error's kind (``user``, ``provider``, ``infra``), in the
# user's words. Templates capitalise it where it starts a line.
FAULT = {
    "user": "a problem with the request",
    "provider": "the provider failed",
    "infra": "a problem on our side",
}


def fault(kind: str) -> str:
    return FAULT.get(kind, "")


def is_htmx(request: HttpRequest) -> bool:
    """A request htmx made to swap part of a page (not a history restore, which wants the whole
    page)."""
    return request.headers.get("HX-Request") == "true" and not request.headers.get(
        "HX-History-Restore-Request"
    )


def mark_changed(response: HttpResponse, message: str = "") -> HttpResponse:
    """Tell the page that credits, notifications or tasks changed: its header refreshes."""
    response["HX-Trigger"] = json.dumps({HX_CHANGED: message or True})
    return response


# What one unit of a per-output price buys, per category.
OUTPUT_NOUN = {Category.IMAGE: "image", Category.VIDEO: "video", Category.AUDIO: "clip"}
# A per-token price is a few millionths of a credit: quoted per million tokens, as is usual.
TOKENS_QUOTED = 1_000_000


def price_label(model: AIModel) -> str:
    """A catalog model's price in words, the same on every page: "1 credit per image",
    "0.5 credits per second", "10 credits per million input tokens, 30 per million output
    tokens", "0.00002 credits per character", "Free"."""
    kind = model.billing_type
    if kind == AIModel.BillingType.PER_TOKEN:
        limits = chat_limits(model)
        given = limits.input_price_micro * TOKENS_QUOTED
        made = limits.output_price_micro * TOKENS_QUOTED
        if not given and not made:
            return "Free"
        if given == made:
            return f"{credits_phrase(made)} per million tokens"
        return (
            f"{credits_phrase(given)} per million input tokens, "
            f"{format_credits(made)} per million output tokens"
        )
    if not model.price_micro:
        return "Free"
    amount = credits_phrase(model.price_micro)
    if kind == AIModel.BillingType.PER_OUTPUT:
        return f"{amount} per {OUTPUT_NOUN.get(model.category, 'output')}"
    if kind == AIModel.BillingType.PER_OUTPUT_SECOND:
        return f"{amount} per second"
    if kind == AIModel.BillingType.PER_CHARACTER:
        return f"{amount} per character"
    return f"{amount} per run"


# --- single (synchronous) tasks ----------------------------------------------------------------

LANGUAGE_NAMES = {"en": "English", "hi": "Hindi", "es": "Spanish", "fr": "French", "de": "German"}


def single_label(task: Any) -> str:
    """A single task in a few words, from its own fields (never its stored result, so a list
    can show it per row): "Translation en→hi", "Speech, voice aria", "Transcription (hi)";
    "" for other tasks."""
    kind = getattr(task, "single_type", "") or ""
    params = task.params if isinstance(task.params, dict) else {}
    if kind == "translation":
        source, target = params.get("source_language"), params.get("target_language")
        return f"Translation {source}→{target}" if source and target else "Translation"
    if kind == "completion":
        return "Completion"
    if kind == "text_to_speech":
        voice = params.get("voice")
        return f"Speech, voice {voice}" if voice else "Speech"
    if kind == "transcription":
        language = params.get("language")
        return f"Transcription ({language})" if language else "Transcription"
    return ""


def clock(ms: Any) -> str:
    """Milliseconds as a timestamp a person reads: 1530 → "0:01.53"."""
    try:
        ms = max(0, int(ms))
    except (TypeError, ValueError):
        return ""
    minutes, rest = divmod(ms, 60_000)
    return f"{minutes}:{rest / 1000:05.2f}"


def single_shown(task: Any, result: dict[str, Any] | None) -> dict[str, Any] | None:
    """A single task's stored result (``tasks.single.services.single_result``) as the pages
    show it: its text, facts in words, and the word timings as rows. None without a result."""
    if not result or not isinstance(result, dict):
        return None
    kind = getattr(task, "single_type", "") or ""
    facts: list[str] = []
    language = ""
    if kind == "translation":
        source, target = result.get("source_language"), result.get("target_language")
        language = str(target or "")
        if source and target:
            facts.append(
                f"{LANGUAGE_NAMES.get(source, source)} → {LANGUAGE_NAMES.get(target, target)}"
            )
        if result.get("characters") is not None:
            facts.append(f"{result['characters']:,} characters")
    elif kind == "completion":
        usage = result.get("usage") if isinstance(result.get("usage"), dict) else {}
        if usage:
            facts.append(
                f"{usage.get('input_tokens', 0):,} tokens in, {usage.get('output_tokens', 0):,} out"
            )
        if result.get("finish_reason") == "length":
            facts.append("cut at max_tokens")
    elif kind == "transcription":
        language = str(result.get("language") or "")
        if language:
            facts.append(LANGUAGE_NAMES.get(language, language))
        if result.get("duration_ms") is not None:
            facts.append(f"{result['duration_ms'] / 1000:g} s of audio")
    elif kind == "text_to_speech":
        if result.get("voice"):
            facts.append(f"voice {result['voice']}")
        if result.get("duration_ms"):
            facts.append(f"{result['duration_ms'] / 1000:g} s")
        if result.get("characters") is not None:
            facts.append(f"{result['characters']:,} characters")
    words = [
        {
            "text": str(w.get("text", "")),
            "start": clock(w.get("start_ms")),
            "end": clock(w.get("end_ms")),
            "start_ms": w.get("start_ms"),
            "end_ms": w.get("end_ms"),
            "confidence": f"{float(w['confidence']):.2f}"
            if isinstance(w.get("confidence"), int | float)
            else "",
        }
        for w in result.get("words") or []
        if isinstance(w, dict)
    ]
    return {
        "kind": kind,
        "speech": kind == "text_to_speech",
        "text": result.get("text") if isinstance(result.get("text"), str) else None,
        "language": language,
        "facts": facts,
        "words": words,
    }
