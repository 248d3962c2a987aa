"""The concurrency gate of single tasks (tasks/single/gate.py), on both backends: Redis and the
database (PostgreSQL here; transactional: the database backend runs in other threads, and the
subprocesses see only committed rows).

Concurrency is measured by counters that go up after a slot is admitted and down before it is
given back, so what they observe is never more than what the gate really let in: a maximum equal
to the limit shows the gate full, never above it.

Run as a program (``python -m tasks.tests.test_single_gate MODE ...``) it is the subprocess of the
cross-process and kill tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tasks.single import gate as gate_module
from tasks.single.gate import (
    REDIS_KEY,
    Gate,
    Slot,
    close_connections,
    retry_after_s,
    single_gate,
)

PROJECT_ROOT = Path(__file__).resolve().parents[2]

# Global overlap across processes, kept in Redis: INCR the current count, raise the maximum.
_ENTER_LUA = """
local v = redis.call('INCR', KEYS[1])
if v > tonumber(redis.call('GET', KEYS[2]) or '0') then redis.call('SET', KEYS[2], v) end
redis.call('INCR', KEYS[3])
return v
"""


@pytest.fixture(params=["redis", "db"])
def backend(request: Any, transactional_db: Any, settings: Any) -> str:
    if request.param == "redis" and not settings.REDIS_URL:
        pytest.skip("needs REDIS_URL (make test sets it)")
    settings.SINGLE_GATE_BACKEND = request.param
    return request.param


@pytest.fixture
def name(settings: Any) -> Any:
    """A fresh gate name (its Redis key removed afterwards; rows go with the test database)."""
    used = f"t{uuid.uuid4().hex[:16]}"
    yield used
    if settings.REDIS_URL:
        with _sync_redis() as r:
            r.delete(REDIS_KEY.format(name=used))


def _sync_redis() -> Any:
    import redis
    from django.conf import settings

    return redis.Redis.from_url(settings.REDIS_URL)


def _run(coro: Any) -> Any:
    async def main() -> Any:
        try:
            return await coro
        finally:
            await close_connections()

    return asyncio.run(main())


def test_settings_and_single_gate(backend: str, settings: Any) -> None:
    settings.SINGLE_MAX_CONCURRENT = 7
    gate = single_gate()
    assert (gate.name, gate.limit, gate.backend) == ("single", 7, backend)
    settings.SINGLE_GATE_BACKEND = "auto"
    assert single_gate().backend == "redis"  # make test sets REDIS_URL
    settings.REDIS_URL = ""
    assert single_gate().backend == "db"
    assert retry_after_s() in (1, 2)


def test_heavy_concurrency_in_one_process_admits_exactly_the_limit(backend: str, name: str) -> None:
    limit, workers = 50, 200
    gate = Gate(name, limit=limit, backend=backend)
    state = {"now": 0, "max": 0, "admitted": 0}

    async def one(full: asyncio.Event) -> None:
        slot = await gate.acquire(lease_s=30, wait_s=30)
        assert slot is not None
        state["now"] += 1
        state["admitted"] += 1
        state["max"] = max(state["max"], state["now"])
        if state["now"] >= limit:
            full.set()
        # The first holders stay until the gate has been full (however slow the machine),
        # while the others keep polling: any admission beyond the limit would show.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(full.wait(), timeout=10)
        await asyncio.sleep(0.1)
        state["now"] -= 1
        await gate.release(slot)

    async def run() -> int:
        full = asyncio.Event()
        await asyncio.gather(*(one(full) for _ in range(workers)))
        return await gate.held()

    started = time.monotonic()
    held_after = _run(run())
    print(f"{backend}: max overlap {state['max']}, {time.monotonic() - started:.2f} s")
    assert state["max"] == limit
    assert state["admitted"] == workers
    assert held_after == 0


def _child(backend: str, name: str, limit: int, extra: list[str]) -> subprocess.Popen[str]:
    from conftest import database_url

    env = dict(
        os.environ,
        DATABASE_URL=database_url(),
        SINGLE_GATE_BACKEND=backend,
        DJANGO_SETTINGS_MODULE="rivya.settings",
        PYTHONUNBUFFERED="1",
    )
    command = [sys.executable, "-m", "tasks.tests.test_single_gate", backend, name, str(limit)]
    return subprocess.Popen(  # noqa: S603 - our own module, our own arguments
        command + extra,
        cwd=PROJECT_ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(timeout=10)
    for pipe in (process.stdin, process.stdout):
        if pipe is not None:
            pipe.close()


def _read_line(process: subprocess.Popen[str]) -> str:
    line = process.stdout.readline() if process.stdout else ""
    assert line, f"subprocess ended early (exit {process.wait(timeout=5)})"
    return line.strip()


def test_processes_sharing_the_gate_never_exceed_the_limit(backend: str, name: str) -> None:
    limit, processes, per_process = 12, 3, 40
    children = [
        _child(backend, name, limit, ["load", str(per_process), "0.1"]) for _ in range(processes)
    ]
    try:
        for child in children:
            assert _read_line(child) == "ready"
        for child in children:  # all start at once
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        results = [json.loads(_read_line(child)) for child in children]
        for child in children:
            assert child.wait(timeout=30) == 0
    finally:
        for child in children:
            _stop(child)
    with _sync_redis() as r:
        keys = [f"{name}:max", f"{name}:admitted", f"{name}:now"]
        overlap, admitted, left = (int(v or 0) for v in r.mget(keys))
        r.delete(*keys, f"{name}:full")
    print(f"{backend}: global max overlap {overlap} over {processes} processes, {results}")
    assert overlap == limit
    assert admitted == processes * per_process
    assert left == 0
    assert _run(Gate(name, limit=limit, backend=backend).held()) == 0


def test_a_full_gate_gives_up_after_wait_s(backend: str, name: str) -> None:
    gate = Gate(name, limit=3, backend=backend)

    async def run() -> tuple[list[Slot | None], Slot | None, float, Slot | None]:
        held = [await gate.acquire(lease_s=30, wait_s=0) for _ in range(3)]
        started = time.monotonic()
        refused = await gate.acquire(lease_s=30, wait_s=0.5)
        waited = time.monotonic() - started
        await gate.release(held[0])  # type: ignore[arg-type]
        again = await gate.acquire(lease_s=30, wait_s=0)
        return held, refused, waited, again

    held, refused, waited, again = _run(run())
    assert all(held)
    assert refused is None
    assert 0.5 <= waited < 1.0, waited
    assert again is not None


def test_a_waiter_is_admitted_as_soon_as_a_slot_is_released(backend: str, name: str) -> None:
    gate = Gate(name, limit=1, backend=backend)

    async def run() -> float:
        first = await gate.acquire(lease_s=30, wait_s=0)
        assert first is not None
        waiter = asyncio.ensure_future(gate.acquire(lease_s=30, wait_s=5))
        await asyncio.sleep(0.3)
        released = time.monotonic()
        await gate.release(first)
        assert await waiter is not None
        return time.monotonic() - released

    assert _run(run()) < 0.5


def test_a_killed_holder_keeps_its_slots_until_their_leases_end(backend: str, name: str) -> None:
    limit, lease = 3, 2.0
    child = _child(backend, name, limit, ["hold", str(lease)])
    try:
        held = json.loads(_read_line(child))
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=5)
    finally:
        _stop(child)
    assert held["slots"] == limit
    killed = time.time()
    gate = Gate(name, limit=limit, backend=backend)

    async def run() -> tuple[int, list[float]]:
        still = await gate.held()
        freed = []
        for _ in range(limit):
            slot = await gate.acquire(lease_s=30, wait_s=lease + 3)
            assert slot is not None
            freed.append(time.time())
        return still, freed

    still, freed = _run(run())
    print(
        f"{backend}: acquired {held['t0'] - killed:+.3f}..{held['t1'] - killed:+.3f} s, lease "
        f"{lease} s; free again at {', '.join(f'{t - killed:+.3f}' for t in freed)} s "
        "(relative to the kill)"
    )
    assert still == limit
    # Never before the lease of the first slot ended (it began after t0)...
    assert freed[0] >= held["t0"] + lease - 0.005
    # ... and all free soon after the last one ended (it began before t1).
    assert freed[-1] <= held["t1"] + lease + 0.75


def test_releasing_an_expired_slot_frees_nobody_elses(backend: str, name: str) -> None:
    gate = Gate(name, limit=1, backend=backend)

    async def run() -> None:
        mine = await gate.acquire(lease_s=0.6, wait_s=0)
        assert mine is not None
        assert await gate.acquire(lease_s=30, wait_s=0) is None
        await asyncio.sleep(0.7)
        assert await gate.held() == 0  # expired
        theirs = await gate.acquire(lease_s=30, wait_s=0)
        assert theirs is not None
        await gate.release(mine)  # late and harmless
        await gate.release(mine)
        assert await gate.held() == 1
        assert await gate.acquire(lease_s=30, wait_s=0) is None
        await gate.release(theirs)
        await gate.release(theirs)  # idempotent
        assert await gate.held() == 0

    _run(run())


def test_a_lowered_limit_admits_only_below_it(backend: str, name: str) -> None:
    """Ten held, the limit lowered to 4, the holders leaving one by one (the lowest slots
    first): an admission under the new limit never brings the count above 4."""
    high, low = Gate(name, limit=10, backend=backend), Gate(name, limit=4, backend=backend)

    async def run() -> list[int]:
        old = [await high.acquire(lease_s=30, wait_s=0) for _ in range(10)]
        assert all(old)
        old.sort(key=lambda slot: slot.slot or 0)  # type: ignore[union-attr]
        counts = []
        new: list[Slot] = []
        for slot in old:
            await high.release(slot)  # type: ignore[arg-type]
            got = await low.acquire(lease_s=30, wait_s=0)
            if got is not None:
                new.append(got)
            counts.append(await low.held())
        while (got := await low.acquire(lease_s=30, wait_s=0)) is not None:
            new.append(got)
        counts.append(await low.held())
        for slot in new:
            await low.release(slot)
        return counts

    counts = _run(run())
    assert all(c <= max(4, 9 - i) for i, c in enumerate(counts)), counts
    assert counts[-1] == 4


def test_a_lowered_limit_never_over_admits(backend: str, settings: Any) -> None:
    """The limit read at each call (single_gate()) drops from 10 to 4 while 60 workers keep
    taking and giving back slots: once no acquirer of the old limit is left, an admission under
    the new limit only ever happens while fewer than 4 are held, even with holders admitted under
    the old limit still running."""
    key = REDIS_KEY.format(name="single")
    if settings.REDIS_URL:
        with _sync_redis() as r:
            r.delete(key)
    settings.SINGLE_MAX_CONCURRENT = 10
    state: dict[str, Any] = {"now": 0, "max_old": 0, "max_new": 0, "new": 0, "stop": False}
    old_acquiring: set[int] = set()
    clean = asyncio.Event()  # set when nobody is acquiring under the old limit any more

    async def worker(n: int) -> None:
        while not state["stop"]:
            gate = single_gate()
            measured = gate.limit == 4 and clean.is_set()
            if gate.limit == 10:
                old_acquiring.add(n)
            try:
                slot = await gate.acquire(lease_s=30, wait_s=0.1)
            finally:
                old_acquiring.discard(n)
                if settings.SINGLE_MAX_CONCURRENT == 4 and not old_acquiring:
                    clean.set()
            if slot is None:
                continue
            state["now"] += 1
            if gate.limit == 10:
                state["max_old"] = max(state["max_old"], state["now"])
            elif measured:
                state["max_new"] = max(state["max_new"], state["now"])
                state["new"] += 1
            await asyncio.sleep(random.uniform(0.2, 1.0))  # noqa: S311 - staggered releases
            state["now"] -= 1
            await gate.release(slot)

    async def until(condition: Any, timeout: float = 10) -> None:
        give_up = time.monotonic() + timeout
        while not condition() and time.monotonic() < give_up:
            await asyncio.sleep(0.02)

    async def run() -> int:
        workers = [asyncio.ensure_future(worker(n)) for n in range(60)]
        await until(lambda: state["max_old"] >= 10)
        settings.SINGLE_MAX_CONCURRENT = 4
        await until(lambda: state["new"] >= 8)
        state["stop"] = True
        await asyncio.gather(*workers)
        gate = single_gate()
        slots = [await gate.acquire(lease_s=30, wait_s=0) for _ in range(5)]
        for slot in slots:
            if slot is not None:
                await gate.release(slot)
        return sum(s is not None for s in slots)

    try:
        filled = _run(run())
    finally:
        if settings.REDIS_URL:
            with _sync_redis() as r:
                r.delete(key)
    print(
        f"{backend}: max with limit 10: {state['max_old']}; after lowering to 4: "
        f"{state['max_new']} ({state['new']} admissions)"
    )
    assert state["max_old"] == 10
    assert state["new"] >= 8
    assert state["max_new"] <= 4
    assert filled == 4


def test_a_cancelled_acquire_leaves_no_slot_taken(backend: str, name: str) -> None:
    """A request cancelled (its client left) while its attempt is in flight: if the attempt
    still took a slot, it is given back, not left taken until its lease ends."""
    gate = Gate(name, limit=2, backend=backend)

    async def run() -> list[int]:
        seen = []
        for delay in (0, 0.001, 0.003, 0.01):
            waiter = asyncio.ensure_future(gate.acquire(lease_s=30, wait_s=1))
            await asyncio.sleep(delay)
            waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                slot = await waiter
                await gate.release(slot)  # type: ignore[arg-type]
            await asyncio.sleep(0.1)
            seen.append(await gate.held())
        return seen

    assert _run(run()) == [0, 0, 0, 0]


def test_a_backend_too_slow_to_answer_is_given_up_on(
    backend: str, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An attempt unanswered ATTEMPT_GRACE_S past wait_s: acquire returns None then, and the
    slot that attempt takes late is given back."""
    monkeypatch.setattr(gate_module, "ATTEMPT_GRACE_S", 0.2)
    gate = Gate(name, limit=2, backend=backend)
    take = gate._impl.take

    async def slow_take(*args: Any) -> Any:
        await asyncio.sleep(0.5)
        return await take(*args)

    monkeypatch.setattr(gate._impl, "take", slow_take)

    async def run() -> tuple[Slot | None, float, int, int]:
        started = time.monotonic()
        slot = await gate.acquire(lease_s=30, wait_s=0.1)
        waited = time.monotonic() - started
        taken_late = await gate.held()  # not yet: the attempt still sleeps
        await asyncio.sleep(0.7)
        return slot, waited, taken_late, await gate.held()

    slot, waited, before, after = _run(run())
    assert slot is None
    assert 0.3 <= waited < 0.6, waited
    assert (before, after) == (0, 0)


