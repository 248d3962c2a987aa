"""Start Rivya's processes in one terminal (web, Celery worker, the worker of outbound
webhooks, Celery beat, the submit dispatcher and the sandbox provider); Ctrl-C stops all.

Used by ``make run``. Each child gets its own process group so that one Ctrl-C (or SIGTERM)
reaches every process. A child that exits is started again (``rivya.supervise``), as a
production supervisor would; one that fails right at its start stops the others, so that the
error is seen.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from bin/: make the project importable
LOOPBACK = ("127.0.0.1", "localhost", "::1")
# A cheap public API path that answers 200 (a 4xx would put a warning in the log): the list
# of models, a JSON array.
PROBE_PATH = "/api/v1/models/"


def django_settings() -> Any:
    """Settings exactly as the Django processes will see them (.env included)."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "rivya.settings")
    import django
    from django.conf import settings

    django.setup()
    return settings


def callback_problem(callback_base: str, serve_url: str, timeout: float = 5.0) -> str | None:
    """Why providers' callbacks to ``callback_base`` would not reach Rivya serving at
    ``serve_url``, or None when they do.

    Callbacks that fail are not an error anywhere (the provider gives up, polling still finishes
    the task, slower), so this is the one place a wrong ``CALLBACK_BASE_URL`` shows.
    """
    target, served = urlparse(callback_base), urlparse(serve_url)
    target_port = target.port or (443 if target.scheme == "https" else 80)
    # Another server (often another `make run`) may answer on the other port, so look first.
    if target.hostname in LOOPBACK and target_port != served.port:
        return f"{callback_base} is not this server, which listens on port {served.port}"
    url = callback_base.rstrip("/") + PROBE_PATH
    try:
        response = httpx.get(url, timeout=timeout, trust_env=False)  # as the sandbox sends
    except httpx.HTTPError as exc:
        return f"{url} is unreachable ({type(exc).__name__}: {exc})"
    try:
        models = response.json()
    except ValueError:
        models = None
    if response.status_code == 200 and isinstance(models, list):
        return None
    hint = " (is its host in ALLOWED_HOSTS?)" if response.status_code == 400 else ""
    return f"{url} answered {response.status_code}, not as Rivya does{hint}"


def wait_until_up(serve_url: str, deadline: float) -> bool:
    """Whether the web server at ``serve_url`` answers before ``deadline`` (monotonic)."""
    while time.monotonic() < deadline:
        try:
            httpx.get(serve_url + PROBE_PATH, timeout=2, trust_env=False)
        except httpx.HTTPError:
            time.sleep(0.5)
        else:
            return True
    return False


def check_callbacks(settings: Any, wait: float = 60.0) -> str | None:
    """Once the web server is up, print a warning if callbacks cannot reach it; the problem."""
    if not settings.CALLBACKS_ENABLED or not wait_until_up(
        settings.SERVE_URL, time.monotonic() + wait
    ):
        return None  # a web server that never comes up is reported by its exit
    problem = callback_problem(settings.CALLBACK_BASE_URL, settings.SERVE_URL)
    if problem:
        print(
            f"[dev] WARNING: provider callbacks cannot reach this server: {problem}. Tasks "
            "will finish only by polling, later. Set CALLBACK_BASE_URL (or SITE_URL) to a URL "
            f"that reaches {settings.SERVE_URL}.",
            file=sys.stderr,
            flush=True,
        )
    return problem


