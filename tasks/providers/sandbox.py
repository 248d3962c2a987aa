"""Adapter for the sandbox upstream (docs/sandbox.md; the server is ``tasks.sandbox``).

It is written like any vendor adapter: HTTP only through ``tasks.providers.http``, dataclasses in
and out, ``ProviderError`` saying whether a retry may help, Standard Webhooks verification over
the raw body.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import quote

import httpx
from standardwebhooks import Webhook

from tasks.providers import http
from tasks.providers.base import (
    CallbackEvent,
    ChatDelta,
    ChatEnd,
    ChatRequest,
    ChatToolCall,
    ChatUsage,
    CompletionRequest,
    CompletionResult,
    InputFile,
    InputRejected,
    InvalidSignature,
    JobState,
    JobStatus,
    Output,
    ProviderError,
    SpeechRequest,
    SpeechResult,
    SubmitRequest,
    SubmitResult,
    TranscriptionRequest,
    TranscriptionResult,
    TranslationRequest,
    TranslationResult,
    Word,
)

# Standard Webhooks' tolerance. The library checks it too, but we do not rely on a vendor
# helper for it (some check only the HMAC).
TIMESTAMP_TOLERANCE_S = 5 * 60


class SandboxProvider:
    key = "sandbox"

    def __init__(
        self,
        base_url: str,
        webhook_secret: str,
        *,
        chat_read_timeout_s: float = http.STREAM_READ_TIMEOUT_S,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._chat_read_timeout_s = chat_read_timeout_s
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

    async def stream_chat(self, request: ChatRequest) -> AsyncIterator[ChatDelta | ChatEnd]:
        """The reply as the sandbox streams it (``POST /v1/chat/completions``, OpenAI-shaped
        server-sent events); the contract is ``Provider.stream_chat``'s. Once the final event
        (finish or error) has arrived the reply is complete: a connection that breaks after it
        still ends with that ``ChatEnd``."""
        body = {
            "model": request.model,
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            "max_tokens": request.max_tokens,
            "stream": True,
            "params": dict(request.params),
        }
        if request.tools:
            body["tools"] = [
                {
                    "type": "function",
                    "function": {
                        "name": tool.name,
                        "description": tool.description,
                        "parameters": dict(tool.parameters),
                    },
                }
                for tool in request.tools
            ]
        url = f"{self._base_url}/v1/chat/completions"
        end: ChatEnd | None = None
        calls = _ToolCalls()
        try:
            async with http.astream(
                "POST", url, json=body, read_timeout_s=self._chat_read_timeout_s
            ) as response:
                if not 200 <= response.status_code < 300:
                    await response.aread()
                    _raise_for_status(response)
                content_type = response.headers.get("content-type", "")
                if not content_type.startswith("text/event-stream"):
                    raise ProviderError(
                        f"sandbox chat answered {content_type or 'no content type'}, "
                        "not an event stream",
                        retryable=True,
                        code="upstream_bad_response",
                        maybe_received=True,
                    )
                async for data in http.aiter_sse(response):
                    if data == "[DONE]":
                        break
                    if end is not None:
                        continue  # nothing after the final event changes the reply
                    event = _chat_event(data)
                    if "error" in event:
                        end = _chat_error_end(event)
                        continue
                    text, finish_reason = _chat_choice(event)
                    calls.add(event)
                    if text:
                        yield ChatDelta(text=text)
                    if finish_reason is not None:
                        end = ChatEnd(
                            usage=_chat_usage(event),
                            finish_reason=finish_reason,
                            tool_calls=calls.complete(),
                        )
        except ProviderError as exc:
            # A transport error after the final event: the reply is complete all the same.
            if end is None or exc.code not in _TRANSPORT_CODES:
                raise
        if end is None:
            raise ProviderError(
                "sandbox chat stream ended before its final event",
                retryable=True,
                code="upstream_stream_incomplete",
                maybe_received=True,
            )
        yield end

    # ---- synchronous services (POST /v1/translate, /completions, /speech, /transcriptions) --

    async def _single(self, path: str, body: dict[str, Any], timeout_s: float) -> httpx.Response:
        """POST ``body`` to a synchronous service within ``timeout_s``: a 2xx answer, else
        ``InputRejected`` for a 422 naming its code (the input itself is refused: an
        unsupported language or voice, unreadable audio, a content policy), else the usual
        ``ProviderError`` for the status (a 5xx such as ``sandbox_failure`` is retryable)."""
        response = await http.arequest(
            "POST", f"{self._base_url}{path}", json=body, timeout_s=timeout_s
        )
        if response.status_code == 422:
            code = _error_code(response)
            if code:
                raise InputRejected(
                    f"sandbox refused the input: {_error_message(response) or code}",
                    code=code,
                    status=422,
                )
        _raise_for_status(response)
        return response

    async def translate(
        self, request: TranslationRequest, *, timeout_s: float
    ) -> TranslationResult:
        """``POST /v1/translate``. ``characters`` is what the sandbox counted (the text's
        length in code points)."""
        response = await self._single(
            "/v1/translate",
            {
                "model": request.model,
                "text": request.text,
                "source_language": request.source_language,
                "target_language": request.target_language,
                "params": dict(request.params),
            },
            timeout_s,
        )
        data = _json(response, maybe_received=True)
        text, characters = data.get("text"), data.get("characters")
        if not isinstance(text, str) or not _count(characters):
            raise _single_bad("translation", "no text or characters")
        return TranslationResult(text=text, characters=characters)

    async def complete(self, request: CompletionRequest, *, timeout_s: float) -> CompletionResult:
        """``POST /v1/completions``: one whole completion (not streamed). ``finish_reason``
        is "length" when ``max_tokens`` cut it, else "stop"; ``usage`` None when the answer
        has none."""
        response = await self._single(
            "/v1/completions",
            {
                "model": request.model,
                "prompt": request.prompt,
                "max_tokens": request.max_tokens,
                "params": dict(request.params),
                "files": [_file_json(f) for f in request.files],
            },
            timeout_s,
        )
        data = _json(response, maybe_received=True)
        text, reason, usage = data.get("text"), data.get("finish_reason"), data.get("usage")
        if not isinstance(text, str) or not isinstance(reason, str):
            raise _single_bad("completion", "no text or finish_reason")
        result_usage: ChatUsage | None = None
        if usage is not None:
            counts = (
                (usage.get("input_tokens"), usage.get("output_tokens"))
                if isinstance(usage, dict)
                else (None, None)
            )
            if not all(_count(c) for c in counts):
                raise _single_bad("completion", f"usage {usage!r}")
            result_usage = ChatUsage(input_tokens=counts[0], output_tokens=counts[1])
        return CompletionResult(
            text=text, finish_reason="length" if reason == "length" else "stop", usage=result_usage
        )

    async def synthesize_speech(self, request: SpeechRequest, *, timeout_s: float) -> SpeechResult:
        """``POST /v1/speech``: the answer's body is the audio itself (``audio/wav``), its
        length in ``X-Duration-Ms`` and the voice used in ``X-Voice``. An empty voice asks
        for the sandbox's default ("aria")."""
        response = await self._single(
            "/v1/speech",
            {
                "model": request.model,
                "text": request.text,
                "voice": request.voice or None,
                "params": dict(request.params),
            },
            timeout_s,
        )
        mime = response.headers.get("content-type", "").split(";")[0].strip()
        duration = response.headers.get("x-duration-ms", "")
        if not mime.startswith("audio/") or not duration.isdigit() or not response.content:
            raise _single_bad("speech", f"{mime or 'no content type'}, duration {duration!r}")
        return SpeechResult(
            audio=response.content,
            mime=mime,
            duration_ms=int(duration),
            voice=response.headers.get("x-voice") or request.voice,
        )

    async def transcribe(
        self, request: TranscriptionRequest, *, timeout_s: float
    ) -> TranscriptionResult:
        """``POST /v1/transcriptions``: the text, the language (the one asked for, else the
        detected one) and per-word timings measured from the audio. Audio the sandbox cannot
        decode raises ``InputRejected(code="unreadable_audio")``."""
        response = await self._single(
            "/v1/transcriptions",
            {
                "model": request.model,
                "language": request.language,
                "params": dict(request.params),
                "audio": _file_json(request.audio),
            },
            timeout_s,
        )
        data = _json(response, maybe_received=True)
        text, language = data.get("text"), data.get("language")
        duration, words = data.get("duration_ms"), data.get("words")
        if not isinstance(text, str) or not isinstance(language, str) or not _count(duration):
            raise _single_bad("transcription", "no text, language or duration_ms")
        if not isinstance(words, list):
            raise _single_bad("transcription", "words is not a list")
        parsed: list[Word] = []
        for word in words:
            try:
                item = Word(
                    text=str(word["text"]),
                    start_ms=int(word["start_ms"]),
                    end_ms=int(word["end_ms"]),
                    confidence=float(word["confidence"]),
                )
            except (KeyError, TypeError, ValueError):
                raise _single_bad("transcription", f"word {word!r}") from None
            parsed.append(item)
        return TranscriptionResult(
            text=text, language=language, duration_ms=duration, words=tuple(parsed)
        )


