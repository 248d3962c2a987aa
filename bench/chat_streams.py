"""Chat streams held open at once, for the chat benchmark:
``python bench/chat_streams.py CONFIG.json OUT.json``.

A process of its own (the server under test and the parent's samplers must not share its GIL
or event loop), no Django: one ``httpx.AsyncClient`` opens one streamed turn per entry of
``streams`` (``{"key", "session"}``: an API key and a chat session of its user),
``POST <url>/api/v1/chat/sessions/<session>/messages/`` with ``Accept: text/event-stream`` and
``body``, stream i sent at ``i × ramp_s / len(streams)`` seconds after the start (``ramp_s`` 0:
all at once). Each stream reads its events (``message``, ``delta``…, ``settlement``) to the end
of the body. Prints ``START`` (just before the first stream is sent) and ``END`` on stdout;
writes per stream, in wall-clock seconds (``time.time()``, comparable with the parent's
samples): when it was sent, its answer's headers, its first delta and its end, the deltas
read, the settled message's status and output tokens, or the error; and the process's CPU.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

CONNECT_TIMEOUT_S = 30.0
READ_TIMEOUT_S = 120.0  # the longest silence between two events before a stream counts failed


@dataclass
class StreamResult:
    sent: float = 0.0
    status: int = 0
    headers: float = 0.0
    first_delta: float = 0.0
    ended: float = 0.0
    deltas: int = 0
    message_id: str = ""
    settled_status: str = ""  # the ``settlement`` event's message status (COMPLETE, FAILED, …)
    output_tokens: int = -1
    error: str = ""


def raise_open_files(wanted: int) -> int:
    """Raise this process's soft limit on open files towards ``wanted`` (at most the hard
    limit); the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return int(soft)


async def _one(
    client: httpx.AsyncClient,
    spec: dict[str, str],
    body: dict[str, Any],
    start_at: float,
    result: StreamResult,
) -> None:
    await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
    result.sent = time.time()
    try:
        async with client.stream(
            "POST",
            f"/api/v1/chat/sessions/{spec['session']}/messages/",
            json=body,
            headers={"Authorization": f"Bearer {spec['key']}", "Accept": "text/event-stream"},
        ) as response:
            result.status = response.status_code
            result.headers = time.time()
            if response.status_code != 201:
                text = (await response.aread())[:300].decode(errors="replace")
                result.error = f"answered {response.status_code}: {text}"
                return
            event = ""
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    if event == "delta":
                        result.deltas += 1
                        if not result.first_delta:
                            result.first_delta = time.time()
                    elif event in ("message", "settlement"):
                        data = json.loads(line[6:])
                        result.message_id = str(data.get("id", ""))
                        if event == "settlement":
                            result.settled_status = str(data.get("status", ""))
                            usage = data.get("usage") or {}
                            result.output_tokens = int(usage.get("output_tokens") or 0)
        result.ended = time.time()
    except Exception as exc:  # counted as a failed stream by the parent
        result.ended = time.time()
        result.error = f"{type(exc).__name__}: {exc}"


async def _main(config: dict[str, Any]) -> list[StreamResult]:
    streams: list[dict[str, str]] = config["streams"]
    count = len(streams)
    timeout = httpx.Timeout(connect=CONNECT_TIMEOUT_S, read=READ_TIMEOUT_S, write=30.0, pool=None)
    limits = httpx.Limits(max_connections=count + 10, max_keepalive_connections=count + 10)
    results = [StreamResult() for _ in streams]
    async with httpx.AsyncClient(
        base_url=config["url"], timeout=timeout, limits=limits, trust_env=False
    ) as client:
        print("START", flush=True)
        began = time.perf_counter()
        step = float(config["ramp_s"]) / count if count else 0.0
        await asyncio.gather(
            *(
                _one(client, spec, config["body"], began + i * step, results[i])
                for i, spec in enumerate(streams)
            )
        )
    print("END", flush=True)
    return results


def main(argv: list[str]) -> int:
    config: dict[str, Any] = json.loads(Path(argv[0]).read_text())
    limit = raise_open_files(len(config["streams"]) * 2 + 256)
    cpu = time.process_time()
    results = asyncio.run(_main(config))
    out = {
        "results": [asdict(r) for r in results],
        "cpu_seconds": time.process_time() - cpu,
        "open_files_limit": limit,
    }
    Path(argv[1]).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
