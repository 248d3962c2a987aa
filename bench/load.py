"""HTTP load generator for the submit benchmark: ``python bench/load.py CONFIG.json OUT.json``.

A process of its own (the server under test must not share this process's GIL), standard
library only. N threads, each with its own API key, send the same ``POST`` (or ``method``:
``GET`` sends no body) in a loop until the deadline (at most ``MAX_REQUESTS_PER_THREAD`` each),
one TCP connection per request (``Connection: close``, as behind a reverse proxy that does not
keep upstream connections alive, and so that the connections spread over gunicorn's workers),
or with ``keepalive`` one connection per thread for the whole run. Threads are released
together by a barrier; ``START`` and ``END`` lines on stdout mark the measured window for a
parent sampling CPU. Writes counts by status, latencies and its own CPU time to ``OUT.json``.

With ``requests`` (a list of ``[headers, body]``) instead of ``keys`` and ``body``, each request
is sent once: thread i sends ``requests[i::threads]`` in order and stops when they are sent (or
at the deadline). The callback benchmark uses it for pre-signed provider callbacks, which a
replay would not test.

With ``"idempotency": true`` every request carries a header ``Idempotency-Key:
<idempotency_prefix>-<thread>-<n>`` (n counts the thread's requests from 0), unique per request
as long as the prefix is unique per run (the submit suite passes its window's tag).
"""

from __future__ import annotations

import http.client
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

MAX_REQUESTS_PER_THREAD = 1_000_000
BARRIER_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 30.0


@dataclass
class ThreadResult:
    statuses: dict[int, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)  # seconds, 2xx and others alike
    samples: list[str] = field(default_factory=list)  # a few bodies of unexpected answers
    error: str = ""
    finished: float = 0.0


def _client(
    base: str,
    path: str,
    work: list[tuple[dict[str, str], bytes]] | tuple[dict[str, str], bytes],
    barrier: threading.Barrier,
    shared: dict[str, float],
    result: ThreadResult,
    expect: int,
    keepalive: bool,
    method: str = "POST",
    idempotency: str | None = None,
) -> None:
    parts = urlsplit(base)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    # One (headers, body) sent in a loop, or a list of them each sent once.
    once = isinstance(work, list)
    conn: http.client.HTTPConnection | None = None
    try:
        barrier.wait(timeout=BARRIER_TIMEOUT_S)
        deadline = shared["started"] + shared["seconds"]
        for index in range(len(work) if once else MAX_REQUESTS_PER_THREAD):
            start = time.perf_counter()
            if start >= deadline:
                break
            headers, body = work[index] if once else work  # type: ignore[misc]
            if method == "GET":
                headers, body = dict(headers), None
            else:
                headers = {"Content-Type": "application/json", **headers}
            if idempotency is not None:
                headers["Idempotency-Key"] = f"{idempotency}-{index}"
            if not keepalive:
                headers["Connection"] = "close"
            if conn is None:
                conn = http.client.HTTPConnection(host, port, timeout=REQUEST_TIMEOUT_S)
            response: http.client.HTTPResponse | None = None
            try:
                conn.request(method, path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
            finally:
                if not keepalive or response is None or response.will_close:
                    conn.close()
                    conn = None
            result.latencies.append(time.perf_counter() - start)
            assert response is not None  # set unless request() raised, which ends the loop
            result.statuses[response.status] = result.statuses.get(response.status, 0) + 1
            if response.status != expect and len(result.samples) < 3:
                result.samples.append(f"{response.status}: {data[:300].decode(errors='replace')}")
    except Exception as exc:  # reported, and the run fails
        result.error = f"{type(exc).__name__}: {exc}"
        barrier.abort()
    finally:
        result.finished = time.perf_counter()
        if conn is not None:
            conn.close()


def main(argv: list[str]) -> int:
    config: dict[str, Any] = json.loads(Path(argv[0]).read_text())
    threads_n: int = config["threads"]
    work: list[Any]
    if "requests" in config:
        requests = [(dict(h), b.encode()) for h, b in config["requests"]]
        work = [requests[i::threads_n] for i in range(threads_n)]
    else:
        keys: list[str] = config["keys"]
        body = json.dumps(config.get("body", {})).encode()
        work = [
            ({"Authorization": f"Bearer {keys[i % len(keys)]}"}, body) for i in range(threads_n)
        ]
    shared = {"started": 0.0, "seconds": float(config["seconds"]), "cpu": 0.0}

    def release() -> None:
        shared["cpu"] = time.process_time()
        shared["started"] = time.perf_counter()
        print("START", flush=True)

    barrier = threading.Barrier(threads_n, action=release)
    results = [ThreadResult() for _ in range(threads_n)]
    threads = [
        threading.Thread(
            target=_client,
            args=(
                config["url"],
                config["path"],
                work[i],
                barrier,
                shared,
                results[i],
                int(config["expect"]),
                bool(config.get("keepalive", False)),
                str(config.get("method", "POST")),
                f"{config.get('idempotency_prefix', 'bench')}-{i}"
                if config.get("idempotency")
                else None,
            ),
            daemon=True,
        )
        for i in range(threads_n)
    ]
    for thread in threads:
        thread.start()
    give_up = time.monotonic() + BARRIER_TIMEOUT_S + shared["seconds"] + REQUEST_TIMEOUT_S + 30
    for thread in threads:
        thread.join(timeout=max(0.0, give_up - time.monotonic()))
    print("END", flush=True)
    wall = max(r.finished for r in results) - shared["started"] if shared["started"] else 0.0
    statuses: dict[str, int] = {}
    for r in results:
        for status, count in r.statuses.items():
            statuses[str(status)] = statuses.get(str(status), 0) + count
    out = {
        "seconds": wall,
        "cpu_seconds": time.process_time() - shared["cpu"],
        "statuses": statuses,
        "latencies": [lat for r in results for lat in r.latencies],
        "samples": [s for r in results for s in r.samples][:5],
        "errors": [r.error for r in results if r.error],
        "stuck": sum(t.is_alive() for t in threads),
    }
    Path(argv[1]).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
