"""History: the user's tasks, and one task's page (where notifications link)."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import path


@login_required
def history(request: HttpRequest) -> HttpResponse:
    return render(request, "pages/history.html", {})


urlpatterns = [
    path("history/", history, name="history"),
]
