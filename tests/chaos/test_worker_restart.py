"""A Celery worker that exits is started again, and consumes what waited meanwhile.

The ``redis-outage`` fault run found why this matters (docs/reliability.md): with Celery 5.7, a
broker lost while the worker holds unacknowledged messages can make kombu raise
``AttributeError`` in Celery's reconnection handler; the worker logs "Unrecoverable error" and
exits, and nothing ran after Redis came back. The fault runs now keep the worker under
``rivya.supervise`` (``bench/chaos.py``'s ``WorkerSupervisor``), as ``make run`` does and as
production's supervisor must. Here the worker's main process is killed outright (as the kernel's
OOM killer would), and a message sent while it is down must still be consumed. A real worker, a
real private redis-server."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.chaos import WorkerSupervisor, private_redis
from bench.procs import Processes
from rivya.celery import app

pytestmark = pytest.mark.slow


def wait_for(predicate, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[tuple[Processes, str]]:
    """Processes on a private redis-server (never the shared one of ``make test``)."""
    with Processes(tmp_path, dict(os.environ)) as procs:
        url = private_redis(procs)
        procs.env.update(CELERY_BROKER_URL=url, REDIS_URL=url)
        yield procs, url


def consumed(procs: Processes, task_id: str) -> bool:
    return any(
        f"{task_id}] succeeded" in p.log.read_text(errors="replace")
        for p in procs.procs
        if p.name.startswith("worker")
    )


def test_a_worker_that_exits_is_started_again_and_consumes_what_waited(
    procs: tuple[Processes, str],
) -> None:
    processes, url = procs
    supervised = WorkerSupervisor(processes, {})
    try:
        # Given a supervised worker whose main process is killed (and its pool with it)
        first = supervised.child.pid
        assert first is not None
        os.killpg(first, signal.SIGKILL)

        # When a message is sent while it is down
        probe = str(uuid.uuid4())
        with app.connection_for_write(url) as conn:
            app.send_task("celery.accumulate", args=(1,), task_id=probe, connection=conn)

        # Then a new worker is started, and consumes it
        assert wait_for(lambda: consumed(processes, probe), 90), [p.tail() for p in processes.procs]
        assert supervised.restarts == 1
        assert supervised.child.pid != first
    finally:
        supervised.stop()
