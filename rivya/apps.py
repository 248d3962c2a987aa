from __future__ import annotations

from django.apps import AppConfig


class RivyaConfig(AppConfig):
    name = "rivya"
    verbose_name = "Rivya"
