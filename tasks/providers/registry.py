"""Provider lookup by key. Adapters are built from settings on each call (cheap), so tests can
point them elsewhere with ``settings`` overrides."""

from __future__ import annotations

from django.conf import settings

from tasks.providers.base import Provider, ProviderError


def get_provider(key: str) -> Provider:
    if key == "sandbox":
        from tasks.providers.sandbox import SandboxProvider

        return SandboxProvider(settings.SANDBOX_URL, settings.SANDBOX_WEBHOOK_SECRET)
    if key == "noop":
        from tasks.providers.noop import NoopProvider

        return NoopProvider()  # type: ignore[return-value]
    raise ProviderError(
        f"No provider {key!r} is configured.", retryable=False, code="provider_not_configured"
    )


def known_provider(key: str) -> bool:
    return key in {"sandbox"}
