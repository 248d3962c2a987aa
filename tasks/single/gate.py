"""The concurrency gate of single (synchronous) tasks: at most ``SINGLE_MAX_CONCURRENT`` of them
run at once across every web process and machine (docs/single.md).

A request takes a slot before it runs and gives it back after::

    gate = single_gate()
    slot = await gate.acquire(lease_s=handler_timeout + margin, wait_s=settings.SINGLE_GATE_WAIT_S)
    if slot is None:
        ...  # 429, Retry-After: retry_after_s()
    try:
        ...  # the work, bounded so that it ends before the lease does
    finally:
        await gate.release(slot)

Every slot has a lease: a process killed while it holds slots loses them when their leases end,
never before. The lease is counted from the moment the gate admitted the holder (a little
before ``acquire`` returns), so the caller's margin must cover that round trip.

Two backends with the same behaviour, chosen by ``SINGLE_GATE_BACKEND`` ("auto": Redis when
``REDIS_URL`` is set, else the database):

- Redis: one sorted set per gate, member = a random holder token, score = lease end in ms of
  the Redis server's clock. One Lua script drops the expired members and admits only while
  ``ZCARD < limit``: atomic, so racing acquirers cannot both take the last slot, and a lowered
  limit admits no one until the live holders are below it.
- The database (``GateSlot``): rows 0..limit-1 per gate. A holder takes one row with a
  conditional UPDATE (free or expired, index below the limit, and no live holder on a row at or
  above the limit, i.e. left over from a higher limit), so a row never has two holders and
  never more than ``limit`` rows are live. Times are the database's (``Now()``). Works on
  PostgreSQL and SQLite; each attempt runs on a small pool of threads of the gate's own and
  closes its connection, so a waiter sleeps without a thread or a connection. Every attempt
  costs a connection: with many web processes on PostgreSQL, prefer Redis.

Neither backend ever reads the local clock for a lease: machines whose clocks disagree share
one gate safely. Processes that disagree on the limit (a rolling change) are bounded by the
largest limit in use; once all agree, the new limit holds (holders above it drain first).
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection
from django.db.models import BooleanField, DateTimeField, Exists, ExpressionWrapper, Q
from django.db.models.functions import Now

log = logging.getLogger(__name__)

SINGLE_GATE = "single"
# Polling while the gate is full: the first pause, its growth and its ceiling (seconds); each
# pause is jittered (50-100 % of the nominal value) so that waiters do not poll in lockstep.
POLL_FIRST_S = 0.01
POLL_GROWTH = 1.5
POLL_MAX_S = 0.1
REDIS_KEY = "rivya:gate:{name}"
# Redis connections per event loop (process): attempts beyond it queue for one.
REDIS_CONNECTIONS = 16
# Database attempts run on this many threads per process (of their own: a full gate's pollers
# never crowd out other work on asyncio's default executor); more attempts queue for them.
DB_THREADS = 4
# An attempt still unanswered this long past the caller's wait_s (a backend that hangs, a long
# queue of attempts) is abandoned: acquire returns None, and the slot, if the attempt took one
# after all, is given back.
ATTEMPT_GRACE_S = 1.0


@dataclass(frozen=True)
class Slot:
    """A held slot: give it back with ``Gate.release``."""

    gate: str
    token: str  # random, unique to this holder
    slot: int | None  # the GateSlot row's index on the database backend; None on Redis


def retry_after_s() -> int:
    """Seconds for the Retry-After of a 429 answered because the gate stayed full: the request
    already waited ``SINGLE_GATE_WAIT_S``; 1 or 2 more (at random, so that refused clients do not
    all come back at the same second) is about when a few of the running tasks have ended."""
    return random.choice((1, 2))  # noqa: S311 - spreading retries, not a secret


def single_gate() -> Gate:
    """The gate of single tasks, as configured now (settings are read at each call)."""
    return Gate(
        SINGLE_GATE,
        limit=settings.SINGLE_MAX_CONCURRENT,
        backend=getattr(settings, "SINGLE_GATE_BACKEND", "auto"),
    )


class Gate:
    """At most ``limit`` holders of ``name`` at once, everywhere that shares the backend."""

    def __init__(self, name: str, *, limit: int, backend: str = "auto") -> None:
        if backend == "auto":
            backend = "redis" if settings.REDIS_URL else "db"
        if backend not in ("redis", "db"):
            raise ValueError(f"unknown gate backend {backend!r} (auto, redis or db)")
        if backend == "redis" and not settings.REDIS_URL:
            raise ValueError("the redis gate backend needs REDIS_URL")
        self.name = name
        self.limit = int(limit)
        self.backend = backend
        self._impl: _Redis | _Database = _Redis(name) if backend == "redis" else _Database(name)

    async def acquire(self, *, lease_s: float, wait_s: float) -> Slot | None:
        """A slot held for at most ``lease_s`` seconds, or None when the gate is still full
        after ``wait_s`` (polling with a short jittered backoff; nothing is held while waiting).
        Backend errors (Redis or the database down) propagate."""
        if lease_s <= 0:
            raise ValueError("lease_s must be positive")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(wait_s, 0.0)
        pause = POLL_FIRST_S
        while True:
            slot = await self._attempt(lease_s, deadline - loop.time() + ATTEMPT_GRACE_S)
            if slot is not None:
                return slot
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            await asyncio.sleep(min(remaining, pause * random.uniform(0.5, 1.0)))  # noqa: S311
            pause = min(pause * POLL_GROWTH, POLL_MAX_S)

    async def release(self, slot: Slot) -> None:
        """Give the slot back. Idempotent; a slot whose lease has ended (and that someone else
        may hold now) is left alone: only our own token is ever removed. Never raises: when the
        backend cannot be reached the slot is logged and frees itself when its lease ends."""
        try:
            await self._impl.release(slot)
        except Exception:
            log.warning(
                "gate %s: could not release slot %s; it frees at its lease end",
                self.name,
                slot.slot if slot.slot is not None else slot.token[:8],
                exc_info=True,
            )

    async def held(self) -> int:
        """How many slots are held now (leases not ended), whatever their index."""
        return await self._impl.held()

    async def _attempt(self, lease_s: float, timeout: float) -> Slot | None:
        token = secrets.token_hex(16)
        attempt = asyncio.ensure_future(self._impl.take(token, self.limit, lease_s))
        # When the caller stops waiting (cancelled: its client left; or past its deadline) the
        # attempt may still succeed (a script in flight, a thread that cannot be stopped): then
        # the slot is given back rather than left taken until its lease ends.
        try:
            done, _ = await asyncio.wait({attempt}, timeout=timeout)
        except asyncio.CancelledError:
            attempt.add_done_callback(self._give_back)
            raise
        if not done:
            log.warning("gate %s: no answer from its backend in %.1f s", self.name, timeout)
            attempt.add_done_callback(self._give_back)
            return None
        return attempt.result()

    def _give_back(self, attempt: asyncio.Future[Slot | None]) -> None:
        if attempt.cancelled() or attempt.exception() is not None or attempt.result() is None:
            return
        task = asyncio.ensure_future(self.release(attempt.result()))
        _BACKGROUND.add(task)
        task.add_done_callback(_BACKGROUND.discard)


# Releases of slots taken by attempts whose caller was cancelled: strong references until done.
_BACKGROUND: set[asyncio.Future[Any]] = set()


# --- Redis ------------------------------------------------------------------------------------

# KEYS[1] the gate's sorted set; ARGV limit, lease (ms), token. Returns 1 when admitted.
# Times are the Redis server's (TIME), in whole ms (exact in Lua's doubles; formatted with %.0f
# so that no score is ever rounded). A member is live while its score >= now. The key has no
# TTL (Redis deletes it when its last member goes): an eviction policy that removes keys with
# a TTL (volatile-*) can never drop it under live holders.
_ACQUIRE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local key = KEYS[1]
redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. string.format('%.0f', now))
if redis.call('ZCARD', key) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('ZADD', key, string.format('%.0f', now + tonumber(ARGV[2])), ARGV[3])
return 1
"""

