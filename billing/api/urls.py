from __future__ import annotations

from django.urls import path

from billing.api import views

urlpatterns = [
    path("credits/", views.CreditsView.as_view(), name="api-credits"),
    path("credits/ledger/", views.LedgerView.as_view(), name="api-credits-ledger"),
]
