"""Support's safe actions on a task, as admin views (issue 15). Being built: the task page
(tasks/admin.py) shows ``action_links(request, task)`` and includes ``action_urls(model_admin)``
in its ``get_urls``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.http import HttpRequest
from django.urls import URLPattern


@dataclass(frozen=True)
class ActionLink:
    label: str  # e.g. "Re-check upstream now"
    url: str  # the action's form (GET shows it; POST with a reason carries it out)
    danger: bool = False


def action_links(request: HttpRequest, task: Any) -> list[ActionLink]:
    """The actions this staff member may take on this task now (none yet)."""
    return []


def action_urls(model_admin: Any) -> list[URLPattern]:
    """The action views, wrapped in ``model_admin.admin_site.admin_view`` (none yet)."""
    return []
