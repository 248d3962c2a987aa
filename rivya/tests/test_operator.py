"""What an operator running Rivya sees: where callbacks go, the startup warning when they
cannot arrive, what the log holds, and upgrading a database whose accounts share an email."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
from celery.app import trace
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from rivya.logfilters import BEAT_SENDING

ROOT = Path(__file__).resolve().parents[2]


def load_dev() -> ModuleType:
    spec = importlib.util.spec_from_file_location("rivya_bin_dev", ROOT / "bin" / "dev.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


dev = load_dev()


# --- SITE_URL follows where `make run` serves -----------------------------------------------


def urls_with(**env: str) -> dict[str, str]:
    """SITE_URL and CALLBACK_BASE_URL as a fresh process computes them from ``env``."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in ("SITE_URL", "CALLBACK_BASE_URL", "RIVYA_HOST", "RIVYA_PORT")
    }
    code = (
        "import json; from django.conf import settings; "
        "print(json.dumps({'site': settings.SITE_URL, 'callback': settings.CALLBACK_BASE_URL}))"
    )
    out = subprocess.run(  # noqa: S603
        [sys.executable, "-c", code],
        env={**clean, "DJANGO_SETTINGS_MODULE": "rivya.settings", **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "http://127.0.0.1:8000"),
        ({"RIVYA_PORT": "8123"}, "http://127.0.0.1:8123"),
        ({"RIVYA_HOST": "0.0.0.0", "RIVYA_PORT": "8124"}, "http://127.0.0.1:8124"),  # noqa: S104
        ({"RIVYA_HOST": "localhost", "RIVYA_PORT": "8125"}, "http://localhost:8125"),
    ],
)
def test_site_url_and_callbacks_follow_rivya_host_and_port(
    env: dict[str, str], expected: str
) -> None:
    assert urls_with(**env) == {"site": expected, "callback": expected}


def test_an_explicit_site_url_or_callback_base_url_wins() -> None:
    assert urls_with(RIVYA_PORT="8123", SITE_URL="https://rivya.example.com") == {
        "site": "https://rivya.example.com",
        "callback": "https://rivya.example.com",
    }
    assert urls_with(RIVYA_PORT="8123", CALLBACK_BASE_URL="http://10.0.0.5:8123/") == {
        "site": "http://127.0.0.1:8123",
        "callback": "http://10.0.0.5:8123",
    }


# --- the startup warning when callbacks cannot reach the server -----------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def other_server() -> Iterator[str]:
    """Something else answering HTTP (not Rivya)."""

    class Hello(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"hello")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_callbacks_that_reach_rivya_are_no_problem(live_server: Any) -> None:
    assert dev.callback_problem(live_server.url, live_server.url) is None


def test_callbacks_to_nobody_are_a_problem() -> None:
    base = f"http://127.0.0.1:{free_port()}"

    problem = dev.callback_problem(base, base, timeout=2)

    assert problem is not None
    assert "unreachable" in problem
    assert f"{base}/api/v1/models/" in problem


def test_callbacks_answered_by_something_else_are_a_problem(other_server: str) -> None:
    problem = dev.callback_problem(other_server, other_server)

    assert problem is not None
    assert "answered 200, not as Rivya does" in problem


def test_callbacks_to_another_local_port_are_a_problem_even_if_a_rivya_answers_there(
    live_server: Any,
) -> None:
    # given a Rivya at the callback URL (e.g. an earlier `make run` on 8000), but not this one
    problem = dev.callback_problem(live_server.url, "http://127.0.0.1:8123")

    assert problem is not None
    assert "listens on port 8123" in problem


def test_startup_warns_when_callbacks_cannot_reach_the_server(
    live_server: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    # given the web server up at SERVE_URL, and callbacks pointed at port 8000's default
    settings = SimpleNamespace(
        CALLBACKS_ENABLED=True,
        SERVE_URL=live_server.url,
        CALLBACK_BASE_URL=f"http://127.0.0.1:{free_port()}",
    )

    problem = dev.check_callbacks(settings, wait=10)

    err = capsys.readouterr().err
    assert problem is not None
    assert err.startswith("[dev] WARNING: provider callbacks cannot reach this server")
    assert "CALLBACK_BASE_URL" in err
    assert live_server.url in err


def test_startup_is_quiet_when_callbacks_reach_the_server(
    live_server: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = SimpleNamespace(
        CALLBACKS_ENABLED=True, SERVE_URL=live_server.url, CALLBACK_BASE_URL=live_server.url
    )

    assert dev.check_callbacks(settings, wait=10) is None
    assert capsys.readouterr().err == ""


# --- routine beat work stays out of the INFO log --------------------------------------------


def success(name: str) -> None:
    """The worker's line for a finished task, through Celery's own logging call."""
    trace.info(trace.LOG_SUCCESS, {"id": "x", "name": name, "return_value": 0, "runtime": 0.01})


def received(name: str) -> None:
    context = {"id": "x", "name": name, "args": "()", "kwargs": "{}", "eta": None}
    logging.getLogger("celery.worker.strategy").info(
        trace.LOG_RECEIVED, context, extra={"data": context}
    )


def messages(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in caplog.records]


def test_routine_periodic_task_lines_are_not_logged_at_info(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)

    for name in ("tasks.poll_due", "tasks.retry_pending_callbacks", "tasks.reconcile_waiting"):
        received(name)
        success(name)
    logging.getLogger("celery.beat").info(BEAT_SENDING, "poll-due-tasks", "tasks.poll_due")

    assert messages(caplog) == []


def test_other_task_lines_and_every_warning_are_kept(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)

    received("tasks.submit")
    success("tasks.process_callback")
    trace.logger.error(
        trace.LOG_FAILURE,
        {"id": "x", "name": "tasks.poll_due", "description": "raised unexpected", "exc": "boom"},
    )
    logging.getLogger("celery.beat").warning("Beat: lost connection; retrying")

    assert messages(caplog) == [
        ("INFO", "Task tasks.submit[x] received"),
        ("INFO", "Task tasks.process_callback[x] succeeded in 0.01s: 0"),
        ("ERROR", "Task tasks.poll_due[x] raised unexpected: boom"),
        ("WARNING", "Beat: lost connection; retrying"),
    ]


def test_routine_lines_are_debug_records_when_debug_is_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)

    success("tasks.expire_results")

    assert messages(caplog) == [("DEBUG", "Task tasks.expire_results[x] succeeded in 0.01s: 0")]


# --- upgrading a database whose accounts share an email -------------------------------------


@pytest.mark.django_db(transaction=True)
def test_the_email_index_migration_names_the_accounts_that_share_an_email() -> None:
    before, after = [("rivya", "0001_initial")], [("rivya", "0002_user_email_unique_ci")]
    MigrationExecutor(connection).migrate(before)
    old_user = (
        MigrationExecutor(connection).loader.project_state(before).apps.get_model("rivya", "User")
    )
    try:
        old_user.objects.create(username="ann", email="ann@example.com")
        old_user.objects.create(username="ann2", email="Ann@Example.com")
        old_user.objects.create(username="bob", email="")
        old_user.objects.create(username="bob2", email="")

        with pytest.raises(RuntimeError, match=r"ann@example\.com: ann, ann2$"):
            MigrationExecutor(connection).migrate(after)

        # once the operator clears one of them, the migration goes through
        old_user.objects.filter(username="ann2").update(email="")
        MigrationExecutor(connection).migrate(after)
    finally:
        old_user.objects.filter(username="ann2").update(email="")
        executor = MigrationExecutor(connection)
        executor.migrate(executor.loader.graph.leaf_nodes())
