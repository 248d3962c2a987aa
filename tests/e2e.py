"""End-to-end harness: the sandbox upstream, a real Celery worker and beat, the live server.

Everything is real and on loopback: PostgreSQL (the test database), Redis (the broker), the
sandbox provider process, Celery worker and beat processes, and pytest-django's live server
receiving the sandbox's signed callbacks. Nothing is eager or mocked (PITFALLS 25).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    logdir: Path = ROOT / "var"

    def start_worker(self) -> subprocess.Popen[bytes]:
        log = open(self.logdir / f"worker-{len(self.workers)}.log", "wb")  # noqa: SIM115
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
                "-n",
                f"e2e{len(self.workers)}@%h",
            ],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.workers.append(proc)
        wait_for(
            lambda: b"ready." in (self.logdir / f"worker-{len(self.workers) - 1}.log").read_bytes(),
            timeout=30,
            what="the Celery worker to start",
        )
        return proc

    def kill_worker(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL, as a crashed machine would: no shutdown, no acknowledgement."""
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def stop(self) -> None:
        for proc in [*self.workers, *([self.beat] if self.beat else [])]:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in [*self.workers, *([self.beat] if self.beat else [])]:
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
    sandbox_url, sandbox = start_sandbox(secret)
    media_root = str(tmp_path_factory.mktemp("media"))
    broker = os.environ["CELERY_BROKER_URL"]
    redis.Redis.from_url(broker).flushdb()
    with django_db_blocker.unblock():
        db_name = connection.settings_dict["NAME"]
    db = connection.settings_dict
    env = dict(
        os.environ,
        DATABASE_URL=f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db_name}",
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
    )
    stack = Stack(sandbox_url=sandbox_url, secret=secret, media_root=media_root, env=env)
    stack.start_worker()
    beat_log = open(stack.logdir / "beat.log", "wb")  # noqa: SIM115
    schedule = tmp_path_factory.mktemp("beat") / "schedule"
    stack.beat = subprocess.Popen(  # noqa: S603
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "rivya",
            "beat",
            "--loglevel",
            "INFO",
            "-S",
            "celery.beat:PersistentScheduler",
            "-s",
            str(schedule),
        ],
        cwd=ROOT,
        env=env,
        stdout=beat_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
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
    from billing.invariants import run_checks

    breaches = run_checks()
    assert breaches == [], breaches
