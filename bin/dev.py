"""Start Rivya's processes in one terminal (web, Celery worker, Celery beat and the sandbox
provider); Ctrl-C stops all.

Used by ``make run``. Each child gets its own process group so that one Ctrl-C (or SIGTERM)
reaches every process, and if any child dies the others are stopped too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from bin/: make the project importable


def sandbox_settings() -> tuple[str, str]:
    """The sandbox URL and webhook secret exactly as the Django processes will see them."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "rivya.settings")
    import django
    from django.conf import settings

    django.setup()
    return settings.SANDBOX_URL, settings.SANDBOX_WEBHOOK_SECRET


def commands() -> list[tuple[str, list[str]]]:
    host = os.environ.get("RIVYA_HOST", "127.0.0.1")
    port = os.environ.get("RIVYA_PORT", "8000")
    sandbox_url, secret = sandbox_settings()
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
    return [
        *sandbox,
        (
            "web",
            [
                PY,
                "-m",
                "gunicorn",
                "rivya.wsgi:application",
                "--bind",
                f"{host}:{port}",
                "--worker-class",
                "gthread",
                "--workers",
                "2",
                "--threads",
                "8",
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
                "INFO",
                "--concurrency",
                "2",
            ],
        ),
        ("beat", [PY, "-m", "celery", "-A", "rivya", "beat", "--loglevel", "INFO"]),
    ]


def main() -> int:
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        # Signal each main process (gunicorn's arbiter, Celery's main process) and let it stop
        # its own children; whatever is left after the grace period is killed as a group.
        for _name, proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    for name, cmd in commands():
        procs.append((name, subprocess.Popen(cmd, start_new_session=True)))
        print(f"[dev] started {name} (pid {procs[-1][1].pid})", flush=True)
    host = os.environ.get("RIVYA_HOST", "127.0.0.1")
    print(
        f"[dev] Rivya is at http://{host}:{os.environ.get('RIVYA_PORT', '8000')}/ — "
        "Ctrl-C stops everything.",
        flush=True,
    )
    code = 0
    while not stopping:
        for name, proc in procs:
            if proc.poll() is not None:
                print(f"[dev] {name} exited with {proc.returncode}; stopping the rest.", flush=True)
                code = proc.returncode or 1
                stop()
                break
        time.sleep(0.5)
    deadline = time.monotonic() + 15
    for name, proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"[dev] {name} did not stop in time; killing it.", flush=True)
            os.killpg(proc.pid, signal.SIGKILL)
    return code


if __name__ == "__main__":
    sys.exit(main())
