"""End-to-end harness: the sandbox upstream, a real Celery worker and beat, the submit
dispatcher, the live server.

Everything is real and on loopback: PostgreSQL (the test database), Redis (the broker), the
sandbox provider process, Celery worker and beat processes, the outbox dispatcher
(``manage.py dispatch_submits``), and pytest-django's live server
receiving the sandbox's signed callbacks. Nothing is eager or mocked (eager mode hides
after-commit, serialization and retry bugs).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import redis
from django.db import connection

from tasks.tests.sandbox_process import new_secret, start_sandbox, stop_sandbox

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Stack:
    sandbox_url: str
    secret: str
    media_root: str
    env: dict[str, str]
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    beat: subprocess.Popen[bytes] | None = None
    dispatcher: subprocess.Popen[bytes] | None = None
    logdir: Path = ROOT / "var"

    def start_dispatcher(self) -> None:
        """The outbox dispatcher (``manage.py dispatch_submits``), as ``make run`` starts it:
        without it a submitted task waits for the reconciler."""
        with open(self.logdir / "dispatcher.log", "wb") as log:  # the child keeps its own
            self.dispatcher = subprocess.Popen(  # noqa: S603 - our own command line
                [sys.executable, str(ROOT / "manage.py"), "dispatch_submits"],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def services(self) -> list[subprocess.Popen[bytes]]:
        """The stack's processes: workers, beat and the dispatcher."""
        others = [p for p in (self.beat, self.dispatcher) if p is not None]
        return [*self.workers, *others]

    def start_worker(self, **env: str) -> subprocess.Popen[bytes]:
        """Start one more worker (``env``: variables that differ from the stack's) and wait
        until it consumes."""
        index = len(self.workers)
        path = self.logdir / f"worker-{index}.log"
        log = open(path, "wb")  # noqa: SIM115
        proc = subprocess.Popen(  # noqa: S603 - our own command line
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "rivya",
                "worker",
                "--pool",
                "threads",
                "--concurrency",
                "8",
                "--loglevel",
                "INFO",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                # Both queues: the lifecycle's and outbound webhooks' (make run serves them with
                # two workers; one is enough here).
                "--queues",
                "celery,webhooks",
                "-n",
                f"e2e{index}@%h",
            ],
            cwd=ROOT,
            env={**self.env, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()  # the child has its own handle
        self.workers.append(proc)

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"the Celery worker exited early; see {path}")
            return b"ready." in path.read_bytes()

        wait_for(ready, timeout=30, what="the Celery worker to start")
        return proc

    def live_workers(self) -> list[subprocess.Popen[bytes]]:
        return [proc for proc in self.workers if proc.poll() is None]

    def kill_worker(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL, as a crashed machine would: no shutdown, no acknowledgement."""
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def stop_worker(self, proc: subprocess.Popen[bytes]) -> None:
        """Warm shutdown (SIGTERM): running tasks finish, reserved messages go back."""
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def ensure_worker(self) -> None:
        """Leave at least one running worker for the tests that follow."""
        if not self.live_workers():
            self.start_worker()

    @contextmanager
    def worker_env(self, **env: str) -> Iterator[subprocess.Popen[bytes]]:
        """Run the block with the only worker started with ``env``; the ordinary worker is
        back afterwards. (Settings such as CALLBACKS_ENABLED are read where the work happens,
        in the worker, so overriding them in the test process would change nothing.)"""
        for proc in self.live_workers():
            self.stop_worker(proc)
        special = self.start_worker(**env)
        try:
            yield special
        finally:
            self.stop_worker(special)
            self.ensure_worker()

    @contextmanager
    def production_beat(self, **env: str) -> Iterator[Path]:
        """Run the block with beat on django-celery-beat's DatabaseScheduler (what ``make run``
        and production use, from settings) instead of the harness's own beat, which is paused
        meanwhile (SIGSTOP; the file-based scheduler survives the per-test table flushes that
        would wipe the database scheduler's rows). Yields the path of its log."""
        log_path = self.logdir / "beat-database.log"
        if self.beat is not None:
            os.killpg(self.beat.pid, signal.SIGSTOP)
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(  # noqa: S603 - our own command line
                [sys.executable, "-m", "celery", "-A", "rivya", "beat", "--loglevel", "DEBUG"],
                cwd=ROOT,
                # DEBUG: beat's routine "Sending due task" lines, which the tests wait for, are
                # DEBUG records (rivya.logfilters)
                env={**self.env, "LOG_LEVEL": "DEBUG", **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            yield log_path
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            if self.beat is not None:
                os.killpg(self.beat.pid, signal.SIGCONT)

    def stop(self) -> None:
        for proc in self.services():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.services():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def wait_for(
    check: Callable[[], Any], *, timeout: float = 20, what: str = "condition", every: float = 0.1
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def sandbox_stats(stack: Stack) -> dict[str, Any]:
    return httpx.get(f"{stack.sandbox_url}/v1/stats", trust_env=False).json()


@pytest.fixture(scope="session")
def stack(
    django_db_setup: Any,
    django_db_blocker: Any,
    live_server: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    secret = new_secret()
    media_root = str(tmp_path_factory.mktemp("media"))
    broker = os.environ["CELERY_BROKER_URL"]
    redis.Redis.from_url(broker).flushdb()
    with django_db_blocker.unblock():
        db = dict(connection.settings_dict)  # NAME is the test database's by now
    auth = db["USER"] + (f":{quote(str(db['PASSWORD']), safe='')}" if db.get("PASSWORD") else "")
    port = f":{db['PORT']}" if db.get("PORT") else ""
    sandbox_url, sandbox = start_sandbox(secret)
    env = dict(
        os.environ,
        DATABASE_URL=f"postgres://{auth}@{db['HOST']}{port}/{db['NAME']}",
        SANDBOX_URL=sandbox_url,
        SANDBOX_WEBHOOK_SECRET=secret,
        MEDIA_ROOT=media_root,
        CALLBACK_BASE_URL=live_server.url,
        TASK_RESUBMIT_AFTER="3",
        TASK_RECONCILE_EVERY="1",
        TASK_POLL_EVERY="0.5",
        CALLBACK_RETRY_EVERY="2",
        DB_CONN_MAX_AGE="0",
        PYTHONUNBUFFERED="1",
        # Outbound webhooks go to the test receiver on loopback, over http.
        WEBHOOK_ALLOW_PRIVATE="1",
        WEBHOOK_ALLOW_HTTP="1",
        WEBHOOK_SWEEP_EVERY="1",
    )
    stack = Stack(sandbox_url=sandbox_url, secret=secret, media_root=media_root, env=env)
    try:
        stack.start_worker()
        stack.start_dispatcher()
        beat_path = stack.logdir / "beat.log"
        schedule = tmp_path_factory.mktemp("beat") / "schedule"
        with open(beat_path, "wb") as beat_log:  # the child keeps its own handle
            stack.beat = subprocess.Popen(  # noqa: S603 - our own command line
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "rivya",
                    "beat",
                    "--loglevel",
                    "DEBUG",
                    "-S",
                    "celery.beat:PersistentScheduler",
                    "-s",
                    str(schedule),
                ],
                cwd=ROOT,
                env={**env, "LOG_LEVEL": "DEBUG"},  # its routine lines are DEBUG records
                stdout=beat_log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for(
            lambda: b"Sending due task" in beat_path.read_bytes(),
            timeout=30,
            what="Celery beat to send its first periodic task",
        )
        yield stack
    finally:
        stack.stop()
        stop_sandbox(sandbox)


@pytest.fixture
def e2e(stack: Stack, settings: Any, transactional_db: Any) -> Iterator[Stack]:
    """Per test: this process's settings agree with the worker's; the ledger is checked after."""
    settings.SANDBOX_URL = stack.sandbox_url
    settings.SANDBOX_WEBHOOK_SECRET = stack.secret
    settings.MEDIA_ROOT = stack.media_root
    settings.CALLBACK_BASE_URL = stack.env["CALLBACK_BASE_URL"]
    from tasks.catalog import seed_catalog

    seed_catalog()
    yield stack
    stack.ensure_worker()  # a test that killed the worker must not starve the next ones
    from billing.invariants import run_checks

    breaches = run_checks()
    assert breaches == [], breaches
