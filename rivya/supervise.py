"""Restart a long-running process that exits: what systemd's ``Restart=always`` or a container
orchestrator does in production, for ``make run`` (``bin/dev.py``) and the fault runs
(``bench/chaos.py``).

Why: a Celery worker exits when its consumer meets an error it cannot recover from. The
``redis-outage`` fault run met one (docs/reliability.md): with Celery 5.7, a broker lost while
the worker holds unacknowledged messages can make kombu raise ``AttributeError`` in Celery's
reconnection handler, and the worker logs "Unrecoverable error" and exits. Nothing is lost by
it (every task's state is in PostgreSQL, and the sweeps re-send what a lost message carried),
but nothing runs until the worker is started again. A worker must therefore always run under a
supervisor, and this is the one of the processes we start ourselves.

A process that exits within ``min_uptime`` of its first start failed to start (a port in use,
a bad setting): restarting it would only repeat the error, so ``poll`` reports it and the
caller stops. Later exits are restarted after a backoff that doubles while the process keeps
dying quickly (1 s, 2 s, ... up to ``max_backoff``) and starts again at 1 s once it stayed up.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Child:
    name: str
    start: Callable[[], subprocess.Popen[bytes]]
    restart: bool
    popen: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    starts: int = 0
    backoff: float = 0.0
    due_at: float | None = None  # when to start it again, while it is down
    exits: list[int] = field(default_factory=list)  # the exit codes seen, in order

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


class Supervisor:
    def __init__(
        self,
        *,
        min_uptime: float = 10.0,
        max_backoff: float = 30.0,
        log: Callable[[str], None] = print,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.min_uptime = min_uptime
        self.max_backoff = max_backoff
        self.log = log
        self.clock = clock
        self.children: list[Child] = []

    def add(
        self, name: str, start: Callable[[], subprocess.Popen[bytes]], *, restart: bool = True
    ) -> Child:
        """Start ``name`` now with ``start()``; restart it with ``start()`` whenever it exits
        (unless ``restart`` is false: then its exit is reported by ``poll``)."""
        child = Child(name=name, start=start, restart=restart)
        self._start(child)
        self.children.append(child)
        return child

    def _start(self, child: Child) -> None:
        child.popen = child.start()
        child.started_at = self.clock()
        child.starts += 1
        child.due_at = None

    def poll(self) -> str | None:
        """Restart what exited and is due; the reason to stop everything, if there is one."""
        now = self.clock()
        for child in self.children:
            if child.due_at is not None:
                if now >= child.due_at:
                    self.log(f"{child.name}: starting again (start {child.starts + 1})")
                    self._start(child)
                continue
            if child.popen is None or child.popen.poll() is None:
                continue
            code = child.popen.returncode
            child.exits.append(code)
            uptime = now - child.started_at
            if not child.restart or (child.starts == 1 and uptime < self.min_uptime):
                return f"{child.name} exited with {code}"
            if uptime >= self.min_uptime:
                child.backoff = 1.0
            else:
                child.backoff = min(self.max_backoff, max(1.0, child.backoff * 2))
            child.due_at = now + child.backoff
            self.log(
                f"{child.name} exited with {code} after {uptime:.0f} s; "
                f"restarting it in {child.backoff:.0f} s"
            )
        return None
