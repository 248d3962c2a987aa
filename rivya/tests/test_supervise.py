"""``rivya.supervise``: a process that exits is started again, after a backoff that grows while
it keeps dying quickly; one that fails at its very start is reported instead. Real child
processes; the supervisor's clock is the test's."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from rivya.supervise import Supervisor

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]
FAILING = [sys.executable, "-c", "raise SystemExit(3)"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[bytes]]]:
    popens: list[subprocess.Popen[bytes]] = []
    yield popens
    for popen in popens:
        popen.kill()
        popen.wait()


def launcher(argv: list[str], started: list[subprocess.Popen[bytes]]):  # type: ignore[no-untyped-def]
    def start() -> subprocess.Popen[bytes]:
        popen = subprocess.Popen(argv)  # noqa: S603 - our own interpreter and code
        started.append(popen)
        return popen

    return start


def exited(popen: subprocess.Popen[bytes] | None) -> None:
    assert popen is not None
    popen.wait(timeout=20)


def test_a_process_that_exits_after_running_a_while_is_started_again(
    started: list[subprocess.Popen[bytes]],
) -> None:
    clock, lines = Clock(), []
    supervisor = Supervisor(min_uptime=10, clock=clock, log=lines.append)
    child = supervisor.add("worker", launcher(SLEEPER, started))
    first = child.pid

    clock.now += 60
    child.popen.kill()  # type: ignore[union-attr]
    exited(child.popen)
    assert supervisor.poll() is None
    assert lines == ["worker exited with -9 after 60 s; restarting it in 1 s"]
    assert not child.alive()

    clock.now += 1
    assert supervisor.poll() is None
    assert child.alive()
    assert child.pid != first
    assert (child.starts, child.exits) == (2, [-9])


def test_the_backoff_doubles_while_it_keeps_dying_quickly_and_resets_once_it_stays_up(
    started: list[subprocess.Popen[bytes]],
) -> None:
    clock, lines = Clock(), []
    supervisor = Supervisor(min_uptime=10, max_backoff=4, clock=clock, log=lines.append)
    child = supervisor.add("worker", launcher(SLEEPER, started))
    clock.now += 60
    waits = []
    for _ in range(4):  # dies 1 s after each start
        child.popen.kill()  # type: ignore[union-attr]
        exited(child.popen)
        supervisor.poll()
        waits.append(child.due_at - clock.now)  # type: ignore[operator]
        clock.now = child.due_at  # type: ignore[assignment]
        supervisor.poll()
        clock.now += 1
    assert waits == [1.0, 2.0, 4.0, 4.0]

    clock.now += 60  # then it stays up
    child.popen.kill()  # type: ignore[union-attr]
    exited(child.popen)
    supervisor.poll()
    assert child.due_at - clock.now == 1.0  # type: ignore[operator]


def test_a_process_that_fails_at_its_start_is_reported_not_restarted(
    started: list[subprocess.Popen[bytes]],
) -> None:
    clock = Clock()
    supervisor = Supervisor(min_uptime=10, clock=clock, log=lambda _: None)
    child = supervisor.add("web", launcher(FAILING, started))
    exited(child.popen)
    clock.now += 1

    assert supervisor.poll() == "web exited with 3"
    assert child.starts == 1


def test_a_process_not_to_restart_is_reported_when_it_exits(
    started: list[subprocess.Popen[bytes]],
) -> None:
    clock = Clock()
    supervisor = Supervisor(min_uptime=10, clock=clock, log=lambda _: None)
    child = supervisor.add("once", launcher(SLEEPER, started), restart=False)
    clock.now += 60
    child.popen.kill()  # type: ignore[union-attr]
    exited(child.popen)

    assert supervisor.poll() == "once exited with -9"
    assert child.starts == 1
