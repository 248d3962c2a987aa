"""What the page modules share: htmx requests, the "something changed" signal for the header,
and how a failure's kind is said to the user."""

from __future__ import annotations

import json

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
    tokens", "Free"."""
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
    return f"{amount} per run"
