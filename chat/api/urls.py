from __future__ import annotations

from django.urls import path

from chat.api import views

urlpatterns = [
    path("chat/sessions/", views.SessionListCreateView.as_view(), name="api-chat-sessions"),
    path(
        "chat/sessions/<uuid:pk>/",
        views.SessionDetailView.as_view(),
        name="api-chat-session",
    ),
    path(
        "chat/sessions/<uuid:pk>/messages/",
        views.messages_view,
        name="api-chat-messages",
    ),
]
