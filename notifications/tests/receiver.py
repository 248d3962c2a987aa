"""A webhook receiver for tests: its own process on loopback, answering as it is told.

    python -m notifications.tests.receiver --port N

- ``POST <any path>``: recorded (path, headers, body as received); answered by the next of the
  answers scripted for that path, else 200 ``ok``. An answer may carry ``status``, ``headers``,
  ``body``, ``delay`` (seconds to wait before answering) and ``trickle`` (send the answer one
  byte every that many seconds).
- ``POST /_script`` ``{"path": "/x", "answers": [{"status": 500}, …]}``: script a path.
- ``GET /_received?path=/x``: what it received, oldest first (``body`` as text).
- ``POST /_reset``: forget everything. ``GET /healthz``: 200.

The test side (``Receiver``, ``start_receiver``) talks to it over HTTP.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

PROJECT_ROOT = Path(__file__).resolve().parents[2]


# --- the server (standard library only) ------------------------------------------------------


class State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received: list[dict[str, Any]] = []
        self.scripts: dict[str, list[dict[str, Any]]] = {}


STATE = State()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Without it a kept-alive client waits ~40 ms per request on a delayed ACK (an artifact of
    # http.server, not of a receiver).
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass

    def _answer(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        parts = urlsplit(self.path)
        if parts.path == "/healthz":
            self._answer(200, b"ok")
            return
        if parts.path == "/_received":
            wanted = parse_qs(parts.query).get("path", [None])[0]
            with STATE.lock:
                found = [r for r in STATE.received if wanted is None or r["path"] == wanted]
            self._answer(200, json.dumps(found).encode(), {"Content-Type": "application/json"})
            return
        self._answer(404, b"not found")

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        path = urlsplit(self.path).path
        if path == "/_script":
            script = json.loads(body)
            with STATE.lock:
                STATE.scripts.setdefault(script["path"], []).extend(script["answers"])
            self._answer(200, b"ok")
            return
        if path == "/_reset":
            with STATE.lock:
                STATE.received.clear()
                STATE.scripts.clear()
            self._answer(200, b"ok")
            return
        with STATE.lock:
            STATE.received.append(
                {
                    "path": path,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "body": body.decode("utf-8", "replace"),
                    "at": time.time(),
                }
            )
            queue = STATE.scripts.get(path) or []
            answer = queue.pop(0) if queue else {}
        time.sleep(float(answer.get("delay", 0)))
        if answer.get("trickle"):  # the whole answer, one byte every ``trickle`` seconds
            raw = (
                f"HTTP/1.1 {int(answer.get('status', 200))} OK\r\nContent-Length: 2\r\n\r\nok"
            ).encode()
            try:
                for byte in raw:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(float(answer["trickle"]))
            except OSError:
                pass  # the client gave up
            self.close_connection = True
            return
        self._answer(
            int(answer.get("status", 200)),
            str(answer.get("body", "ok")).encode(),
            answer.get("headers") or {},
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    server.serve_forever()


# --- the test side ----------------------------------------------------------------------------


@dataclass
class Receiver:
    base_url: str
    process: subprocess.Popen[bytes]

    def url(self, path: str = "/hook") -> str:
        return self.base_url + path

    def script(self, path: str, *answers: dict[str, Any]) -> None:
        httpx.post(f"{self.base_url}/_script", json={"path": path, "answers": list(answers)})

    def received(self, path: str = "/hook") -> list[dict[str, Any]]:
        answer = httpx.get(f"{self.base_url}/_received", params={"path": path})
        return list(answer.json())

    def reset(self) -> None:
        httpx.post(f"{self.base_url}/_reset")

    def wait_for(self, count: int, path: str = "/hook", timeout: float = 30.0) -> list[Any]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.received(path)
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.05)


def start_receiver() -> Receiver:
    from tasks.tests.sandbox_process import free_port

    for _ in range(3):
        port = free_port()
        process = subprocess.Popen(  # noqa: S603 - our own command line
            [sys.executable, "-m", "notifications.tests.receiver", "--port", str(port)],
            cwd=PROJECT_ROOT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        base_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(f"{base_url}/healthz", timeout=1).status_code == 200:
                    return Receiver(base_url, process)
            except httpx.HTTPError:
                time.sleep(0.05)
        process.kill()
        process.wait()
    raise RuntimeError("the webhook receiver did not start")


def stop_receiver(receiver: Receiver) -> None:
    receiver.process.terminate()
    try:
        receiver.process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        receiver.process.kill()
        receiver.process.wait()


if __name__ == "__main__":
    main()
