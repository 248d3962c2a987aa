from __future__ import annotations

from django.urls import path

from tasks.api import single, views

urlpatterns = [
    path("models/", views.ModelListView.as_view(), name="api-models"),
    path("tasks/", views.TaskListCreateView.as_view(), name="api-tasks"),
    path("tasks/<uuid:pk>/", views.TaskDetailView.as_view(), name="api-task-detail"),
    path("tasks/<uuid:pk>/cancel/", views.TaskCancelView.as_view(), name="api-task-cancel"),
    path(
        "tasks/<uuid:pk>/results/<int:n>/", views.TaskResultView.as_view(), name="api-task-result"
    ),
    path("uploads/", views.UploadCreateView.as_view(), name="api-uploads"),
    path("callbacks/<slug:provider>/", views.callback_view, name="api-callback"),
    path("single/<slug:single_type>/", single.single_view, name="api-single"),
]
