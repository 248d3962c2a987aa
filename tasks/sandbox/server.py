"""The sandbox upstream: an asynchronous "AI provider" over HTTP (docs/sandbox.md).

It plays an external vendor, so it imports nothing from Django or Rivya's apps: stdlib plus
httpx, Pillow, standardwebhooks and PyAV only. Jobs live in memory behind one lock; a job's
status is computed from the clock when asked (created_at + latency), so a job finishes whether
or not anyone watches it. Callbacks go through a scheduler thread (a heap of due actions) and a
small pool of sender threads. Chat completions (``chat.py`` plans the reply) are streamed by the
connection's own handler thread, one write per token. The four synchronous services (``single.py``
validates and does the work, ``speech.py`` makes and analyses the audio) answer on the handler
thread too, after their latency, counted in flight for the concurrency stats.
"""

from __future__ import annotations

import base64
import binascii
import heapq
import itertools
import json
import math
import secrets
import select
import socket
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import httpx
from standardwebhooks import Webhook

from tasks.sandbox import chat, media, single

MAX_BODY_BYTES = 64 * 1024 * 1024
MAX_LATENCY_MS = 600_000
MAX_OUTPUTS = 10
CACHE_BYTES = 256 * 1024 * 1024
CALLBACK_TIMEOUT_S = 5.0
CALLBACK_RETRIES = 3  # after the first attempt
CALLBACK_RETRY_DELAY_S = 0.5  # doubled on each retry

OUTCOMES = ("success", "fail", "reject", "partial")
CALLBACK_MODES = ("once", "early", "duplicate", "none", "out_of_order")
STATUS_MODES = ("ok", "error")
CANCEL_MODES = ("honour", "ignore")
SUBMIT_MODES = ("ok", "error", "invalid", "error_after_create", "in_progress", "busy")

FINAL = {"success": "succeeded", "partial": "succeeded", "fail": "failed", "reject": "rejected"}
ERRORS = {
    "fail": {
        "code": "sandbox_failure",
        "message": "The sandbox job failed (sandbox_outcome=fail).",
    },
    "reject": {
        "code": "content_policy",
        "message": "The sandbox rejected the input (sandbox_outcome=reject).",
    },
}


class ClientGone(Exception):
    """The client hung up while we were waiting to send it more."""


