"""The Notifications Center, and the header's live status (credits and unread count)."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import path

from billing import selectors as billing
from notifications import selectors


@login_required
def notifications(request: HttpRequest) -> HttpResponse:
    return render(request, "pages/notifications.html", {})


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
    path("partials/header/", header_status, name="header-status"),
]
