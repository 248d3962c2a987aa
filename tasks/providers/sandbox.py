"""Adapter for the sandbox upstream (docs/sandbox.md; the server is ``tasks.sandbox``).

It is written like any vendor adapter: HTTP only through ``tasks.providers.http``, dataclasses in
and out, ``ProviderError`` saying whether a retry may help, Standard Webhooks verification over
the raw body.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import httpx
from standardwebhooks import Webhook

from tasks.providers import http
from tasks.providers.base import (
    CallbackEvent,
    InvalidSignature,
    JobState,
    JobStatus,
    Output,
    ProviderError,
    SubmitRequest,
    SubmitResult,
)

# Standard Webhooks' tolerance. The library checks it too, but we do not rely on a vendor
# helper for it (some check only the HMAC).
TIMESTAMP_TOLERANCE_S = 5 * 60


class SandboxProvider:
    key = "sandbox"

    def __init__(self, base_url: str, webhook_secret: str) -> None:
        self._base_url = base_url.rstrip("/")
        try:
            self._webhook = Webhook(webhook_secret)
        except Exception as exc:
            raise ValueError(f"invalid sandbox webhook secret: {exc}") from exc

    def _job_url(self, upstream_id: str, suffix: str = "") -> str:
        return f"{self._base_url}/v1/jobs/{quote(upstream_id, safe='')}{suffix}"

    def submit(self, request: SubmitRequest) -> SubmitResult:
        body = {
            "model": request.upstream_model,
            "prompt": request.prompt,
            "params": dict(request.params),
            "files": [
                {"name": f.name, "mime": f.mime, "data_b64": base64.b64encode(f.data).decode()}
                for f in request.files
            ],
            "webhook_url": request.callback_url,
        }
        # The sandbox answers 201 for a new job and 200 with the same job for a repeated
        # Idempotency-Key, so a retried submit never creates a second job.
        response = http.request(
            "POST",
            f"{self._base_url}/v1/jobs",
            json=body,
            headers={"Idempotency-Key": request.idempotency_key},
        )
        _raise_for_status(response)
        # A 2xx we cannot read still means the provider acted: the job may exist.
        data = _json(response, maybe_received=True)
        upstream_id = data.get("id")
        if not isinstance(upstream_id, str) or not upstream_id:
            raise ProviderError(
                "sandbox submit answer has no job id",
                retryable=True,
                code="upstream_bad_response",
                maybe_received=True,
            )
        return SubmitResult(upstream_id=upstream_id)

    def fetch_status(self, upstream_id: str) -> JobStatus:
        response = http.request("GET", self._job_url(upstream_id))
        if response.status_code == 404 and _error_code(response) == "not_found":
            # The sandbox (like vendors that expire jobs) no longer has this job: say so
            # distinctly, so the caller can stop waiting for it.
            raise ProviderError(
                f"no job {upstream_id} upstream", retryable=False, code="job_not_found", status=404
            )
        _raise_for_status(response)
        return _job_status(_json(response))

    def find_job(self, idempotency_key: str) -> JobStatus | None:
        response = http.request(
            "GET", f"{self._base_url}/v1/jobs", params={"idempotency_key": idempotency_key}
        )
        _raise_for_status(response)
        jobs = _json(response).get("data")
        if not isinstance(jobs, list):
            raise ProviderError(
                "sandbox job search answer has no list",
                retryable=True,
                code="upstream_bad_response",
            )
        if not jobs:
            return None
        if not isinstance(jobs[0], dict):
            raise ProviderError(
                "sandbox job search answer is unreadable",
                retryable=True,
                code="upstream_bad_response",
            )
        return _job_status(jobs[0])

    def cancel(self, upstream_id: str) -> None:
        response = http.request("POST", self._job_url(upstream_id, "/cancel"))
        if response.status_code == 409:
            # The job already finished (the sandbox answers 409 with the job): nothing to stop.
            # The caller learns the real outcome from fetch_status().
            return
        _raise_for_status(response)

    def verify_callback(self, headers: Mapping[str, str], body: bytes) -> CallbackEvent:
        """Verify a Standard Webhooks delivery over the raw ``body`` bytes, exactly as received
        (re-serialized JSON would not match the signature). Raises ``InvalidSignature`` for a
        missing, wrong or stale signature;
        ``ProviderError`` (not retryable) for a correctly signed body that is not a job event.
        The event's claims are a hint only: callers re-fetch the status before acting."""
        lowered = {k.lower(): v for k, v in headers.items()}
        event_id = lowered.get("webhook-id", "")
        timestamp = lowered.get("webhook-timestamp", "")
        if not event_id or not timestamp or not lowered.get("webhook-signature"):
            raise InvalidSignature("missing webhook-id, webhook-timestamp or webhook-signature")
        try:
            sent_at = int(timestamp)
        except ValueError:
            raise InvalidSignature("webhook-timestamp is not an integer") from None
        if abs(time.time() - sent_at) > TIMESTAMP_TOLERANCE_S:
            raise InvalidSignature("webhook-timestamp outside the 5-minute tolerance")
        try:
            # Accepts any of several space-separated "v1,<sig>" entries (secret rotation) and
            # compares in constant time.
            self._webhook.verify(body, lowered, json_parse=False)
        except Exception as exc:  # the library raises assorted errors on malformed headers
            raise InvalidSignature(f"signature does not verify: {exc}") from None

        try:
            # NaN/Infinity are not JSON (and PostgreSQL's jsonb refuses them): not an event.
            payload = json.loads(body, parse_constant=_not_json)
            data = payload["data"]
            upstream_id = data["id"]
        except (ValueError, TypeError, KeyError, RecursionError) as exc:
            raise ProviderError(
                f"sandbox callback is not a job event: {type(exc).__name__}",
                retryable=False,
                code="invalid_callback",
            ) from None
        if not isinstance(upstream_id, str) or not upstream_id.strip():
            # An empty id would match every task that has no upstream id yet.
            raise ProviderError(
                "sandbox callback has no job id", retryable=False, code="invalid_callback"
            )
        try:
            state: JobState | None = JobState(data.get("status"))
        except ValueError:
            state = None
        return CallbackEvent(
            event_id=event_id, upstream_id=upstream_id, state=state, payload=payload
        )

    def status_from_callback(self, payload: Mapping[str, Any]) -> JobStatus | None:
        """The sandbox signs the whole body (Standard Webhooks), so its job data can be
        trusted as it stands; an unreadable one returns None (then we ask the sandbox)."""
        data = payload.get("data") if isinstance(payload, Mapping) else None
        if not isinstance(data, dict):
            return None
        try:
            return _job_status(data)
        except ProviderError:
            return None

    def download(self, output: Output, *, max_bytes: int, timeout_s: float) -> bytes:
        deadline = time.monotonic() + timeout_s
        with http.stream("GET", output.url) as response:
            if not 200 <= response.status_code < 300:
                response.read()
                _raise_for_status(response)
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise _too_large(output, max_bytes)
            chunks: list[bytes] = []
            total = 0
            # Content-Length can be absent or wrong: count what actually arrives.
            for chunk in response.iter_bytes():
                total += len(chunk)
                if total > max_bytes:
                    raise _too_large(output, max_bytes)
                if time.monotonic() > deadline:
                    raise ProviderError(
                        f"output {output.url} took longer than {timeout_s:.0f} s to download",
                        retryable=True,
                        code="download_too_slow",
                    )
                chunks.append(chunk)
        return b"".join(chunks)


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def _too_large(output: Output, max_bytes: int) -> ProviderError:
    return ProviderError(
        f"output {output.url} is larger than {max_bytes} bytes",
        retryable=False,
        code="output_too_large",
    )