def commands(settings: Any) -> list[tuple[str, list[str]]]:
    host = os.environ.get("RIVYA_HOST", "127.0.0.1")
    port = os.environ.get("RIVYA_PORT", "8000")
    sandbox_url, secret = settings.SANDBOX_URL, settings.SANDBOX_WEBHOOK_SECRET
    # Every child shares the secret (a generated one lives in var/sandbox_webhook_secret).
    os.environ["SANDBOX_WEBHOOK_SECRET"] = secret
    parsed = urlparse(sandbox_url)
    sandbox = []
    if (
        parsed.hostname in ("127.0.0.1", "localhost")
        and os.environ.get("SANDBOX_START", "1") != "0"
    ):
        sandbox = [
            (
                "sandbox",
                [
                    PY,
                    "-m",
                    "tasks.sandbox",
                    "--host",
                    parsed.hostname,
                    "--port",
                    str(parsed.port or 80),
                    "--quiet",
                ],
            )
        ]
    # Celery sets the root level from --loglevel: follow LOG_LEVEL as the web server does.
    loglevel = os.environ.get("LOG_LEVEL", "INFO")
    return [
        *sandbox,
        (
            "web",
            [
                PY,
                "-m",
                "gunicorn",
                # uvicorn workers: chat turns stream from Django's ASGI handler and hold no
                # thread while they wait; the rest runs on each worker's pool of WEB_THREADS
                # threads with persistent connections (rivya/asgi.py, docs/chat.md).
                "rivya.asgi:application",
                "--bind",
                f"{host}:{port}",
                "--worker-class",
                "uvicorn_worker.UvicornWorker",
                "--workers",
                "2",
                "--graceful-timeout",
                "30",
                "--access-logfile",
                "-",
            ],
        ),
        (
            "worker",
            [
                PY,
                "-m",
                "celery",
                "-A",
                "rivya",
                "worker",
                "--loglevel",
                loglevel,
                "--concurrency",
                "2",
            ],
        ),
        # Outbound webhook deliveries, on their own queue: I/O-bound waits on receivers, so
        # threads; a slow receiver ties up one of these, never the worker above
        # (docs/webhooks.md).
        (
            "webhooks",
            [
                PY,
                "-m",
                "celery",
                "-A",
                "rivya",
                "worker",
                "--queues",
                "webhooks",
                "--pool",
                "threads",
                "--concurrency",
                "16",
                "--hostname",
                "webhooks@%h",
                "--loglevel",
                loglevel,
            ],
        ),
        ("beat", [PY, "-m", "celery", "-A", "rivya", "beat", "--loglevel", loglevel]),
        # The outbox dispatcher: hands each committed submit to the worker (docs/submit.md).
        ("dispatcher", [PY, str(ROOT / "manage.py"), "dispatch_submits"]),
    ]


def main() -> int:
    from rivya.supervise import Supervisor

    supervisor = Supervisor(log=lambda line: print(f"[dev] {line}", flush=True))
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        # Signal each main process (gunicorn's arbiter, Celery's main process) and let it stop
        # its own children; whatever is left after the grace period is killed as a group.
        for child in supervisor.children:
            if child.alive():
                child.popen.send_signal(signal.SIGTERM)  # type: ignore[union-attr]

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    settings = django_settings()
    for name, cmd in commands(settings):
        # A process that exits is started again, as a production supervisor would (a Celery
        # worker exits on errors it cannot recover from; docs/reliability.md); one that fails
        # at its start stops everything, so that the error is seen.
        child = supervisor.add(name, lambda cmd=cmd: subprocess.Popen(cmd, start_new_session=True))
        print(f"[dev] started {name} (pid {child.pid})", flush=True)
    print(f"[dev] Rivya is at {settings.SERVE_URL}/ — Ctrl-C stops everything.", flush=True)
    threading.Thread(target=check_callbacks, args=(settings,), daemon=True).start()
    code = 0
    while not stopping:
        problem = supervisor.poll()
        if problem is not None:
            print(f"[dev] {problem} at its start; stopping the rest.", flush=True)
            code = 1
            stop()
            break
        time.sleep(0.5)
    deadline = time.monotonic() + 15
    for child in supervisor.children:
        if child.popen is None:
            continue
        try:
            child.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"[dev] {child.name} did not stop in time; killing it.", flush=True)
            os.killpg(child.popen.pid, signal.SIGKILL)
    return code


if __name__ == "__main__":
    sys.exit(main())
