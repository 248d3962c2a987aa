"""The Notifications Center, and the header's live status (credits and unread count)."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import path
from django.utils import timezone
from django.views.decorators.http import require_POST

from billing import selectors as billing
from notifications import selectors, services
from rivya.pages.common import is_htmx, mark_changed
from rivya.pages.dashboard import JUST_NOW

# The Center shows every unread notification first, then the newest read ones: this many in all.
CENTER_LIMIT = 100


def _center_context(request: HttpRequest) -> dict[str, object]:
    items, more = selectors.notifications_center(user=request.user, limit=CENTER_LIMIT)
    unread = sum(1 for n in items if n.read_at is None)
    if more and unread == len(items):  # more unread than shown: count them all
        unread = selectors.unread_count(user=request.user)
    return {
        "items": items,
        "more": more,
        "unread": unread,
        "limit": CENTER_LIMIT,
        # The header's bell shows the same count: one read, not two.
        "header_unread": unread,
        "just_now": timezone.now() - JUST_NOW,
    }


@login_required
def notifications(request: HttpRequest) -> HttpResponse:
    return render(request, "pages/notifications.html", _center_context(request))


@login_required
@require_POST
def notification_read(request: HttpRequest, notification_id: str) -> HttpResponse:
    """Mark one notification read. htmx gets the item back (swapped in place) with the unread
    count; a plain form post goes back to the Center. Another user's notification is a 404."""
    note = selectors.notification_get_for_user(user=request.user, notification_id=notification_id)
    if note is None:
        raise Http404("No such notification.")
    services.notification_mark_read(user=request.user, notification_id=note.pk)
    if not is_htmx(request):
        return redirect("notifications")
    note = selectors.notification_get_for_user(user=request.user, notification_id=note.pk)
    response = render(
        request,
        "pages/notifications/_read.html",
        {
            "n": note,
            "unread": selectors.unread_count(user=request.user),
            "just_now": timezone.now() - JUST_NOW,
        },
    )
    mark_changed(response)
    return response


@login_required
@require_POST
def notifications_read_all(request: HttpRequest) -> HttpResponse:
    """Mark all of the user's notifications read; htmx gets the refreshed Center body."""
    services.notification_mark_all_read(user=request.user)
    if not is_htmx(request):
        return redirect("notifications")
    context = _center_context(request)
    context["status_message"] = "All notifications are marked as read."
    response = render(request, "pages/notifications/_center.html", context)
    mark_changed(response)
    return response


@login_required
def header_status(request: HttpRequest) -> HttpResponse:
    """The header's credits and unread count, polled by htmx (and refreshed at once when a page
    fires ``rivya:changed``)."""
    return render(
        request,
        "pages/_header_status.html",
        {
            "credits": billing.balance_for_user(user=request.user),
            "unread": selectors.unread_count(user=request.user),
        },
    )


urlpatterns = [
    path("notifications/", notifications, name="notifications"),
    path("notifications/read-all/", notifications_read_all, name="notifications-read-all"),
    path(
        "notifications/<uuid:notification_id>/read/",
        notification_read,
        name="notification-read",
    ),
    path("partials/header/", header_status, name="header-status"),
]