def _error_code(response: httpx.Response) -> str | None:
    try:
        return (response.json().get("error") or {}).get("code")
    except (ValueError, AttributeError):
        return None


def _raise_for_status(response: httpx.Response) -> None:
    """Map an error answer, keeping the sandbox's own error code and message
    (``{"error": {"code", "message"}}``) when the body has them."""
    if 200 <= response.status_code < 300:
        return
    code = message = None
    try:
        error = response.json().get("error") or {}
        code = error.get("code") or None
        message = error.get("message") or None
    except (ValueError, AttributeError):
        pass
    if message is not None:
        message = f"sandbox HTTP {response.status_code}: {message}"
    http.raise_for_status(response, code=code, message=message)


def _json(response: httpx.Response, *, maybe_received: bool = False) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise ProviderError(
            f"sandbox answered HTTP {response.status_code} with a non-object body",
            retryable=True,
            code="upstream_bad_response",
            maybe_received=maybe_received,
        )
    return data


def _job_status(data: dict[str, Any]) -> JobStatus:
    try:
        state = JobState(data["status"])
        outputs = tuple(Output(url=o["url"], mime=o["mime"]) for o in data.get("outputs") or ())
        requested = data.get("requested_outputs")
        error = data.get("error") or {}
        return JobStatus(
            upstream_id=str(data["id"]),
            state=state,
            outputs=outputs,
            requested_outputs=int(requested) if requested is not None else None,
            error_code=str(error.get("code") or ""),
            error_message=str(error.get("message") or ""),
            raw=data,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        # An answer we cannot read says nothing about the job; asking again later may help.
        raise ProviderError(
            f"unreadable sandbox job: {exc!r}", retryable=True, code="upstream_bad_response"
        ) from None
