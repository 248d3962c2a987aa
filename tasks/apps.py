from __future__ import annotations

from django.apps import AppConfig


class TasksConfig(AppConfig):
    name = "tasks"
    verbose_name = "Generation tasks"

    def ready(self) -> None:
        from tasks import invariants  # noqa: F401  (registers invariant 4 with ledger_check)
