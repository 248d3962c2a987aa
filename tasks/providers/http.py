"""The one HTTP seam for every provider adapter.

Adapters never build their own clients: they call ``request()`` / ``stream()`` here, which turn
transport failures into ``ProviderError(retryable=True)``, and ``raise_for_status()``, which maps
an HTTP status to a ``ProviderError`` saying whether a retry may help.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from tasks.providers.base import ProviderError

TIMEOUT = httpx.Timeout(30.0, connect=5.0)
RETRYABLE_STATUSES = frozenset({408, 425, 429})

_lock = threading.Lock()
_client: httpx.Client | None = None
_client_pid: int | None = None


def get_client() -> httpx.Client:
    """The process-wide client (connection pooling). Thread-safe.

    Re-created after a fork: a Celery prefork child must not share the parent's sockets.
    ``trust_env=False``: upstream calls never go through proxies picked up from the environment.
    """
    global _client, _client_pid
    pid = os.getpid()
    with _lock:
        if _client is None or _client_pid != pid:
            _client = httpx.Client(timeout=TIMEOUT, trust_env=False, follow_redirects=False)
            _client_pid = pid
        return _client


def close_client() -> None:
    global _client, _client_pid
    with _lock:
        if _client is not None and _client_pid == os.getpid():
            _client.close()
        _client, _client_pid = None, None


# The request never left: nothing can have been created upstream.
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)


def _transport_error(method: str, url: str, exc: httpx.HTTPError) -> ProviderError:
    # Anything after the connection was made (write/read errors and timeouts, a protocol
    # error in the answer) leaves it open whether the provider acted on the request.
    maybe_received = not isinstance(exc, NOT_SENT)
    if isinstance(exc, httpx.TransportError):  # connect/read/write errors and timeouts
        return ProviderError(
            f"{method} {url}: {type(exc).__name__}: {exc}",
            retryable=True,
            code="upstream_unreachable",
            maybe_received=maybe_received,
        )
    return ProviderError(
        f"{method} {url}: {type(exc).__name__}: {exc}",
        retryable=True,
        code="upstream_protocol_error",
        maybe_received=maybe_received,
    )


def request(method: str, url: str, **kwargs: Any) -> httpx.Response:
    """Send one request; the whole body is read. Raises ``ProviderError`` (retryable) when the
    upstream cannot be reached or does not answer in time. Does not look at the status."""
    try:
        return get_client().request(method, url, **kwargs)
    except httpx.HTTPError as exc:
        raise _transport_error(method, url, exc) from exc


@contextmanager
def stream(method: str, url: str, **kwargs: Any) -> Iterator[httpx.Response]:
    """Like ``request()`` but the body is read by the caller (``iter_bytes()``) inside the
    ``with`` block; transport errors while reading are mapped too."""
    try:
        with get_client().stream(method, url, **kwargs) as response:
            yield response
    except httpx.HTTPError as exc:
        raise _transport_error(method, url, exc) from exc


def is_retryable_status(status: int) -> bool:
    return status in RETRYABLE_STATUSES or status >= 500


def error_for_status(status: int, message: str, *, code: str | None = None) -> ProviderError:
    """408/425/429 and 5xx may succeed later; any other 4xx will not."""
    retryable = is_retryable_status(status)
    if code is None:
        if status == 429:
            code = "rate_limited"
        elif retryable:
            code = "upstream_unavailable"
        else:
            code = "upstream_refused"
    return ProviderError(message, retryable=retryable, code=code, status=status)


def raise_for_status(
    response: httpx.Response, *, code: str | None = None, message: str | None = None
) -> None:
    """Raise the ``ProviderError`` for a non-2xx answer (``code``/``message`` from the vendor's
    error body when the adapter parsed them). 3xx counts as an error: we never follow
    redirects to wherever an upstream points."""
    if 200 <= response.status_code < 300:
        return
    if message is None:
        try:
            snippet = response.text[:300]
        except httpx.ResponseNotRead:
            snippet = ""
        message = f"HTTP {response.status_code} from {response.request.url}: {snippet}".strip()
    raise error_for_status(response.status_code, message, code=code)
