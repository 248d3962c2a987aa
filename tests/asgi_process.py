"""Rivya served as a real process on loopback: its ASGI entry point under uvicorn, as ``make
run`` serves it (for tests of chat streams, where a client really closes its connection, and
for the browser tests of the chat page), or its WSGI entry point under gunicorn (the submit's
round trips). Not a test module: fixtures in conftest.py use it."""

from __future__ import annotations

import atexit
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tasks.tests.sandbox_process import free_port, stop_sandbox

ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 30.0


def start_asgi(env: dict[str, str], *, log: Path) -> tuple[str, subprocess.Popen[bytes]]:
    """Start ``uvicorn rivya.asgi:application`` with ``env`` on a free port; wait until it
    answers. Returns ``(base_url, process)``; its output goes to ``log``."""
    port = free_port()
    command = ["uvicorn", "rivya.asgi:application", "--host", "127.0.0.1", "--port", str(port)]
    return _start([*command, "--log-level", "warning"], port, env, log)


def start_wsgi(env: dict[str, str], *, log: Path) -> tuple[str, subprocess.Popen[bytes]]:
    """Start ``gunicorn rivya.wsgi:application`` (one sync worker) with ``env`` on a free port,
    as the submit benchmark serves it; wait until it answers."""
    port = free_port()
    command = ["gunicorn", "rivya.wsgi:application", "--bind", f"127.0.0.1:{port}"]
    return _start([*command, "--workers", "1", "--log-level", "warning"], port, env, log)


def _start(
    command: list[str], port: int, env: dict[str, str], log: Path
) -> tuple[str, subprocess.Popen[bytes]]:
    base_url = f"http://127.0.0.1:{port}"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:  # the child keeps its own handle
        process = subprocess.Popen(  # noqa: S603 -- our own module, fixed arguments
            [sys.executable, "-m", *command],
            cwd=ROOT,
            env={**env, "PYTHONUNBUFFERED": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    atexit.register(stop_sandbox, process)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        try:
            httpx.get(f"{base_url}/api/v1/models/", timeout=2.0, trust_env=False)
        except httpx.HTTPError:
            time.sleep(0.1)
        else:
            return base_url, process
    stop_sandbox(process)
    raise RuntimeError(f"{command[0]} did not start: {log.read_text(errors='replace')[-2000:]}")