def test_the_database_backend_on_sqlite(tmp_path: Path) -> None:
    """The embedded SQLite database of ``make run``: the same guarantees (one process; SQLite
    serializes writers across processes anyway)."""
    env = dict(
        os.environ,
        DATABASE_URL=f"sqlite:///{tmp_path / 'gate.sqlite3'}",
        REDIS_URL="",
        DJANGO_SETTINGS_MODULE="rivya.settings",
    )
    command = [sys.executable, "-m", "tasks.tests.test_single_gate", "db", "sqlite", "5", "sqlite"]
    done = subprocess.run(  # noqa: S603 - our own module, our own arguments
        command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"sqlite: {result}")
    assert result == {
        "max": 5,
        "admitted": 40,
        "held_after": 0,
        "refused_when_full": True,
        "expired_freed": True,
        "late_release_harmless": True,
        "lowered_refused": True,
    }


# --- the subprocess ----------------------------------------------------------------------------


async def _load(gate: Gate, count: int, hold_s: float) -> dict[str, Any]:
    import redis.asyncio as aioredis
    from django.conf import settings

    client = aioredis.Redis.from_url(settings.REDIS_URL)
    enter = client.register_script(_ENTER_LUA)
    keys = [f"{gate.name}:now", f"{gate.name}:max", f"{gate.name}:admitted"]
    local_max = 0

    async def one() -> None:
        nonlocal local_max
        slot = await gate.acquire(lease_s=30, wait_s=60)
        assert slot is not None
        now = int(await enter(keys=keys))
        local_max = max(local_max, now)
        # As in the one-process test: the first holders stay until the gate has been full.
        if now >= gate.limit:
            await client.set(f"{gate.name}:full", 1, ex=60)
        give_up = time.monotonic() + 10
        while not await client.exists(f"{gate.name}:full") and time.monotonic() < give_up:
            await asyncio.sleep(0.02)
        await asyncio.sleep(hold_s)
        await client.decr(keys[0])
        await gate.release(slot)

    await asyncio.gather(*(one() for _ in range(count)))
    await client.aclose()
    return {"pid": os.getpid(), "admitted": count, "max_seen": local_max}


