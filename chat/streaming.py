"""Running a chat turn against its provider, and serving it as server-sent events or JSON.

A turn's reply is read from the provider by a background asyncio task (``Turn``), not by the
response: when the client closes the connection (or presses Stop, which closes it), Django
cancels the response, and the turn goes on reading the upstream to its end (bounded by
``max_tokens`` and ``CHAT_TURN_MAX_SECONDS``), stores what it read and settles. No database
connection is held while tokens arrive: the two database steps run in a worker thread that
closes its connection when done (``docs/chat.md``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection

from chat import services
from chat.models import ChatMessage
from tasks.models import Task
from tasks.providers.base import ChatDelta, ChatEnd, ChatToolCall, ChatUsage, ProviderError
from tasks.providers.registry import get_provider

log = logging.getLogger(__name__)

# Turns whose response went away keep running: a strong reference until they settle.
RUNNING: set[asyncio.Task[ChatMessage]] = set()
# The turns started while serving one ASGI request (``rivya.asgi`` waits for them, so that a
# graceful shutdown lets them finish and settle even when their client has gone).
REQUEST_TURNS: ContextVar[list[asyncio.Task[ChatMessage]] | None] = ContextVar(
    "chat_request_turns", default=None
)
_DONE = object()
# Reading stops this many tokens past ``max_tokens`` (a provider that ignores the limit).
OVERRUN_TOKENS = 16
# A waiting client hears something this often (an SSE comment, or a space before the JSON), so
# that proxies with idle timeouts keep the connection.
HEARTBEAT_S = 15.0
# Settling is retried (a database that blinked) before the turn is left to the beat's sweep.
SETTLE_DELAYS_S = (0.5, 2.0, 5.0)


def _in_thread(func: Callable[..., Any]) -> Callable[..., Any]:
    """``func`` run in a worker thread whose database connection is closed afterwards (unless
    a test's transaction is open there)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        finally:
            if not connection.in_atomic_block:
                connection.close()

    return sync_to_async(call, thread_sensitive=False)


class Turn:
    """One turn's reply, read from the provider by a task of its own."""

    def __init__(self, start: services.TurnStart, shape: Callable[[ChatMessage], Any]) -> None:
        self.start = start
        self.shape = shape
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.client_gone = False
        self.task: asyncio.Task[ChatMessage] | None = None

    def run(self) -> asyncio.Task[ChatMessage]:
        """Start reading (once) in the running event loop."""
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._read())
            RUNNING.add(self.task)
            self.task.add_done_callback(RUNNING.discard)
            request_turns = REQUEST_TURNS.get()
            if request_turns is not None:
                request_turns.append(self.task)
        return self.task

    async def _read(self) -> ChatMessage:
        start, request = self.start, self.start.request
        if request is None:  # pragma: no cover - a replayed turn is never read again
            raise RuntimeError("a replayed turn has nothing to read")
        parts: list[str] = []
        streamed = 0
        usage: ChatUsage | None = None
        finish = "stop"
        error: ProviderError | None = None
        tool_calls: tuple[ChatToolCall, ...] = ()
        stream = None
        try:
            async with asyncio.timeout(settings.CHAT_TURN_MAX_SECONDS):
                stream = get_provider(start.provider).stream_chat(request)
                async for item in stream:
                    if isinstance(item, ChatDelta):
                        parts.append(item.text)
                        streamed += 1
                        self.queue.put_nowait(item.text)
                        if streamed >= request.max_tokens + OVERRUN_TOKENS:
                            finish = "length"
                            break
                    elif isinstance(item, ChatEnd):
                        usage, finish, error = item.usage, item.finish_reason, item.error
                        tool_calls = item.tool_calls
        except asyncio.CancelledError:
            # The event loop is shutting down (a restart): settle what was read, then go.
            await asyncio.shield(
                self._settle(
                    parts,
                    streamed,
                    None,
                    "error",
                    ProviderError(
                        "The reply was cut short by a server restart; what arrived is kept and "
                        "billed as counted.",
                        retryable=True,
                        code=services.INTERRUPTED,
                    ),
                )
            )
            raise
        except TimeoutError:
            finish = "length"
            error = ProviderError(
                f"The reply took longer than {settings.CHAT_TURN_MAX_SECONDS} s and was cut.",
                retryable=True,
                code="upstream_timeout",
            )
        except ProviderError as exc:
            finish, error = "error", exc
        except Exception:  # a bug must not leave the hold open: settle what was read
            log.exception("chat message %s: reading the reply failed", start.message.pk)
            finish = "error"
            error = ProviderError(
                "The reply could not be read to its end.", retryable=True, code="stream_failed"
            )
        finally:
            if stream is not None:
                await stream.aclose()
            self.queue.put_nowait(_DONE)
        return await self._settle(parts, streamed, usage, finish, error, tool_calls)

    async def _settle(
        self,
        parts: list[str],
        streamed: int,
        usage: ChatUsage | None,
        finish: str,
        error: ProviderError | None,
        tool_calls: tuple[ChatToolCall, ...] = (),
    ) -> ChatMessage:
        for delay in (*SETTLE_DELAYS_S, None):
            try:
                return await _in_thread(services.finish_turn)(
                    message_id=self.start.message.pk,
                    content="".join(parts),
                    usage=usage,
                    streamed_tokens=streamed,
                    finish_reason=finish,
                    error=error,
                    client_gone=self.client_gone,
                    tool_calls=tool_calls,
                )
            except Exception:
                if delay is None:
                    raise  # left STREAMING: the beat's sweep releases the hold
                log.warning(
                    "chat message %s: settling failed, retrying in %s s",
                    self.start.message.pk,
                    delay,
                    exc_info=True,
                )
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    async def settled(self) -> ChatMessage:
        """The settled message. Shielded: a client that goes away does not cancel the turn."""
        if self.start.replayed:
            return self.start.message
        return await asyncio.shield(self.run())

    async def events(self) -> AsyncIterator[bytes]:
        """The turn as server-sent events: ``message`` (the assistant message as it starts),
        ``delta`` per piece of text, ``tool_call`` per tool the model called (its task
        created, or its tool error), ``settlement`` (the settled message: the turn's last
        word), then ``tool_result`` as each task its tools created finishes."""
        try:
            yield sse("message", self.shape(self.start.message))
            if self.start.replayed:
                if self.start.message.content:
                    yield sse("delta", {"text": self.start.message.content})
            else:
                self.run()
                while True:
                    try:
                        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow
                        # the cancellation of a client that leaves as a token arrives.
                        async with asyncio.timeout(HEARTBEAT_S):
                            item = await self.queue.get()
                    except TimeoutError:
                        yield b": ping\n\n"
                        continue
                    if item is _DONE:
                        break
                    yield sse("delta", {"text": item})
            while True:
                try:
                    async with asyncio.timeout(HEARTBEAT_S):
                        message = await self.settled()
                except TimeoutError:
                    yield b": ping\n\n"
                else:
                    break
            for call in message.tool_calls:
                yield sse("tool_call", call)
            yield sse("settlement", self.shape(message))
            async for event in tool_results(message):
                yield event
        except (asyncio.CancelledError, GeneratorExit):
            self.client_gone = True
            raise

    async def body(self) -> AsyncIterator[bytes]:
        """The settled message as one JSON document (sent when the turn has settled)."""
        try:
            while True:
                try:
                    async with asyncio.timeout(HEARTBEAT_S):
                        message = await self.settled()
                except TimeoutError:
                    yield b" "  # JSON allows leading whitespace
                else:
                    break
        except (asyncio.CancelledError, GeneratorExit):
            self.client_gone = True
            raise
        yield json.dumps(self.shape(message)).encode()


