"""The ``noop`` provider: answers a translation with its input, at once, and does nothing else.

It exists for ``bench/single.py``, which measures the single-task dispatcher's own cost (gate,
validation, records, hold, settlement) as the ratio of a real translation's throughput to this
one's. No seeded model uses it; every other call is refused like an unconfigured provider.
"""

from __future__ import annotations

from typing import Any

from tasks.providers.base import ProviderError, TranslationRequest, TranslationResult


class NoopProvider:
    key = "noop"

    async def translate(
        self, request: TranslationRequest, *, timeout_s: float
    ) -> TranslationResult:
        return TranslationResult(text=request.text, characters=len(request.text))

    def __getattr__(self, name: str) -> Any:
        raise ProviderError(
            f"The noop provider does not implement {name}.",
            retryable=False,
            code="provider_not_configured",
        )
