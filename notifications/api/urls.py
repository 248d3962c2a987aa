from __future__ import annotations

from django.urls import path

from notifications.api import views, webhook_views

urlpatterns = [
    path("webhooks/secret/", webhook_views.WebhookSecretView.as_view(), name="api-webhook-secret"),
    path(
        "webhooks/secret/rotate/",
        webhook_views.WebhookSecretRotateView.as_view(),
        name="api-webhook-secret-rotate",
    ),
    path(
        "webhooks/endpoints/",
        webhook_views.EndpointListCreateView.as_view(),
        name="api-webhook-endpoints",
    ),
    path(
        "webhooks/endpoints/<uuid:pk>/",
        webhook_views.EndpointDetailView.as_view(),
        name="api-webhook-endpoint",
    ),
    path(
        "webhooks/endpoints/<uuid:pk>/rotate-secret/",
        webhook_views.EndpointRotateSecretView.as_view(),
        name="api-webhook-endpoint-rotate",
    ),
    path(
        "webhooks/messages/", webhook_views.MessageListView.as_view(), name="api-webhook-messages"
    ),
    path(
        "webhooks/messages/<uuid:pk>/",
        webhook_views.MessageDetailView.as_view(),
        name="api-webhook-message",
    ),
    path(
        "webhooks/messages/<uuid:pk>/resend/",
        webhook_views.MessageResendView.as_view(),
        name="api-webhook-message-resend",
    ),
    path("notifications/", views.NotificationListView.as_view(), name="api-notifications"),
    path(
        "notifications/read-all/",
        views.NotificationReadAllView.as_view(),
        name="api-notifications-read-all",
    ),
    path(
        "notifications/unread-count/",
        views.UnreadCountView.as_view(),
        name="api-notifications-unread-count",
    ),
    path(
        "notifications/<uuid:pk>/read/",
        views.NotificationReadView.as_view(),
        name="api-notification-read",
    ),
]
