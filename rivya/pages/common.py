"""What the page modules share: htmx requests, the "something changed" signal for the header,
and how a failure's kind is said to the user."""

from __future__ import annotations

import json

from django.http import HttpRequest, HttpResponse

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
