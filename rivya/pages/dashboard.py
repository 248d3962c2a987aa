"""The Dashboard: credits, recent generations and ledger, spend per day."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import path


@login_required
def dashboard(request: HttpRequest) -> HttpResponse:
    return render(request, "pages/dashboard.html", {})


urlpatterns = [
    path("dashboard/", dashboard, name="dashboard"),
]
