from __future__ import annotations

from django.contrib import admin
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from rivya.exceptions import NOT_FOUND_URL_NAME, json_not_found
from rivya.pages import chat, dashboard, history, notifications, studio
from rivya.pages import views as pages

# The API first, tasks first within it: URLs are resolved in order, and a submit is the request
# served most (docs/submit.md).
api_v1 = [
    path("", include("tasks.api.urls")),
    path("", include("billing.api.urls")),
    path("", include("notifications.api.urls")),
    path("", include("chat.api.urls")),
]

urlpatterns = [
    path("api/v1/", include(api_v1)),
    path("", pages.home, name="home"),
    path("signup/", pages.signup, name="signup"),
    path("login/", pages.LoginView.as_view(), name="login"),
    path("logout/", pages.LogoutView.as_view(), name="logout"),
    path("account/", pages.account, name="account"),
    *studio.urlpatterns,
    *history.urlpatterns,
    *dashboard.urlpatterns,
    *notifications.urlpatterns,
    *chat.urlpatterns,
    path("admin/", admin.site.urls),
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
    re_path(r"^api/", json_not_found, name=NOT_FOUND_URL_NAME),
]
