"""Background processes of a suite (gunicorn serving Rivya as ``make run`` does: ASGI under
uvicorn workers, or the earlier WSGI gthread server; Celery worker and beat; the sandbox
provider).

Each runs in its own session (process group), logs to a file in the run directory and is
recorded in ``<run dir>/pids``; ``Processes`` stops them all when its ``with`` block ends, on
success or failure, and ``reap_recorded`` (called by the orchestrator at the very end) kills any
group a crashed suite process left behind. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from bench.common import ROOT

STOP_GRACE_S = 15.0
PIDS_FILE = "pids"
UVICORN_WORKER = "uvicorn_worker.UvicornWorker"  # as make run (bin/dev.py)
# The submit suite's WSGI servers (issue 18): gunicorn's sync worker, 4 processes; and gthread,
# 2 processes of 4 threads. Same arguments for Rivya and the bare anchor (bench/bare_wsgi.py).
WSGI_SERVERS = {
    "sync": ["--worker-class", "sync", "--workers", "4"],
    "gthread": ["--worker-class", "gthread", "--workers", "2", "--threads", "4"],
    "sync1": ["--worker-class", "sync", "--workers", "1"],  # bench/profile_submit.py's round trips
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def new_webhook_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def http_status(url_host: str, port: int, path: str, timeout: float = 2.0) -> int | None:
    """Status of ``GET path`` on 127.0.0.1:port, or None if nothing answers."""
    conn = http.client.HTTPConnection(url_host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_bytes()[-chars:].decode(errors="replace")
        except OSError:
            return ""


class Processes:
    """Start background processes; stop every one of them when the ``with`` block ends."""

    def __init__(self, run_dir: Path, env: dict[str, str], cwd: Path = ROOT) -> None:
        self.run_dir = run_dir
        self.env = env
        self.cwd = cwd  # the project whose code the processes run (another checkout: profile)
        self.procs: list[Proc] = []
        run_dir.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Processes:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()

    def start(self, name: str, argv: list[str], **env: str) -> Proc:
        log_path = self.run_dir / f"{name}.log"
        with open(log_path, "wb") as log:  # the child keeps its own handle
            popen = subprocess.Popen(
                argv,
                cwd=self.cwd,
                env={**self.env, **env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: stopped (and reaped) as a whole
            )
        with open(self.run_dir / PIDS_FILE, "a") as pids:
            pids.write(f"{popen.pid}\n")
        proc = Proc(name=name, popen=popen, log=log_path)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        """SIGTERM to the group (gunicorn's arbiter and Celery stop their children), then
        SIGKILL to whatever is left after the grace period."""
        if proc.alive():
            _signal_group(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=STOP_GRACE_S)
        _signal_group(proc.pid, signal.SIGKILL)  # children that outlived their parent
        if proc.alive():
            proc.popen.wait(timeout=10)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)
        self.procs.clear()

    # --- the services -------------------------------------------------------------------

    def gunicorn(
        self,
        *,
        port: int | None = None,
        workers: int = 2,
        server: str = "asgi",
        threads: int = 8,
        **env: str,
    ) -> tuple[str, Proc]:
        """Rivya's web server on ``port`` (default: a free one); returns its URL once
        ``/api/v1/models/`` answers 200.

        ``server="asgi"`` (default) is ``make run``'s: ``rivya.asgi:application`` under
        ``uvicorn_worker.UvicornWorker``, ``workers`` processes: chat turns through Django's
        ASGI handler, the rest through its WSGI handler on ``WEB_THREADS`` threads with
        persistent connections.
        ``server="wsgi"`` is the earlier ``make run``: ``rivya.wsgi:application``, gthread,
        ``workers`` × ``threads``, persistent connections (``DB_CONN_MAX_AGE`` 60 by default)."""
        port = port or free_port()
        if server == "asgi":
            app, worker = ["rivya.asgi:application"], ["--worker-class", UVICORN_WORKER]
        elif server == "wsgi":
            app = ["rivya.wsgi:application"]
            worker = ["--worker-class", "gthread", "--threads", str(threads)]
        else:
            raise ValueError(f"server must be 'asgi' or 'wsgi', not {server!r}")
        proc = self.start(
            "gunicorn" if server == "asgi" else "gunicorn-wsgi",
            [
                sys.executable,
                "-m",
                "gunicorn",
                *app,
                "--bind",
                f"127.0.0.1:{port}",
                *worker,
                "--workers",
                str(workers),
                "--graceful-timeout",
                "5",
            ],
            **env,
        )
        wait_until(
            lambda: http_status("127.0.0.1", port, "/api/v1/models/") == 200,
            proc=proc,
            timeout=60,
            what="gunicorn to answer /api/v1/models/",
        )
        return f"http://127.0.0.1:{port}", proc

    def gunicorn_wsgi(
        self, app: str, server: str, *, name: str, ready_path: str, **env: str
    ) -> tuple[str, Proc]:
        """A WSGI ``app`` (``module:callable``) under one of ``WSGI_SERVERS`` (the submit
        suite's command lines, the same for Rivya and the bare anchor) on a free port; returns
        its URL once ``GET ready_path`` answers 200."""
        port = free_port()
        proc = self.start(
            name,
            [
                sys.executable,
                "-m",
                "gunicorn",
                app,
                "--bind",
                f"127.0.0.1:{port}",
                *WSGI_SERVERS[server],
                "--graceful-timeout",
                "5",
            ],
            **env,
        )
        wait_until(
            lambda: http_status("127.0.0.1", port, ready_path) == 200,
            proc=proc,
            timeout=60,
            what=f"{name} to answer {ready_path}",
        )
        return f"http://127.0.0.1:{port}", proc

    def sandbox(self, secret: str, port: int | None = None) -> tuple[str, Proc]:
        """The sandbox provider process (``python -m tasks.sandbox``) on ``port`` (default: a
        free one)."""
        port = port or free_port()
        launcher = ["-m", "tasks.sandbox"]
        proc = self.start(
            "sandbox",
            [
                sys.executable,
                *launcher,
                "--quiet",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            SANDBOX_WEBHOOK_SECRET=secret,
        )
        wait_until(
            lambda: http_status("127.0.0.1", port, "/healthz") == 200,
            proc=proc,
            timeout=30,
            what="the sandbox to answer /healthz",
        )
        return f"http://127.0.0.1:{port}", proc

    def celery_worker(
        self,
        *,
        pool: str = "prefork",
        concurrency: int = 2,
        queues: str = "celery,webhooks",
        name: str = "worker",
        include: str = "",
        wait: bool = True,
        **env: str,
    ) -> Proc:
        """A Celery worker; by default it serves both queues (``make run`` starts one worker for
        each: ``celery``, and ``webhooks`` on threads). ``include``: a module of extra tasks to
        load. ``wait``: return once it is ready (a worker started again during a broker outage
        is ready only once the broker is back)."""
        proc = self.start(
            name,
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "rivya",
                "worker",
                "--pool",
                pool,
                "--concurrency",
                str(concurrency),
                "--loglevel",
                "INFO",  # "ready." is logged at INFO
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "--queues",
                queues,
                *(["--include", include] if include else []),
                "-n",
                f"bench-{name}-{os.getpid()}@%h",
            ],
            **env,
        )
        if wait:
            wait_until(
                lambda: b"ready." in proc.log.read_bytes(),
                proc=proc,
                timeout=60,
                what="the Celery worker to be ready",
            )
        return proc

    def celery_beat(self, **env: str) -> Proc:
        """Beat with the project's scheduler (django_celery_beat's DatabaseScheduler)."""
        proc = self.start(
            "beat",
            [sys.executable, "-m", "celery", "-A", "rivya", "beat", "--loglevel", "INFO"],
            **env,
        )
        wait_until(
            lambda: b"beat: Starting" in proc.log.read_bytes(),
            proc=proc,
            timeout=60,
            what="Celery beat to start",
        )
        return proc

    def dispatcher(self, name: str = "dispatcher", **env: str) -> Proc:
        """The outbox dispatcher (``manage.py dispatch_submits``), as ``make run`` starts it:
        without it a submitted task waits for the reconciler."""
        return self.start(name, [sys.executable, "manage.py", "dispatch_submits"], **env)


def wait_until(
    check: Callable[[], Any], *, proc: Proc, timeout: float, what: str, every: float = 0.1
) -> Any:
    """``check()``'s first true value, asked every ``every`` s while ``proc`` lives."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited early while waiting for {what}:\n{proc.tail()}")
        value = check()
        if value:
            return value
        time.sleep(every)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}:\n{proc.tail()}")


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def reap_recorded(run_dir: Path) -> list[int]:
    """Kill every process group recorded in ``run_dir`` that still exists (a suite process that
    died without cleaning up). Only groups led by a recorded pid of ours are touched."""
    path = run_dir / PIDS_FILE
    if not path.exists():
        return []
    killed = []
    for line in path.read_text().split():
        pid = int(line)
        try:
            if os.getpgid(pid) != pid:  # the pid was reused by something else
                continue
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (ProcessLookupError, OSError):
            continue
        if str(ROOT).encode() in cmdline or sys.executable.encode() in cmdline:
            _signal_group(pid, signal.SIGKILL)
            killed.append(pid)
    return killed