_HELD_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZCOUNT', KEYS[1], string.format('%.0f', now), '+inf')
"""

# One client per event loop (a redis.asyncio connection belongs to the loop that opened it),
# per URL (tests change REDIS_URL).
_CLIENTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, Any]] = (
    weakref.WeakKeyDictionary()
)


def _redis() -> Any:
    import redis.asyncio as aioredis

    loop = asyncio.get_running_loop()
    for other in [old for old in list(_CLIENTS) if old.is_closed()]:
        _CLIENTS.pop(other, None)  # its connections reference it: drop them with it
    clients = _CLIENTS.setdefault(loop, {})
    url = settings.REDIS_URL
    if url not in clients:
        # A bounded pool that makes a burst wait for a connection rather than fail.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=REDIS_CONNECTIONS,
            timeout=10,
            socket_timeout=5,
            socket_connect_timeout=5,
        )
        client = aioredis.Redis(connection_pool=pool)
        clients[url] = (
            client,
            client.register_script(_ACQUIRE_LUA),
            client.register_script(_HELD_LUA),
        )
    return clients[url]


async def close_connections() -> None:
    """Close the running event loop's Redis connections (a server's loop keeps them for its
    life; tests and scripts that run a loop per call close them before it ends)."""
    for client, _, _ in _CLIENTS.pop(asyncio.get_running_loop(), {}).values():
        await client.aclose(close_connection_pool=True)


class _Redis:
    def __init__(self, name: str) -> None:
        self.name = name
        self.key = REDIS_KEY.format(name=name)

    async def take(self, token: str, limit: int, lease_s: float) -> Slot | None:
        _, acquire, _ = _redis()
        lease_ms = max(1, int(lease_s * 1000))
        admitted = await acquire(keys=[self.key], args=[limit, lease_ms, token])
        return Slot(self.name, token, None) if int(admitted) == 1 else None

    async def release(self, slot: Slot) -> None:
        client, _, _ = _redis()
        await client.zrem(self.key, slot.token)

    async def held(self) -> int:
        _, _, held = _redis()
        return int(await held(keys=[self.key]))


# --- the database -----------------------------------------------------------------------------


def _in_thread(func: Any) -> Any:
    """``func`` in a worker thread (not the request's), its database connection closed afterwards
    (unless a test's transaction is open there): a waiter holds neither between attempts."""

    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        finally:
            if not connection.in_atomic_block:
                connection.close()

    return sync_to_async(call, thread_sensitive=False, executor=_executor())


_EXECUTOR: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _EXECUTOR  # one pool per process, made on first use (so after a fork)
    if _EXECUTOR is None:
        _EXECUTOR = ThreadPoolExecutor(DB_THREADS, thread_name_prefix="gate-db")
    return _EXECUTOR


def _live() -> Q:
    return ~Q(holder="") & Q(lease_until__gte=Now())


class _Database:
    def __init__(self, name: str) -> None:
        self.name = name

    async def take(self, token: str, limit: int, lease_s: float) -> Slot | None:
        index = await _in_thread(self._take)(token, limit, lease_s)
        return None if index is None else Slot(self.name, token, index)

    async def release(self, slot: Slot) -> None:
        await _in_thread(self._release)(slot)

    async def held(self) -> int:
        return await _in_thread(self._held)()

    def _take(self, token: str, limit: int, lease_s: float) -> int | None:
        from tasks.models import GateSlot

        if limit <= 0:
            return None
        rows = GateSlot.objects.filter(gate=self.name, slot__lt=limit)
        free_now = ExpressionWrapper(
            Q(holder="") | Q(lease_until__lt=Now()), output_field=BooleanField()
        )
        known = dict(rows.annotate(free=free_now).values_list("slot", "free"))
        missing = [i for i in range(limit) if i not in known]
        if missing:
            GateSlot.objects.bulk_create(
                [GateSlot(gate=self.name, slot=i) for i in missing], ignore_conflicts=True
            )
        candidates = [i for i, free in known.items() if free] + missing
        random.shuffle(candidates)  # racing acquirers try different rows first
        # A row left over from a higher limit that is still held counts against this limit:
        # admit no one until those have drained (checked again by each UPDATE).
        over = GateSlot.objects.filter(_live(), gate=self.name, slot__gte=limit)
        if candidates and over.exists():
            return None
        until = ExpressionWrapper(Now() + timedelta(seconds=lease_s), output_field=DateTimeField())
        for index in candidates:
            taken = (
                GateSlot.objects.filter(gate=self.name, slot=index, slot__lt=limit)
                .filter(Q(holder="") | Q(lease_until__lt=Now()))
                .exclude(Exists(over))
                .update(holder=token, lease_until=until)
            )
            if taken == 1:
                return index
        return None

    def _release(self, slot: Slot) -> None:
        from tasks.models import GateSlot

        rows = GateSlot.objects.filter(gate=self.name, holder=slot.token)
        if slot.slot is not None:
            rows = rows.filter(slot=slot.slot)
        rows.update(holder="", lease_until=None)

    def _held(self) -> int:
        from tasks.models import GateSlot

        return GateSlot.objects.filter(_live(), gate=self.name).count()