def _file_json(file: InputFile) -> dict[str, str]:
    return {"name": file.name, "mime": file.mime, "data_b64": base64.b64encode(file.data).decode()}


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _single_bad(service: str, detail: str) -> ProviderError:
    # A 2xx we cannot read: the sandbox did the work (and would bill it), we cannot use it.
    return ProviderError(
        f"unreadable sandbox {service} answer: {detail}",
        retryable=True,
        code="upstream_bad_response",
        maybe_received=True,
    )


_TRANSPORT_CODES = frozenset({"upstream_unreachable", "upstream_protocol_error"})


def _chat_bad(detail: str) -> ProviderError:
    return ProviderError(
        f"unreadable sandbox chat event: {detail}",
        retryable=True,
        code="upstream_bad_response",
        maybe_received=True,
    )


def _chat_event(data: str) -> dict[str, Any]:
    try:
        event = json.loads(data, parse_constant=_not_json)
    except (ValueError, RecursionError):
        raise _chat_bad(repr(data[:200])) from None
    if not isinstance(event, dict):
        raise _chat_bad(repr(data[:200]))
    return event


def _chat_choice(event: dict[str, Any]) -> tuple[str, str | None]:
    """A chunk's text and finish reason ("stop" | "length", or None while the reply goes on).
    A vendor's other reasons (e.g. a content filter) end the reply normally: "stop"."""
    choices = event.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise _chat_bad("no choices")
    choice = choices[0]
    delta = choice.get("delta") or {}
    if not isinstance(delta, dict):
        raise _chat_bad("delta is not an object")
    text = delta.get("content") or ""
    if not isinstance(text, str):
        raise _chat_bad("content is not a string")
    reason = choice.get("finish_reason")
    if reason is None:
        return text, None
    if not isinstance(reason, str):
        raise _chat_bad("finish_reason is not a string")
    return text, reason if reason in ("length", "tool_calls") else "stop"


