from __future__ import annotations

from django import template

from rivya.money import format_credits

register = template.Library()


@register.filter
def credits(micro: int | None) -> str:
    """Micro-credits as credits: 12500000 -> "12.5"."""
    return format_credits(int(micro or 0))
