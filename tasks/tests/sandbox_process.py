"""Run the sandbox upstream as a real subprocess for tests.

Usage as a fixture elsewhere::

    from tasks.tests.sandbox_process import sandbox_process  # noqa: F401 (pytest fixture)

    def test_x(sandbox_process: SandboxProcess) -> None:
        provider = SandboxProvider(sandbox_process.base_url, sandbox_process.secret)

or directly: ``base_url, process = start_sandbox(secret)`` ... ``stop_sandbox(process)``.
"""

from __future__ import annotations

import atexit
import base64
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class SandboxProcess:
    base_url: str
    secret: str
    process: subprocess.Popen[bytes]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def start_sandbox(secret: str, *, attempts: int = 3) -> tuple[str, subprocess.Popen[bytes]]:
    """Start ``python -m tasks.sandbox --quiet`` on a free port; wait until /healthz answers.

    Returns ``(base_url, process)``. A port taken between picking and binding (a race with other
    processes) is retried on another port.
    """
    last_error = ""
    command = [sys.executable, "-m", "tasks.sandbox", "--quiet", "--host", "127.0.0.1"]
    env = dict(os.environ, SANDBOX_WEBHOOK_SECRET=secret, PYTHONUNBUFFERED="1")
    for _ in range(attempts):
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        # The child keeps its own handle on the log; ours is only for the failure message.
        with tempfile.TemporaryFile() as log:
            process = subprocess.Popen(  # noqa: S603 -- our own module, fixed arguments
                [*command, "--port", str(port)],
                cwd=PROJECT_ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
            if _wait_healthy(base_url, process):
                # An aborted test run must not leave the server behind.
                atexit.register(stop_sandbox, process)
                return base_url, process
            stop_sandbox(process)
            log.seek(0)
            last_error = log.read().decode(errors="replace")[-2000:]
    raise RuntimeError(f"the sandbox did not start: {last_error}")


def _wait_healthy(base_url: str, process: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{base_url}/healthz", timeout=1.0, trust_env=False).is_success:
                # Still running: the answer came from our process, not one that won the port.
                return process.poll() is None
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    return False


def stop_sandbox(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@pytest.fixture(scope="session")
def sandbox_process() -> Iterator[SandboxProcess]:
    secret = new_secret()
    base_url, process = start_sandbox(secret)
    try:
        yield SandboxProcess(base_url=base_url, secret=secret, process=process)
    finally:
        stop_sandbox(process)