class BadRequest(Exception):
    def __init__(self, message: str, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def generate_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return (
        datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


@dataclass
class Job:
    id: str
    model: str
    prompt: str
    kind: str
    webhook_url: str | None
    created_at: float
    latency_s: float
    outcome: str
    callback: str
    status_mode: str
    requested_outputs: int
    produced_outputs: int
    width: int
    height: int
    duration_s: float
    cancel_mode: str = "honour"
    cancelled_at: float | None = None
    deliveries: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def finishes_at(self) -> float:
        return self.created_at + self.latency_s

    def status_at(self, now: float, *, at_creation: bool = False) -> str:
        if self.cancelled_at is not None:
            return "cancelled"
        if now >= self.finishes_at:
            return FINAL[self.outcome]
        return "queued" if at_creation else "running"

    def next_webhook_id(self) -> str:
        return f"msg_{self.id}_{next(self.deliveries)}"


@dataclass
class Delivery:
    job_id: str
    url: str
    webhook_id: str
    timestamp: datetime
    body: bytes
    attempt: int = 0
    then: Callable[[], None] | None = None  # runs once this delivery succeeded or gave up


class Scheduler:
    """Runs callables at given times: a heap of (due, seq, action) and one thread waiting on a
    condition variable for the earliest one; due actions run on a small thread pool."""

    def __init__(self, workers: int = 8) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox-cb")
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="sandbox-scheduler", daemon=True)
        self._thread.start()

    def at(self, due: float, action: Callable[[], None]) -> None:
        with self._cond:
            heapq.heappush(self._heap, (due, next(self._seq), action))
            self._cond.notify()

    def clear(self) -> None:
        with self._cond:
            self._heap.clear()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (not self._heap or self._heap[0][0] > time.monotonic()):
                    timeout = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._cond.wait(timeout)
                if self._stopped:
                    return
                _, _, action = heapq.heappop(self._heap)
            try:
                self._pool.submit(action)
            except RuntimeError:  # pool shut down
                return


class Sandbox:
    """All state of one sandbox process: jobs, idempotency keys, stats, media cache, callbacks."""

    def __init__(self, secret: str, *, log: Callable[[str], None] | None = None) -> None:
        self._webhook = Webhook(secret)
        self._log = log or (lambda _line: None)
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._by_key: dict[str, str] = {}
        self._stats = self._empty_stats()
        self._chat_stats = self._empty_chat_stats()
        self._chat_open = 0  # a gauge of live streams: not cleared by reset()
        self._single_stats = self._empty_single_stats()
        self._single_open = 0  # a gauge of requests in flight: not cleared by reset()
        self._cache: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._cache_bytes = 0
        self._scheduler = Scheduler()
        self._http = httpx.Client(timeout=CALLBACK_TIMEOUT_S, trust_env=False)
        self.base_url = "http://127.0.0.1"

    @staticmethod
    def _empty_stats() -> dict[str, Any]:
        return {
            "jobs_created": 0,
            "submits": 0,
            "by_key": {},
            "callbacks_sent": 0,
            "callbacks_failed": 0,
        }

    @staticmethod
    def _empty_chat_stats() -> dict[str, int]:
        return {
            "chat_requests": 0,
            "chat_streams": 0,
            "chat_completions": 0,
            "chat_disconnects": 0,
            "chat_tokens": 0,
        }

    @staticmethod
    def _empty_single_stats() -> dict[str, Any]:
        return {
            "requests": 0,
            "max_in_flight": 0,
            "disconnects": 0,
            "by_service": dict.fromkeys(single.SERVICES, 0),
        }

    def close(self) -> None:
        self._scheduler.stop()
        self._http.close()

    # ---- jobs -------------------------------------------------------------------------------

    def view(self, job: Job, now: float, *, at_creation: bool = False) -> dict[str, Any]:
        status = job.status_at(now, at_creation=at_creation)
        finished_at: float | None = None
        if status == "cancelled":
            finished_at = job.cancelled_at
        elif status in ("succeeded", "failed", "rejected"):
            finished_at = job.finishes_at
        outputs = []
        if status == "succeeded":
            outputs = [
                {"url": f"{self.base_url}/v1/files/{job.id}/{n}", "mime": media.MIME[job.kind]}
                for n in range(job.produced_outputs)
            ]
        return {
            "id": job.id,
            "model": job.model,
            "status": status,
            "outputs": outputs,
            "requested_outputs": job.requested_outputs,
            "error": ERRORS.get(job.outcome) if status in ("failed", "rejected") else None,
            "created_at": _iso(job.created_at),
            "finished_at": _iso(finished_at),
        }

    def count_submit(self) -> None:
        with self._lock:
            self._stats["submits"] += 1

    def create(self, body: Any, idempotency_key: str | None) -> tuple[int, dict[str, Any]]:
        params = body.get("params") if isinstance(body, dict) else None
        submit_mode = _choice(params, "sandbox_submit", SUBMIT_MODES) if params else "ok"
        if submit_mode == "error":
            return 503, _error("sandbox_unavailable", "Submit failed (sandbox_submit=error).")
        if submit_mode == "invalid":
            return 400, _error("invalid_request", "Submit refused (sandbox_submit=invalid).")
        if submit_mode == "busy":
            # As while an earlier request with this key is still being handled, before its job
            # exists: nothing to find yet.
            return 409, _error("request_in_progress", "A request with this key is in progress.")
        # A known key answers with its job before the body is even validated, like vendors that
        # key idempotency on the header alone; checked again under the lock for racing submits.
        now = time.time()
        with self._lock:
            replay = self._replay(idempotency_key, now)
        if replay is not None:
            return _answer_after_create(submit_mode, 200, replay)
        job_args = _parse_job(body)
        now = time.time()
        with self._lock:
            replay = self._replay(idempotency_key, now)
            if replay is not None:
                return _answer_after_create(submit_mode, 200, replay)
            job = Job(id="job_" + secrets.token_hex(10), created_at=now, **job_args)
            self._jobs[job.id] = job
            self._stats["jobs_created"] += 1
            if idempotency_key:
                self._by_key[idempotency_key] = job.id
                by_key = self._stats["by_key"]
                by_key[idempotency_key] = by_key.get(idempotency_key, 0) + 1
            answer = self.view(job, now, at_creation=True)
            if job.webhook_url and job.callback != "none":
                job_id, finishes_at = job.id, job.finishes_at

                def schedule_final() -> None:
                    self._scheduler.at(_monotonic_at(finishes_at), lambda: self._finished(job_id))

                if job.callback == "early":
                    # Vendor behaviour we mimic: a callback before the result exists. The final
                    # one is scheduled once it is done, so even at latency 0 it arrives second.
                    early = self._delivery(
                        job, dict(answer, status="queued", outputs=[], error=None, finished_at=None)
                    )
                    early.then = schedule_final
                    self._send_soon(early)
                else:
                    schedule_final()
        # The job exists from here on; a slow answer lets a test kill our worker between "the
        # upstream accepted the job" and "we stored its id" (the crash the reconciler heals).
        delay_ms = _number(params, "sandbox_submit_delay_ms", 0, 30_000) if params else None
        if delay_ms:
            time.sleep(delay_ms / 1000)
        return _answer_after_create(submit_mode, 201, answer)

    def find(self, idempotency_key: str) -> tuple[int, dict[str, Any]]:
        """The job created under an idempotency key, if any: what a client asks after a submit
        whose answer it never got (or could not trust), before it gives up on the job."""
        with self._lock:
            job = self._jobs.get(self._by_key.get(idempotency_key, ""))
            return 200, {"data": [] if job is None else [self.view(job, time.time())]}

    def _replay(self, idempotency_key: str | None, now: float) -> dict[str, Any] | None:
        job = self._jobs.get(self._by_key.get(idempotency_key or "", ""))
        return None if job is None else self.view(job, now)

    def get(self, job_id: str) -> tuple[int, dict[str, Any]]:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return 404, _error("not_found", f"No job {job_id}.")
            if job.status_mode == "error":
                return 503, _error("sandbox_unavailable", "Status failed (sandbox_status=error).")
            return 200, self.view(job, time.time())

    def cancel(self, job_id: str) -> tuple[int, dict[str, Any]]:
        now = time.time()
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return 404, _error("not_found", f"No job {job_id}.")
            if job.status_at(now) not in ("queued", "running"):
                return 409, self.view(job, now)
            if job.cancel_mode == "ignore":
                # Like an upstream that acknowledges the cancel but finishes (and bills) anyway:
                # the job runs on and calls back with its result.
                return 200, self.view(job, now)
            # From here on status_at() says "cancelled" and _finished() sends nothing.
            job.cancelled_at = now
            answer = self.view(job, now)
            if job.webhook_url and job.callback != "none":
                self._send_soon(self._delivery(job, answer))
        return 200, answer

    def file(self, job_id: str, n: int) -> tuple[bytes, str] | None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.status_at(time.time()) != "succeeded":
                return None
            if not 0 <= n < job.produced_outputs:
                return None
            cached = self._cache.get((job_id, n))
            if cached is not None:
                self._cache.move_to_end((job_id, n))
                return cached, media.MIME[job.kind]
        # Rendered outside the lock; two concurrent first fetches may both render (harmless).
        if job.kind == media.KIND_VIDEO:
            data = media.render_webm(job.prompt, duration_s=job.duration_s, index=n)
        elif job.kind == media.KIND_AUDIO:
            data = media.render_wav(job.prompt, duration_s=job.duration_s, index=n)
        else:
            data = media.render_png(job.prompt, index=n, width=job.width, height=job.height)
        with self._lock:
            if (job_id, n) not in self._cache:
                self._cache[(job_id, n)] = data
                self._cache_bytes += len(data)
            while self._cache_bytes > CACHE_BYTES and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._cache_bytes -= len(old)
        return data, media.MIME[job.kind]

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return json.loads(json.dumps(self._stats))

    # ---- chat -------------------------------------------------------------------------------

    def count_chat(self, what: str, tokens: int = 0, *, disconnected: bool = False) -> None:
        """``what``: ``chat_requests`` (any POST), ``chat_completions`` (a JSON answer),
        ``chat_streams`` (a stream opened; also opens the gauge) or ``closed`` (a stream over
        after ``tokens`` tokens; ``disconnected``: the client hung up first)."""
        with self._lock:
            if what == "closed":
                self._chat_open -= 1
                self._chat_stats["chat_tokens"] += tokens
                if disconnected:
                    self._chat_stats["chat_disconnects"] += 1
                return
            self._chat_stats[what] += 1
            if what == "chat_streams":
                self._chat_open += 1

    def chat_stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self._chat_stats, chat_streams_open=self._chat_open)

    # ---- synchronous services ---------------------------------------------------------------

    def single_enter(self, service: str) -> None:
        """A request to one of the four services arrived (before its body is read). Under the
        lock, so ``max_in_flight`` is exact: a benchmark proves with it that a concurrency gate
        in front of us admits exactly its limit."""
        with self._lock:
            self._single_open += 1
            stats = self._single_stats
            stats["requests"] += 1
            stats["by_service"][service] += 1
            stats["max_in_flight"] = max(stats["max_in_flight"], self._single_open)

    def single_exit(self, *, disconnected: bool) -> None:
        """The request is answered, or its client left. Called before the answer is written:
        a client cannot see its answer, and send its next request, while this one still
        counts (which would overstate ``max_in_flight`` behind a gate)."""
        with self._lock:
            self._single_open -= 1
            if disconnected:
                self._single_stats["disconnects"] += 1

    def single_stats(self) -> dict[str, Any]:
        with self._lock:
            stats = json.loads(json.dumps(self._single_stats))
            stats["in_flight"] = self._single_open
            return stats

    def reset(self) -> None:
        with self._lock:
            self._jobs.clear()
            self._by_key.clear()
            self._stats = self._empty_stats()
            self._chat_stats = self._empty_chat_stats()
            self._single_stats = self._empty_single_stats()
            # Requests still in flight count towards the new maximum.
            self._single_stats["max_in_flight"] = self._single_open
            self._cache.clear()
            self._cache_bytes = 0
            self._scheduler.clear()

    # ---- callbacks --------------------------------------------------------------------------

    def _delivery(self, job: Job, data: dict[str, Any]) -> Delivery:
        body = json.dumps({"type": "job.updated", "data": data}, separators=(",", ":")).encode()
        return Delivery(
            job_id=job.id,
            url=job.webhook_url or "",
            webhook_id=job.next_webhook_id(),
            timestamp=datetime.now(tz=UTC),
            body=body,
        )

    def _send_soon(self, delivery: Delivery, delay_s: float = 0.0) -> None:
        self._scheduler.at(time.monotonic() + delay_s, lambda: self._send(delivery))

    def _finished(self, job_id: str) -> None:
        """The job's latency has elapsed: queue its final deliveries (unless cancelled)."""
        now = time.time()
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.cancelled_at is not None:
                return
            final = self._delivery(job, self.view(job, now))
            if job.callback == "duplicate":
                # Vendor quirk we mimic: the same delivery (same webhook-id, body, signature)
                # arrives 3 times, and the same news twice more under new ids.
                for n in range(3):  # copies: each has its own retry count
                    self._send_soon(replace(final), 0.05 * n)
                for n in range(2):
                    self._send_soon(self._delivery(job, self.view(job, now)), 0.15 + 0.05 * n)
                return
            if job.callback == "out_of_order":
                stale_data = dict(
                    self.view(job, now), status="running", outputs=[], error=None, finished_at=None
                )
                stale = self._delivery(job, stale_data)
                # Sent only once the final delivery is done, so it really arrives after it.
                final.then = lambda: self._send_soon(stale, 0.05)
            self._send_soon(final)

    def _send(self, delivery: Delivery) -> None:
        signature = self._webhook.sign(
            delivery.webhook_id, delivery.timestamp, delivery.body.decode()
        )
        headers = {
            "content-type": "application/json",
            "user-agent": "rivya-sandbox/1",
            "webhook-id": delivery.webhook_id,
            "webhook-timestamp": str(int(delivery.timestamp.timestamp())),
            "webhook-signature": signature,
        }
        try:
            response = self._http.post(delivery.url, content=delivery.body, headers=headers)
            ok = 200 <= response.status_code < 300
            outcome = str(response.status_code)
        except Exception as exc:  # connection refused, timeout, bad URL: all count as failed
            ok = False
            outcome = f"{type(exc).__name__}: {exc}"
        self._log(f"callback {delivery.webhook_id} -> {delivery.url}: {outcome}")
        with self._lock:
            self._stats["callbacks_sent" if ok else "callbacks_failed"] += 1
        if not ok and delivery.attempt < CALLBACK_RETRIES:
            delay = CALLBACK_RETRY_DELAY_S * 2**delivery.attempt
            delivery.attempt += 1
            self._send_soon(delivery, delay)
            return
        if delivery.then is not None:
            then, delivery.then = delivery.then, None
            then()