class _ToolCalls:
    """Tool calls as OpenAI streams them: pieces under ``delta.tool_calls``, each with the
    ``index`` of the call it continues; the id and name come once, the arguments text in
    pieces. Bounded: a reply with more calls, or longer texts, than any real one is broken."""

    MAX_CALLS = 16
    MAX_TEXT = 100_000

    def __init__(self) -> None:
        self.calls: dict[int, dict[str, str]] = {}

    def add(self, event: dict[str, Any]) -> None:
        delta = event["choices"][0].get("delta") or {}
        pieces = delta.get("tool_calls")
        if pieces is None:
            return
        if not isinstance(pieces, list):
            raise _chat_bad("tool_calls is not a list")
        for piece in pieces:
            index = piece.get("index") if isinstance(piece, dict) else None
            function = piece.get("function") or {} if isinstance(piece, dict) else None
            if not isinstance(index, int) or not isinstance(function, dict):
                raise _chat_bad("a tool call without an index or function")
            if index not in self.calls and len(self.calls) >= self.MAX_CALLS:
                raise _chat_bad(f"more than {self.MAX_CALLS} tool calls")
            call = self.calls.setdefault(index, {"id": "", "name": "", "arguments": ""})
            for key, value in (
                ("id", piece.get("id")),
                ("name", function.get("name")),
                ("arguments", function.get("arguments")),
            ):
                if value is None:
                    continue
                if not isinstance(value, str):
                    raise _chat_bad(f"tool call {key} is not a string")
                call[key] = call[key] + value if key == "arguments" else value
                if len(call[key]) > self.MAX_TEXT:
                    raise _chat_bad(f"a tool call's {key} over {self.MAX_TEXT} characters")

    def complete(self) -> tuple[ChatToolCall, ...]:
        return tuple(
            ChatToolCall(
                id=call["id"] or f"call_{index}", name=call["name"], arguments=call["arguments"]
            )
            for index, call in sorted(self.calls.items())
        )


def _chat_usage(event: dict[str, Any]) -> ChatUsage | None:
    usage = event.get("usage")
    if usage is None:
        return None
    if not isinstance(usage, dict):
        raise _chat_bad("usage is not an object")
    counts = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
        raise _chat_bad(f"usage counts {counts!r}")
    return ChatUsage(input_tokens=counts[0], output_tokens=counts[1])


# Errors that will happen again whatever we retry: the input itself is refused.
_PERMANENT_CHAT_ERRORS = frozenset({"content_policy", "invalid_request"})


def _chat_error_end(event: dict[str, Any]) -> ChatEnd:
    """The error event that ends a failed stream: ``{"error": {code, message}, "usage"?}``."""
    error = event.get("error")
    if not isinstance(error, dict):
        raise _chat_bad("error is not an object")
    code = str(error.get("code") or "upstream_error")
    message = str(error.get("message") or "the sandbox failed mid-stream")
    return ChatEnd(
        usage=_chat_usage(event),
        finish_reason="error",
        error=ProviderError(
            f"sandbox chat failed mid-stream: {message}",
            retryable=code not in _PERMANENT_CHAT_ERRORS,
            code=code,
        ),
    )


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


def _error_message(response: httpx.Response) -> str | None:
    try:
        message = (response.json().get("error") or {}).get("message")
    except (ValueError, AttributeError):
        return None
    return message if isinstance(message, str) else None


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
