"""The sandbox upstream (a real subprocess) driven through SandboxProvider, as Rivya uses it.

No database: these tests only talk HTTP to the sandbox and to a local callback receiver.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
import uuid
import wave
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

import av
import httpx
import pytest
from PIL import Image
from standardwebhooks import Webhook

from tasks.providers.base import (
    InputFile,
    InvalidSignature,
    JobState,
    ProviderError,
    SubmitRequest,
)
from tasks.providers.sandbox import SandboxProvider
from tasks.tests.sandbox_process import (
    PROJECT_ROOT,
    SandboxProcess,
    free_port,
    new_secret,
    sandbox_process,  # noqa: F401 -- pytest fixture
    start_sandbox,
    stop_sandbox,
)

T = TypeVar("T")


# ---- helpers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def data(self) -> dict[str, Any]:
        return json.loads(self.body)["data"]

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]


class Receiver:
    """A local webhook endpoint recording every delivery's raw bytes and headers.
    ``/flaky`` answers 500 to the first attempt of each webhook-id."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self._seen_flaky: set[str] = set()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 -- stdlib naming
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                status = 204
                with receiver._lock:
                    receiver.deliveries.append(Delivery(self.path, headers, body, time.time()))
                    if self.path == "/flaky" and headers["webhook-id"] not in receiver._seen_flaky:
                        receiver._seen_flaky.add(headers["webhook-id"])
                        status = 500
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"
        self.flaky_url = self.url.replace("/hook", "/flaky")

    def for_job(self, job_id: str) -> list[Delivery]:
        with self._lock:
            return [d for d in self.deliveries if d.data.get("id") == job_id]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def wait_until(probe: Callable[[], T], timeout: float = 5.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value or time.monotonic() > deadline:
            assert value, f"condition not met within {timeout}s"
            return value
        time.sleep(0.02)


@pytest.fixture(scope="module")
def provider(sandbox_process: SandboxProcess) -> SandboxProvider:  # noqa: F811
    return SandboxProvider(sandbox_process.base_url, sandbox_process.secret)


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


def submit(
    provider: SandboxProvider,
    *,
    model: str = "sandbox-image",
    prompt: str = "a lighthouse at night",
    callback_url: str | None = None,
    key: str | None = None,
    files: tuple[InputFile, ...] = (),
    **params: Any,
) -> str:
    request = SubmitRequest(
        idempotency_key=key or str(uuid.uuid4()),
        upstream_model=model,
        prompt=prompt,
        params=params,
        files=files,
        callback_url=callback_url,
    )
    return provider.submit(request).upstream_id


def finished(provider: SandboxProvider, upstream_id: str, timeout: float = 5.0) -> Any:
    return wait_until(
        lambda: (s := provider.fetch_status(upstream_id)).state.finished and s, timeout
    )


def stats(sandbox: SandboxProcess) -> dict[str, Any]:
    return httpx.get(f"{sandbox.base_url}/v1/stats", trust_env=False).json()


def sign(secret: str, body: bytes, *, at: datetime, msg_id: str = "msg_test") -> dict[str, str]:
    return {
        "Webhook-Id": msg_id,
        "Webhook-Timestamp": str(int(at.timestamp())),
        "Webhook-Signature": Webhook(secret).sign(msg_id, at, body.decode()),
    }


# ---- submit and idempotency ------------------------------------------------------------------


def test_same_idempotency_key_returns_same_job_and_creates_one(
    provider: SandboxProvider,
    sandbox_process: SandboxProcess,  # noqa: F811
) -> None:
    key = str(uuid.uuid4())
    before = stats(sandbox_process)

    first = submit(provider, key=key)
    second = submit(provider, key=key)

    assert first == second
    after = stats(sandbox_process)
    assert after["by_key"][key] == 1
    assert after["jobs_created"] == before["jobs_created"] + 1
    assert after["submits"] == before["submits"] + 2


@pytest.mark.parametrize(("mode", "retryable"), [("error", True), ("invalid", False)])
def test_submit_failures_say_whether_to_retry(
    provider: SandboxProvider, mode: str, retryable: bool
) -> None:
    with pytest.raises(ProviderError) as caught:
        submit(provider, sandbox_submit=mode)

    assert caught.value.retryable is retryable
    assert caught.value.status == (503 if mode == "error" else 400)


def test_unreachable_upstream_is_retryable() -> None:
    dead = SandboxProvider(f"http://127.0.0.1:{free_port()}", new_secret())

    with pytest.raises(ProviderError) as caught:
        submit(dead)

    assert caught.value.retryable is True
    assert caught.value.code == "upstream_unreachable"


# ---- outcomes and media ----------------------------------------------------------------------


def test_success_gives_pngs_of_the_requested_size_depending_on_the_prompt(
    provider: SandboxProvider,
) -> None:
    job = submit(provider, prompt="a red fox", num_outputs=2, width=96, height=64)
    other = submit(provider, prompt="a blue whale", num_outputs=1, width=96, height=64)

    status = finished(provider, job)
    other_status = finished(provider, other)

    assert status.state is JobState.SUCCEEDED
    assert status.requested_outputs == 2
    assert [o.mime for o in status.outputs] == ["image/png", "image/png"]
    images = [provider.download(o, max_bytes=10_000_000, timeout_s=30) for o in status.outputs]
    for data in images:
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "PNG"
            assert image.size == (96, 64)
    other_image = provider.download(other_status.outputs[0], max_bytes=10_000_000, timeout_s=30)
    assert images[0] != images[1]  # the output number is drawn on each
    assert other_image != images[0]
    assert status.outputs[0].url.startswith("http://127.0.0.1:")


def test_audio_model_gives_wav_of_requested_duration(provider: SandboxProvider) -> None:
    job = submit(provider, model="sandbox-audio-tone", prompt="a bell", duration_s=1.5)

    status = finished(provider, job)

    assert status.state is JobState.SUCCEEDED
    assert status.outputs[0].mime == "audio/wav"
    data = provider.download(status.outputs[0], max_bytes=10_000_000, timeout_s=30)
    with wave.open(io.BytesIO(data)) as reader:
        assert reader.getnchannels() == 1
        assert reader.getsampwidth() == 2
        assert reader.getnframes() / reader.getframerate() == pytest.approx(1.5)


def test_audio_isolation_lasts_as_long_as_the_uploaded_wav(provider: SandboxProvider) -> None:
    upload = io.BytesIO()
    with wave.open(upload, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(8000)
        writer.writeframes(b"\x00\x00" * 6000)  # 0.75 s
    job = submit(
        provider,
        model="sandbox-audio-isolation",
        files=(InputFile("voice.wav", "audio/wav", upload.getvalue()),),
        duration_s=5,
    )

    status = finished(provider, job)

    data = provider.download(status.outputs[0], max_bytes=10_000_000, timeout_s=30)
    with wave.open(io.BytesIO(data)) as reader:
        assert reader.getnframes() / reader.getframerate() == pytest.approx(0.75)


def test_video_model_gives_webm_of_requested_duration(provider: SandboxProvider) -> None:
    job = submit(provider, model="sandbox-video", prompt="a paper boat", duration_s=1.5)

    status = finished(provider, job)

    assert status.outputs[0].mime == "video/webm"
    data = provider.download(status.outputs[0], max_bytes=10_000_000, timeout_s=30)
    with av.open(io.BytesIO(data)) as container:
        assert "webm" in container.format.name
        assert container.streams.video[0].codec_context.name == "vp8"
        assert container.duration is not None
        assert container.duration / 1_000_000 == pytest.approx(1.5, abs=0.2)
        assert sum(1 for _ in container.decode(video=0)) == 15


@pytest.mark.parametrize(
    ("outcome", "state", "error_code", "outputs"),
    [
        ("fail", JobState.FAILED, "sandbox_failure", 0),
        ("reject", JobState.REJECTED, "content_policy", 0),
        ("partial", JobState.SUCCEEDED, "", 2),
    ],
)
def test_outcomes(
    provider: SandboxProvider, outcome: str, state: JobState, error_code: str, outputs: int
) -> None:
    job = submit(provider, sandbox_outcome=outcome, num_outputs=3, width=32, height=32)

    status = finished(provider, job)

    assert status.state is state
    assert status.error_code == error_code
    assert len(status.outputs) == outputs
    assert status.requested_outputs == 3
    assert status.raw["id"] == job


def test_latency_keeps_the_job_running_until_it_elapses(provider: SandboxProvider) -> None:
    started = time.monotonic()
    job = submit(provider, sandbox_latency_ms=600)

    assert provider.fetch_status(job).state is JobState.RUNNING
    status = finished(provider, job)

    assert status.state is JobState.SUCCEEDED
    assert time.monotonic() - started >= 0.55


def test_status_error_is_retryable(provider: SandboxProvider) -> None:
    job = submit(provider, sandbox_status="error")

    with pytest.raises(ProviderError) as caught:
        provider.fetch_status(job)

    assert caught.value.retryable is True
    assert caught.value.status == 503


def test_unknown_job_is_not_retryable(provider: SandboxProvider) -> None:
    with pytest.raises(ProviderError) as caught:
        provider.fetch_status("job_does_not_exist")

    assert caught.value.retryable is False
    assert caught.value.status == 404


def test_download_refuses_an_output_above_max_bytes(provider: SandboxProvider) -> None:
    status = finished(provider, submit(provider, width=256, height=256))

    with pytest.raises(ProviderError) as caught:
        provider.download(status.outputs[0], max_bytes=100, timeout_s=30)

    assert caught.value.code == "output_too_large"
    assert caught.value.retryable is False


# ---- cancel ----------------------------------------------------------------------------------


def test_cancel_stops_the_job_and_no_success_callback_follows(
    provider: SandboxProvider, receiver: Receiver
) -> None:
    job = submit(provider, sandbox_latency_ms=500, callback_url=receiver.url)

    provider.cancel(job)

    assert provider.fetch_status(job).state is JobState.CANCELLED
    time.sleep(0.8)  # past the time the job would have finished
    assert provider.fetch_status(job).state is JobState.CANCELLED
    assert {d.data["status"] for d in receiver.for_job(job)} <= {"cancelled"}
    provider.cancel(job)  # a finished job answers 409: not an error


def test_cancel_of_a_finished_job_is_not_an_error(provider: SandboxProvider) -> None:
    job = submit(provider)
    finished(provider, job)

    provider.cancel(job)

    assert provider.fetch_status(job).state is JobState.SUCCEEDED


# ---- callbacks -------------------------------------------------------------------------------


def test_callback_once(provider: SandboxProvider, receiver: Receiver) -> None:
    job = submit(provider, sandbox_latency_ms=100, callback_url=receiver.url)

    [delivery] = wait_until(lambda: receiver.for_job(job))
    time.sleep(0.3)

    assert len(receiver.for_job(job)) == 1
    event = provider.verify_callback(delivery.headers, delivery.body)
    assert event.event_id == delivery.webhook_id
    assert event.upstream_id == job
    assert event.state is JobState.SUCCEEDED
    assert event.payload["type"] == "job.updated"


def test_callback_early_arrives_before_the_result_then_the_final_one(
    provider: SandboxProvider, receiver: Receiver
) -> None:
    submitted = time.time()
    job = submit(
        provider, sandbox_latency_ms=400, sandbox_callback="early", callback_url=receiver.url
    )

    deliveries = wait_until(lambda: len(d := receiver.for_job(job)) >= 2 and d)

    early, final = (provider.verify_callback(d.headers, d.body) for d in deliveries)
    assert early.state is JobState.QUEUED
    assert deliveries[0].at < submitted + 0.4
    assert final.state is JobState.SUCCEEDED
    assert early.event_id != final.event_id


def test_callback_duplicate_repeats_the_same_webhook_id(
    provider: SandboxProvider, receiver: Receiver
) -> None:
    job = submit(provider, sandbox_callback="duplicate", callback_url=receiver.url)

    deliveries = wait_until(lambda: len(d := receiver.for_job(job)) >= 5 and d)
    time.sleep(0.3)

    assert len(receiver.for_job(job)) == 5
    ids = [d.webhook_id for d in deliveries]
    repeated = max(set(ids), key=ids.count)
    assert ids.count(repeated) == 3
    assert len({d.body for d in deliveries if d.webhook_id == repeated}) == 1
    assert len(set(ids)) == 3
    for d in deliveries:
        assert provider.verify_callback(d.headers, d.body).state is JobState.SUCCEEDED


def test_callback_none_never_calls(provider: SandboxProvider, receiver: Receiver) -> None:
    job = submit(provider, sandbox_callback="none", callback_url=receiver.url)

    assert finished(provider, job).state is JobState.SUCCEEDED
    time.sleep(0.5)

    assert receiver.for_job(job) == []


def test_callback_out_of_order_sends_a_stale_running_event_last(
    provider: SandboxProvider, receiver: Receiver
) -> None:
    job = submit(provider, sandbox_callback="out_of_order", callback_url=receiver.url)

    deliveries = wait_until(lambda: len(d := receiver.for_job(job)) >= 2 and d)

    final, stale = (provider.verify_callback(d.headers, d.body) for d in deliveries)
    assert final.state is JobState.SUCCEEDED
    assert stale.state is JobState.RUNNING
    assert final.event_id != stale.event_id


def test_failed_delivery_is_retried_with_the_same_webhook_id(
    provider: SandboxProvider, receiver: Receiver
) -> None:
    job = submit(provider, callback_url=receiver.flaky_url)

    first, retry = wait_until(lambda: len(d := receiver.for_job(job)) >= 2 and d)

    assert first.webhook_id == retry.webhook_id
    assert first.body == retry.body


# ---- signature verification ------------------------------------------------------------------


def test_verify_callback_accepts_a_valid_signature_with_any_header_case(
    sandbox_process: SandboxProcess,  # noqa: F811
) -> None:
    provider = SandboxProvider(sandbox_process.base_url, sandbox_process.secret)
    body = b'{"type":"job.updated","data":{"id":"job_1","status":"succeeded"}}'

    event = provider.verify_callback(
        sign(sandbox_process.secret, body, at=datetime.now(tz=UTC)), body
    )

    assert (event.event_id, event.upstream_id, event.state) == (
        "msg_test",
        "job_1",
        JobState.SUCCEEDED,
    )


@pytest.mark.parametrize(
    "tamper",
    ["body", "wrong_secret", "old_timestamp", "future_timestamp", "no_signature"],
)
def test_verify_callback_refuses(
    sandbox_process: SandboxProcess,  # noqa: F811
    tamper: str,
) -> None:
    secret = sandbox_process.secret
    provider = SandboxProvider(sandbox_process.base_url, secret)
    body = b'{"type":"job.updated","data":{"id":"job_1","status":"succeeded"}}'
    at = datetime.now(tz=UTC)
    if tamper == "wrong_secret":
        secret = new_secret()
    elif tamper == "old_timestamp":
        at -= timedelta(minutes=6)
    elif tamper == "future_timestamp":
        at += timedelta(minutes=6)
    headers = sign(secret, body, at=at)
    if tamper == "body":
        body = body.replace(b"job_1", b"job_2")
    elif tamper == "no_signature":
        del headers["Webhook-Signature"]

    with pytest.raises(InvalidSignature):
        provider.verify_callback(headers, body)


# ---- the process itself ----------------------------------------------------------------------


def test_reset_clears_jobs_and_stats() -> None:
    secret = new_secret()
    base_url, process = start_sandbox(secret)
    try:
        provider = SandboxProvider(base_url, secret)
        job = submit(provider)

        httpx.post(f"{base_url}/v1/_reset", trust_env=False).raise_for_status()

        assert httpx.get(f"{base_url}/v1/stats", trust_env=False).json() == {
            "jobs_created": 0,
            "submits": 0,
            "by_key": {},
            "callbacks_sent": 0,
            "callbacks_failed": 0,
        }
        with pytest.raises(ProviderError):
            provider.fetch_status(job)
    finally:
        stop_sandbox(process)
    assert process.returncode == 0


def test_sandbox_imports_nothing_from_django_or_rivya() -> None:
    code = (
        "import sys, tasks.sandbox.server, tasks.sandbox.__main__\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('django', 'rivya', 'billing', 'chat', 'notifications')"
        " or m.startswith('tasks.') and not m.startswith('tasks.sandbox')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, check=True)  # noqa: S603
