from __future__ import annotations

from django.apps import AppConfig


class RivyaConfig(AppConfig):
    name = "rivya"
    verbose_name = "Rivya"

    def ready(self) -> None:
        from rivya import schema  # noqa: F401  (registers the API key scheme for OpenAPI)