TOOL_POLL_S = 1.0


def _tool_tasks(task_ids: list[str]) -> dict[str, tuple[str, str, str, int]]:
    return {
        str(pk): (status, code, message, len(results))
        for pk, status, code, message, results in Task.objects.filter(pk__in=task_ids)
        .filter(status__in=Task.TERMINAL)
        .values_list("pk", "status", "error_code", "error_message", "results")
    }


async def tool_results(message: ChatMessage) -> AsyncIterator[bytes]:
    """A ``tool_result`` event as each task the turn's tools created finishes (its status, and
    its error or how many results it has), with pings while waiting; for at most
    ``CHAT_TOOL_WAIT_SECONDS``, after which the page and the API go on showing the tasks.
    One query a second, each in a worker thread whose connection is then closed."""
    waiting = {r["task_id"]: r["id"] for r in message.tool_calls if r.get("task_id")}
    deadline = asyncio.get_running_loop().time() + settings.CHAT_TOOL_WAIT_SECONDS
    quiet_since = asyncio.get_running_loop().time()
    while waiting:
        try:
            finished = await _in_thread(_tool_tasks)(list(waiting))
        except Exception:  # the turn is settled: a database blink only ends the watching
            log.warning(
                "chat message %s: watching its tool tasks failed", message.pk, exc_info=True
            )
            return
        for task_id, (status, code, error, outputs) in finished.items():
            yield sse(
                "tool_result",
                {
                    "id": waiting.pop(task_id),
                    "task_id": task_id,
                    "status": status,
                    "error": {"code": code, "message": error} if code else None,
                    "outputs": outputs,
                },
            )
            quiet_since = asyncio.get_running_loop().time()
        now = asyncio.get_running_loop().time()
        if not waiting or now >= deadline:
            return
        if now - quiet_since >= HEARTBEAT_S:
            yield b": ping\n\n"
            quiet_since = now
        await asyncio.sleep(TOOL_POLL_S)


def sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def wait_for_turns(app: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """ASGI middleware: an HTTP request is over when the turns it started have settled.

    A client that leaves mid-turn ends its response early; the server's graceful shutdown waits
    for request tasks, not for loose tasks, so without this a restart would cut the turn."""

    async def application(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        turns: list[asyncio.Task[ChatMessage]] = []
        token = REQUEST_TURNS.set(turns)
        try:
            await app(scope, receive, send)
        finally:
            REQUEST_TURNS.reset(token)
            for task in turns:
                # A turn that failed to settle logged it and is left to the beat's sweep.
                with contextlib.suppress(Exception):
                    await asyncio.shield(task)

    return application
