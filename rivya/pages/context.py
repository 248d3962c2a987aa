"""What every page's header shows: the signed-in user's available credits and unread count."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest
from django.utils.functional import SimpleLazyObject

from billing import selectors as billing
from notifications import selectors as notifications


def header(request: HttpRequest) -> dict[str, Any]:
    """Lazily: a page that never renders the header (an API answer, a redirect) pays nothing;
    one that does pays one query each."""
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {}
    return {
        "header_credits": SimpleLazyObject(lambda: billing.balance_for_user(user=user)),
        "header_unread": SimpleLazyObject(lambda: notifications.unread_count(user=user)),
    }
