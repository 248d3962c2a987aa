"""The Studio: pick a model, fill its form, submit, watch the task run."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import path


@login_required
def studio(request: HttpRequest) -> HttpResponse:
    return render(request, "pages/studio.html", {})


urlpatterns = [
    path("studio/", studio, name="studio"),
]