async def _hold(gate: Gate, lease_s: float) -> dict[str, Any]:
    t0 = time.time()
    slots = [await gate.acquire(lease_s=lease_s, wait_s=5) for _ in range(gate.limit)]
    t1 = time.time()
    return {"slots": sum(s is not None for s in slots), "t0": t0, "t1": t1}


async def _sqlite_checks(gate: Gate) -> dict[str, Any]:
    state = {"now": 0, "max": 0, "admitted": 0}

    full = asyncio.Event()

    async def one() -> None:
        slot = await gate.acquire(lease_s=30, wait_s=30)
        assert slot is not None
        state["now"] += 1
        state["admitted"] += 1
        state["max"] = max(state["max"], state["now"])
        if state["now"] >= gate.limit:
            full.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(full.wait(), timeout=10)
        await asyncio.sleep(0.05)
        state["now"] -= 1
        await gate.release(slot)

    await asyncio.gather(*(one() for _ in range(40)))
    result: dict[str, Any] = {k: state[k] for k in ("max", "admitted")}
    result["held_after"] = await gate.held()
    started = time.monotonic()
    short = [await gate.acquire(lease_s=1.0, wait_s=0) for _ in range(gate.limit)]
    result["refused_when_full"] = await gate.acquire(lease_s=30, wait_s=0.1) is None
    await asyncio.sleep(started + 1.1 - time.monotonic())
    taken = [await gate.acquire(lease_s=30, wait_s=0) for _ in range(gate.limit)]
    result["expired_freed"] = all(taken) and await gate.held() == gate.limit
    for slot in short:
        await gate.release(slot)  # type: ignore[arg-type]
    result["late_release_harmless"] = await gate.held() == gate.limit
    lower = Gate(gate.name, limit=2, backend="db")
    for slot in taken[:3]:
        await gate.release(slot)  # type: ignore[arg-type]
    # Two held (fewer than 5, not fewer than 2): the lowered limit admits no one.
    result["lowered_refused"] = await lower.acquire(lease_s=30, wait_s=0.1) is None
    return result


def _main(argv: list[str]) -> None:
    import django

    django.setup()
    backend, name, limit, mode, *rest = argv
    gate = Gate(name, limit=int(limit), backend=backend)
    if mode == "load":
        print("ready", flush=True)
        sys.stdin.readline()
        print(json.dumps(_run(_load(gate, int(rest[0]), float(rest[1])))), flush=True)
    elif mode == "sqlite":
        from django.db import connection

        from tasks.models import GateSlot

        with connection.schema_editor() as editor:  # the gate's one table is enough here
            editor.create_model(GateSlot)
        connection.close()
        print(json.dumps(_run(_sqlite_checks(gate))), flush=True)
    elif mode == "hold":
        print(json.dumps(_run(_hold(gate, float(rest[0])))), flush=True)
        time.sleep(600)  # until killed


if __name__ == "__main__":
    _main(sys.argv[1:])
