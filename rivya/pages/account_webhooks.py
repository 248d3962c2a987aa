"""The webhooks part of the account page: the default signing secret, endpoints (create,
enable/disable, rotate the secret, delete) and recent deliveries (resend). Each action calls
``notifications.webhooks`` as the API does; this module only reads the form and says what
happened."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib import messages
from django.http import HttpRequest

from notifications import selectors, webhooks
from rivya.errors import DomainError

ACTIONS = frozenset(
    {
        "create_endpoint",
        "toggle_endpoint",
        "rotate_endpoint",
        "delete_endpoint",
        "rotate_account_secret",
        "resend_message",
    }
)
RECENT_MESSAGES = 20


def overlap() -> str:
    hours = settings.WEBHOOK_SECRET_OVERLAP.total_seconds() / 3600
    return f"{hours:g} hour{'s' if hours != 1 else ''}"


SHOWN_ONCE = "webhook_secret_shown_once"  # the session key of a new secret, until shown


def handle(request: HttpRequest, action: str) -> None:
    """Carry out ``action`` for the logged-in user. A new secret is kept in the session until
    the next page shows it (``context``), so the answer can be a redirect: reloading the page
    does not add the endpoint again. Refusals become error messages."""
    shown = _carry_out(request, action)
    if shown:
        request.session[SHOWN_ONCE] = shown


def _carry_out(request: HttpRequest, action: str) -> dict[str, str]:
    user = request.user
    data = request.POST
    try:
        if action == "create_endpoint":
            endpoint = webhooks.endpoint_create(
                user=user,
                url=data.get("url", ""),
                description=data.get("description", ""),
                event_types=data.getlist("event_types"),
            )
            messages.success(request, "The endpoint was added.")
            return {"new_secret": endpoint.secret, "new_secret_for": endpoint.url}
        if action == "rotate_account_secret":
            webhooks.secret_rotate(webhooks.account_secret(user=user))
            messages.success(
                request,
                f"A new signing secret; the previous one also signs for {overlap()}.",
            )
            return {}
        if action == "resend_message":
            message = selectors.webhook_message_get_for_user(
                user=user, message_id=data.get("message", "")
            )
            if message is None:
                messages.error(request, "No such delivery.")
                return {}
            webhooks.webhook_resend(message=message)
            messages.success(request, f"{message.event_type} will be sent again now.")
            return {}
        endpoint = webhooks.endpoint_for_user(user=user, endpoint_id=data.get("endpoint", ""))
        if action == "toggle_endpoint":
            webhooks.endpoint_update(endpoint=endpoint, changes={"enabled": not endpoint.enabled})
            messages.success(
                request, f"{endpoint.url} is {'enabled' if endpoint.enabled else 'disabled'}."
            )
        elif action == "rotate_endpoint":
            rotated = webhooks.secret_rotate(endpoint)
            messages.success(request, f"A new secret; the previous one also signs for {overlap()}.")
            return {"new_secret": rotated.secret, "new_secret_for": endpoint.url}
        elif action == "delete_endpoint":
            webhooks.endpoint_delete(endpoint=endpoint)
            messages.success(request, f"{endpoint.url} was removed.")
    except DomainError as exc:
        fields = exc.extra.get("fields") if isinstance(exc.extra, dict) else None
        detail = "; ".join(m for ms in (fields or {}).values() for m in ms)
        messages.error(request, detail or exc.message)
    return {}


def context(request: HttpRequest) -> dict[str, Any]:
    user = request.user
    return {
        **request.session.pop(SHOWN_ONCE, {}),
        "webhook_secret": webhooks.account_secret(user=user),
        "webhook_endpoints": selectors.webhook_endpoints_for_user(user=user),
        "webhook_messages": selectors.webhook_messages_for_user(user=user).select_related(
            "endpoint"
        )[:RECENT_MESSAGES],
        "webhook_event_types": webhooks.EVENT_TYPES,
    }
