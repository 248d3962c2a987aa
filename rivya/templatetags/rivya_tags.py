from __future__ import annotations

from django import template

from rivya.money import credits_phrase, format_credits

register = template.Library()


@register.filter
def credits(micro: int | None) -> str:
    """Micro-credits as credits: 12500000 -> "12.5"."""
    return format_credits(int(micro or 0))


@register.filter(name="credits_phrase")
def credits_phrase_filter(micro: int | None) -> str:
    """Micro-credits in words: 1000000 -> "1 credit", 2500000 -> "2.5 credits"."""
    return credits_phrase(int(micro or 0))


@register.filter(name="single_label")
def single_label_filter(task: object) -> str:
    """A single task in a few words ("Translation en→hi"); "" for other tasks."""
    from rivya.pages.common import single_label

    return single_label(task)
