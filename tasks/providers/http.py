"""The one HTTP seam for every provider adapter.

Adapters never build their own clients: they call ``request()`` / ``stream()`` (or, on an event
loop, ``arequest()`` for one bounded request and ``astream()`` with ``aiter_sse()`` for streamed
replies) here, which turn transport failures into ``ProviderError(retryable=True)``, and
``raise_for_status()``, which maps an HTTP status to a ``ProviderError`` saying whether a retry
may help.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import threading
import weakref
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx

from tasks.providers.base import ProviderError

TIMEOUT = httpx.Timeout(30.0, connect=5.0)
STREAM_READ_TIMEOUT_S = 60.0  # astream(): the longest wait for the next bytes (between tokens)
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


_ssl_context: ssl.SSLContext | None = None


def _shared_ssl_context() -> ssl.SSLContext:
    """One TLS context for every short-lived async client: building one (loading the CA bundle)
    costs milliseconds, which hundreds of concurrent streams would pay each."""
    global _ssl_context
    with _lock:
        if _ssl_context is None:
            _ssl_context = httpx.create_ssl_context()
        return _ssl_context


# ---- one request on an event loop: arequest() ------------------------------------------------

# An AsyncClient's pooled connections belong to the loop that opened them, so each loop has its
# own client (an ASGI server's loop, a Celery worker's asyncio.run, a test's). Keyed weakly: a
# loop that is garbage-collected takes its entry with it.
_aclients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[int, httpx.AsyncClient]] = (
    weakref.WeakKeyDictionary()
)
# Concurrency is bounded in front of us (the single tasks' gate), not by the pool: a pool wait
# would spend the caller's deadline without saying so.
ASYNC_LIMITS = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
CONNECT_TIMEOUT_S = 5.0


def _loop_client() -> httpx.AsyncClient:
    """The running loop's pooled client, created on first use. Clients of loops that have
    closed are dropped (never reused: their connections belong to a dead loop; and since open
    connections refer to their loop, the weak key alone would not free them); so is one
    inherited across a fork."""
    loop = asyncio.get_running_loop()
    pid = os.getpid()
    verify = _shared_ssl_context()  # takes _lock itself
    with _lock:
        for dead in [other for other in _aclients if other.is_closed()]:
            del _aclients[dead]
        entry = _aclients.get(loop)
        if entry is None or entry[0] != pid or entry[1].is_closed:
            client = httpx.AsyncClient(
                timeout=TIMEOUT,
                trust_env=False,
                follow_redirects=False,
                verify=verify,
                limits=ASYNC_LIMITS,
            )
            entry = (pid, client)
            _aclients[loop] = entry
        return entry[1]


async def aclose_clients() -> None:
    """Close the running loop's pooled client, if it has one. Call it before a loop ends (a
    worker's ``asyncio.run``): its connections are then closed cleanly instead of being left to
    the garbage collector of a closed loop. The next ``arequest()`` on this loop opens a new
    client."""
    loop = asyncio.get_running_loop()
    with _lock:
        entry = _aclients.pop(loop, None)
    if entry is not None and entry[0] == os.getpid():
        await entry[1].aclose()


async def arequest(method: str, url: str, *, timeout_s: float, **kwargs: Any) -> httpx.Response:
    """Send one request from an event loop and read the whole answer, all within ``timeout_s``
    (an overall deadline, not a per-read one: a trickling answer cannot stretch it). Does not
    look at the status.

    Raises ``ProviderError``: ``upstream_timeout`` (not retryable: the caller's time is spent;
    ``maybe_received``: the upstream may be working on it) when the deadline passes, and the
    same retryable errors as ``request()`` for transport failures. Cancelling the caller closes
    the connection, which tells the upstream we left."""
    client = _loop_client()
    # httpx's own timeouts lie past the deadline, so the deadline decides; connecting keeps its
    # shorter limit (a refused or unroutable upstream is "unreachable", not "slow").
    timeout = httpx.Timeout(timeout_s + 1.0, connect=min(CONNECT_TIMEOUT_S, timeout_s + 1.0))
    try:
        async with asyncio.timeout(timeout_s):
            return await client.request(method, url, timeout=timeout, **kwargs)
    except TimeoutError as exc:
        raise ProviderError(
            f"{method} {url}: no answer within {timeout_s:g} s",
            retryable=False,
            code="upstream_timeout",
            maybe_received=True,
        ) from exc
    except httpx.HTTPError as exc:
        raise _transport_error(method, url, exc) from exc


@asynccontextmanager
async def astream(
    method: str, url: str, *, read_timeout_s: float = STREAM_READ_TIMEOUT_S, **kwargs: Any
) -> AsyncIterator[httpx.Response]:
    """``stream()`` for async callers: the answer's body is read by the caller inside the
    ``async with`` block (``aiter_sse()``, ``aiter_bytes()``, ``aread()``). Transport errors,
    including those while reading and a wait longer than ``read_timeout_s`` for the next bytes,
    become ``ProviderError(retryable=True)``.

    Each call has its own short-lived client: callers run on different event loops (an ASGI
    server's, a worker thread's), and an async client's connections belong to one loop. Leaving
    the block, normally or not, closes the connection (how a stream is abandoned early)."""
    timeout = httpx.Timeout(connect=5.0, read=read_timeout_s, write=30.0, pool=5.0)
    try:
        async with (
            httpx.AsyncClient(
                timeout=timeout,
                trust_env=False,
                follow_redirects=False,
                verify=_shared_ssl_context(),
            ) as client,
            client.stream(method, url, **kwargs) as response,
        ):
            yield response
    except httpx.HTTPError as exc:
        raise _transport_error(method, url, exc) from exc


async def aiter_sse(response: httpx.Response) -> AsyncIterator[str]:
    """The ``data`` of each server-sent event in ``response`` (multi-line data joined with
    ``\\n``), as each event completes. Comments, other fields and events without data are
    skipped; an event cut off by the end of the body is not yielded."""
    data: list[str] = []
    async for line in response.aiter_lines():
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        field, _, value = line.partition(":")
        if field == "data":
            data.append(value[1:] if value.startswith(" ") else value)


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