def _monotonic_at(wall: float) -> float:
    return time.monotonic() + max(0.0, wall - time.time())


def _answer_after_create(mode: str, status: int, job: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """The answer to a submit whose job exists: the job, or, for the knobs that mimic upstreams
    answering badly after acting, an error although the job was created (``error_after_create``:
    a 503; ``in_progress``: a 409 as for a request with the same key still being processed)."""
    if mode == "error_after_create":
        return 503, _error("sandbox_unavailable", "Submit failed after the job was created.")
    if mode == "in_progress":
        return 409, _error("request_in_progress", "A request with this key is in progress.")
    return status, job


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def _choice(params: Any, name: str, values: tuple[str, ...]) -> str:
    value = params.get(name, values[0]) if isinstance(params, dict) else values[0]
    if value not in values:
        raise BadRequest(f"{name} must be one of {', '.join(values)}.")
    return value


def _number(params: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, bool):
        raise BadRequest(f"{name} must be a number.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise BadRequest(f"{name} must be a number.") from None
    if not low <= number <= high:
        raise BadRequest(f"{name} must be between {low:g} and {high:g}.")
    return number


def _parse_job(body: Any) -> dict[str, Any]:
    """Validate a create-job body; the keyword arguments of Job (without id and created_at)."""
    if not isinstance(body, dict):
        raise BadRequest("The body must be a JSON object.")
    model, prompt = body.get("model"), body.get("prompt", "")
    if not isinstance(model, str) or not model:
        raise BadRequest("model is required.")
    if not isinstance(prompt, str):
        raise BadRequest("prompt must be a string.")
    params = body.get("params") or {}
    if not isinstance(params, dict):
        raise BadRequest("params must be an object.")
    webhook_url = body.get("webhook_url")
    if webhook_url is not None and (
        not isinstance(webhook_url, str) or urlsplit(webhook_url).scheme not in ("http", "https")
    ):
        raise BadRequest("webhook_url must be an http(s) URL or null.")
    files = body.get("files") or []
    if not isinstance(files, list):
        raise BadRequest("files must be a list.")
    decoded: list[bytes] = []
    for item in files:
        if not isinstance(item, dict) or not isinstance(item.get("data_b64"), str):
            raise BadRequest("Each file needs name, mime and data_b64.")
        try:
            decoded.append(base64.b64decode(item["data_b64"], validate=True))
        except (binascii.Error, ValueError):
            raise BadRequest("data_b64 is not valid base64.") from None

    kind = media.kind_for_model(model)
    latency = _number(params, "sandbox_latency_ms", 0, MAX_LATENCY_MS) or 0.0
    outcome = _choice(params, "sandbox_outcome", OUTCOMES)
    num = int(_number(params, "num_outputs", 1, MAX_OUTPUTS) or 1)
    requested, produced = num, num
    if outcome == "partial":
        requested = max(num, 2)
        produced = requested - 1
    duration = _number(params, "duration_s", 0, 86_400)
    if kind == media.KIND_AUDIO and "isolation" in model.lower():
        # Audio isolation returns audio as long as the uploaded recording when it is a WAV.
        lengths = [d for d in map(media.wav_duration, decoded) if d is not None]
        if lengths:
            duration = lengths[0]
    return {
        "model": model,
        "prompt": prompt,
        "kind": kind,
        "webhook_url": webhook_url,
        "latency_s": latency / 1000,
        "outcome": outcome,
        "callback": _choice(params, "sandbox_callback", CALLBACK_MODES),
        "status_mode": _choice(params, "sandbox_status", STATUS_MODES),
        "cancel_mode": _choice(params, "sandbox_cancel", CANCEL_MODES),
        "requested_outputs": requested,
        "produced_outputs": produced,
        "width": media.clamp_size(_number(params, "width", 1, 1_000_000)),
        "height": media.clamp_size(_number(params, "height", 1, 1_000_000)),
        "duration_s": media.clamp_duration(duration, kind),
    }


class Handler(BaseHTTPRequestHandler):
    server: SandboxHTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "RivyaSandbox/1"
    # http.server writes headers and body in two send() calls; on a kept-alive connection the
    # body would wait ~40 ms for the client's delayed ACK (Nagle meets delayed ACK). A real
    # provider has no such stall, so the test provider must not add one (TCP_NODELAY).
    disable_nagle_algorithm = True
    _chunked = True  # how _chunk() frames the body of the stream being sent
    _client_talks = False  # the client sent bytes during a stream (see _check_client)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 -- stdlib signature
        if not self.server.quiet:
            super().log_message(format, *args)

    def _send(
        self,
        status: int,
        payload: Any = None,
        *,
        data: bytes | None = None,
        content_type: str = "application/json",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if data is None:
            data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _body(self) -> Any:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY_BYTES:
            self.close_connection = True
            raise BadRequest("Missing, invalid or too large Content-Length.", "payload_too_large")
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return {}
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise BadRequest("The body is not JSON.") from None

    def _path(self) -> list[str]:
        return [unquote(part) for part in urlsplit(self.path).path.strip("/").split("/")]

    def _dispatch(self, route: Callable[[list[str]], None]) -> None:
        try:
            route(self._path())
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away; nobody to answer
        except BadRequest as exc:
            status = 413 if exc.code == "payload_too_large" else 400
            self._send(status, _error(exc.code, exc.message))
        except Exception as exc:  # a bug in the sandbox: answer 500 like any upstream would
            self.log_error("internal error: %r", exc)
            self._send(500, _error("internal_error", "Sandbox internal error."))

    def do_GET(self) -> None:  # noqa: N802 -- stdlib naming
        self._dispatch(self._get)

    def do_HEAD(self) -> None:  # noqa: N802 -- stdlib naming
        self._dispatch(self._get)

    def do_POST(self) -> None:  # noqa: N802 -- stdlib naming
        self._dispatch(self._post)

    def _get(self, parts: list[str]) -> None:
        sandbox = self.server.sandbox
        match parts:
            case ["healthz"]:
                self._send(200, {"ok": True})
            case ["v1", "stats"]:
                self._send(200, sandbox.stats())
            case ["v1", "chat", "stats"]:
                self._send(200, sandbox.chat_stats())
            case ["v1", "single", "stats"]:
                self._send(200, sandbox.single_stats())
            case ["v1", "jobs"]:
                key = parse_qs(urlsplit(self.path).query).get("idempotency_key", [""])[0]
                if not key:
                    self._send(400, _error("invalid_request", "Give ?idempotency_key=."))
                else:
                    self._send(*sandbox.find(key))
            case ["v1", "jobs", job_id]:
                self._send(*sandbox.get(job_id))
            case ["v1", "files", job_id, n] if n.isdigit():
                found = sandbox.file(job_id, int(n))
                if found is None:
                    self._send(404, _error("not_found", "No such output."))
                else:
                    self._send(200, data=found[0], content_type=found[1])
            case _:
                self._send(404, _error("not_found", f"No route GET {self.path}."))

    def _post(self, parts: list[str]) -> None:
        sandbox = self.server.sandbox
        if len(parts) == 2 and parts[0] == "v1" and parts[1] in single.SERVICES:
            self._single(parts[1])  # reads its own body: in flight from its first byte
            return
        if parts == ["v1", "jobs"]:
            sandbox.count_submit()  # every attempt counts, even one with an unreadable body
        elif parts == ["v1", "chat", "completions"]:
            sandbox.count_chat("chat_requests")
        body = self._body()
        match parts:
            case ["v1", "chat", "completions"]:
                self._chat(body)
            case ["v1", "jobs"]:
                self._send(*sandbox.create(body, self.headers.get("Idempotency-Key") or None))
            case ["v1", "jobs", job_id, "cancel"]:
                self._send(*sandbox.cancel(job_id))
            case ["v1", "_reset"]:
                sandbox.reset()
                self._send(200, {"ok": True})
            case _:
                self._send(404, _error("not_found", f"No route POST {self.path}."))

    # ---- synchronous services (docs/sandbox.md) ---------------------------------------------

    def _single(self, service: str) -> None:
        """One request to a synchronous service: validated at once (400 / 422), then the
        latency (cut short when the client hangs up), the outcome knob, the work. In flight
        from before the body is read until just before the answer is written."""
        sandbox = self.server.sandbox
        sandbox.single_enter(service)
        answer: single.Answer | None = None
        gone = False
        try:
            answer = self._single_answer(service)
            gone = answer is None
        finally:
            # An exception (400 from the body, a bug) is answered by _dispatch after this.
            sandbox.single_exit(disconnected=gone)
        if answer is None:
            self.close_connection = True
        elif answer.data is not None:
            self._send(
                answer.status,
                data=answer.data,
                content_type=answer.content_type,
                headers=answer.headers,
            )
        else:
            self._send(answer.status, answer.payload)

    def _single_answer(self, service: str) -> single.Answer | None:
        """The answer to send, or None when the client hung up while we waited."""
        body = self._body()
        try:
            plan = single.parse(service, body)
        except single.Invalid as exc:
            raise BadRequest(str(exc)) from None
        except single.Refused as exc:
            return single.Answer(status=422, payload=_error(exc.code, exc.message))
        self._client_talks = False
        try:
            self._pause(plan.latency_s)
        except ClientGone:
            return None
        if plan.outcome == "fail":
            return single.Answer(status=500, payload=_error("sandbox_failure", single.FAIL_MESSAGE))
        if plan.outcome == "reject":
            return single.Answer(
                status=422, payload=_error("content_policy", single.REJECT_MESSAGE)
            )
        return plan.work()

    # ---- chat completions (docs/sandbox.md) -------------------------------------------------

    def _chat(self, body: Any) -> None:
        try:
            plan = chat.parse(body)
        except chat.InvalidChat as exc:
            raise BadRequest(str(exc)) from None
        self._client_talks = False
        if plan.outcome == "reject":
            self._send(400, _error("content_policy", chat.REJECT_MESSAGE))
        elif plan.stream:
            self._chat_stream(plan)
        else:
            self._chat_json(plan)

    def _chat_json(self, plan: chat.ChatPlan) -> None:
        """``stream: false``: the whole completion in one JSON answer, after the time streaming
        it would have taken."""
        count = plan.streamed_count
        try:
            self._pause(plan.latency_s + plan.token_delay_s * max(0, count - 1))
        except ClientGone:
            self.close_connection = True
            return
        if plan.outcome == "drop":
            self.close_connection = True  # no answer at all
            return
        self.server.sandbox.count_chat("chat_completions")
        if plan.outcome == "fail":
            self._send(500, _error("sandbox_failure", chat.FAIL_MESSAGE))
            return
        answer: dict[str, Any] = {
            "object": "chat.completion",
            "model": plan.model,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": "".join(plan.tokens),
                        **({"tool_calls": _tool_calls(plan)} if plan.tool_calls else {}),
                    },
                    "finish_reason": plan.finish_reason,
                }
            ],
        }
        usage = plan.usage(count)
        if usage is not None:
            answer["usage"] = usage
        self._send(200, answer)

    def _chat_stream(self, plan: chat.ChatPlan) -> None:
        """Server-sent events, one per token, each written (and so sent: ``wfile`` is
        unbuffered and Nagle is off) as it is produced. Chunked on HTTP/1.1, so the connection
        can be reused; close-delimited for an HTTP/1.0 client."""
        sandbox = self.server.sandbox
        self._chunked = self.request_version != "HTTP/1.0"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        if self._chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        sandbox.count_chat("chat_streams")
        streamed = 0
        disconnected = False
        try:
            self._pause(plan.latency_s)
            for n, token in enumerate(plan.tokens[: plan.streamed_count]):
                if n:
                    self._pause(plan.token_delay_s)
                self._event({"choices": [{"delta": {"content": token}}]})
                streamed += 1
            if plan.outcome == "drop":
                # Cut: no final event, no end of the chunked body; the client sees the
                # connection close mid-message.
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if plan.tool_calls and plan.outcome == "success":
                self._event({"choices": [{"delta": {"tool_calls": _tool_calls(plan)}}]})
            usage = plan.usage(streamed)
            final: dict[str, Any]
            if plan.outcome == "fail":
                final = {"error": {"code": "sandbox_failure", "message": chat.FAIL_MESSAGE}}
            else:
                final = {"choices": [{"delta": {}, "finish_reason": plan.finish_reason}]}
            if usage is not None:
                final["usage"] = usage
            self._event(final)
            if plan.outcome == "fail":
                self.close_connection = True  # after the error event: the end, no [DONE]
            else:
                self._chunk(b"data: [DONE]\n\n")
            self._chunk(b"")  # the end of the chunked body (nothing when close-delimited)
        except (ClientGone, ConnectionError):
            disconnected = True
            self.close_connection = True
        except Exception as exc:  # a bug: the headers are out, so all we can do is cut
            self.log_error("internal error while streaming: %r", exc)
            self.close_connection = True
        finally:
            sandbox.count_chat("closed", streamed, disconnected=disconnected)

    def _event(self, payload: dict[str, Any]) -> None:
        self._chunk(b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n")

    def _chunk(self, data: bytes) -> None:
        if self._chunked:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        elif data:
            self.wfile.write(data)

    def _pause(self, seconds: float) -> None:
        """Wait ``seconds``, raising ``ClientGone`` as soon as the client hangs up (so an
        abandoned stream frees its thread, and the hang-up is counted, even during a long
        latency). Short waits only check once, then sleep: precise token pacing."""
        deadline = time.monotonic() + seconds
        poller = select.poll()
        poller.register(self.connection, select.POLLIN | getattr(select, "POLLRDHUP", 0))
        while True:
            remaining = deadline - time.monotonic()
            short = remaining < 0.05 or self._client_talks
            events = poller.poll(0 if short else min(math.ceil(remaining * 1000), 1000))
            if events:
                self._check_client(events[0][1])
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if short or self._client_talks:
                time.sleep(remaining)
                return

    def _check_client(self, event: int) -> None:
        if event & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
            raise ClientGone
        try:
            data = self.connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            raise ClientGone from None
        if not data:
            raise ClientGone
        # The client sent more (a pipelined request): the socket stays readable, so stop
        # polling it; a hang-up is still noticed when a write fails.
        self._client_talks = True


class SandboxHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default listen backlog of 5 resets bursts (hundreds of chat streams opened
    # at once); the kernel caps it at net.core.somaxconn.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], sandbox: Sandbox, *, quiet: bool) -> None:
        super().__init__(address, Handler)
        self.sandbox = sandbox
        self.quiet = quiet
        host, port = self.server_address[:2]
        if host in ("0.0.0.0", "::", ""):  # noqa: S104 -- only compared, never bound here
            host = "127.0.0.1"
        if ":" in str(host):
            host = f"[{host}]"
        sandbox.base_url = f"http://{host}:{port}"

    def server_close(self) -> None:
        super().server_close()
        self.sandbox.close()


def make_server(host: str, port: int, secret: str, *, quiet: bool = False) -> SandboxHTTPServer:
    def log(line: str) -> None:
        if not quiet:
            print(f"sandbox: {line}", file=sys.stderr, flush=True)

    return SandboxHTTPServer((host, port), Sandbox(secret, log=log), quiet=quiet)


def _tool_calls(plan: chat.ChatPlan) -> list[dict[str, Any]]:
    """The plan's tool calls in OpenAI's shape (one delta carrying them whole)."""
    return [
        {
            "index": n,
            "id": f"call_{n}",
            "type": "function",
            "function": {"name": name, "arguments": arguments},
        }
        for n, (name, arguments) in enumerate(plan.tool_calls)
    ]
