"""The one typed interface every upstream sits behind.

Adapters take and return the dataclasses below, touch neither models nor money, do all HTTP
through ``tasks.providers.http``, and raise ``ProviderError`` saying whether a retry may help.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"  # the upstream found the input invalid (content policy, bad file, ...)
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.REJECTED, JobState.CANCELLED)


@dataclass(frozen=True)
class InputFile:
    name: str
    mime: str
    data: bytes


@dataclass(frozen=True)
class SubmitRequest:
    idempotency_key: str  # our task id: a retried submit never creates a second upstream job
    upstream_model: str
    prompt: str
    params: Mapping[str, Any]
    files: tuple[InputFile, ...] = ()
    callback_url: str | None = None  # None: the upstream must not call back (polling only)


@dataclass(frozen=True)
class SubmitResult:
    upstream_id: str


@dataclass(frozen=True)
class Output:
    url: str  # the provider's (often expiring) URL; we copy the bytes into our storage
    mime: str


@dataclass(frozen=True)
class JobStatus:
    upstream_id: str
    state: JobState
    outputs: tuple[Output, ...] = ()
    # What the provider says it was asked for: informational only (billing uses the task's own
    # num_outputs, tasks.pricing.output_count).
    requested_outputs: int | None = None
    error_code: str = ""
    error_message: str = ""
    raw: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CallbackEvent:
    event_id: str  # the provider's delivery id: each is processed once
    upstream_id: str
    state: JobState | None  # what the callback claims; we re-fetch the status before acting
    payload: Mapping[str, Any]


class ProviderError(Exception):
    """An upstream call failed. ``retryable``: the same call may succeed later.

    Codes with a meaning the lifecycle relies on: ``job_not_found`` (fetch_status: the provider
    does not have this job, so it will neither deliver nor bill).

    ``maybe_received``: the request may have reached the provider and been acted on although
    we got no answer (a read timeout, a connection dropped after sending). A submit failing
    that way may have created the job, so it is never refunded on that basis alone. False when
    the request provably never left (connect errors) or the provider answered.
    """

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        code: str = "provider_error",
        status: int | None = None,
        maybe_received: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.code = code
        self.status = status
        self.maybe_received = maybe_received


# ---- chat (streamed language-model replies) --------------------------------------------------


@dataclass(frozen=True)
class ChatTurnMessage:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True)
class ChatTool:
    """A tool the model may call (OpenAI's function tools): its name, what it does, and a JSON
    Schema of its arguments."""

    name: str
    description: str
    parameters: Mapping[str, Any]


@dataclass(frozen=True)
class ChatToolCall:
    """A call the model made: the provider's id for it, the tool's name, and the arguments as
    the model wrote them (a JSON text, not yet checked)."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ChatRequest:
    model: str  # the provider's model id (AIModel.upstream_model)
    messages: tuple[ChatTurnMessage, ...]
    max_tokens: int
    params: Mapping[str, Any]  # the model's own options, e.g. sandbox_* knobs
    tools: tuple[ChatTool, ...] = ()  # what the model may call (chat.tools)


@dataclass(frozen=True)
class ChatUsage:
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class ChatDelta:
    text: str


@dataclass(frozen=True)
class ChatEnd:
    usage: ChatUsage | None  # None when the provider reported none
    finish_reason: str  # "stop" | "length" | "error" | "tool_calls"
    error: ProviderError | None = None  # set when the provider failed mid-stream
    tool_calls: tuple[ChatToolCall, ...] = ()  # what the model called, in order


# ---- synchronous ("single") services: one request, one answer ------------------------------
# Called on an event loop (``await provider.translate(...)``), each bounded by ``timeout_s`` in
# all. An answer saying the input itself is unusable (unreadable audio, a content policy) raises
# ``InputRejected``; every other failure a ``ProviderError``.


@dataclass(frozen=True)
class TranslationRequest:
    model: str  # the provider's model id (AIModel.upstream_model)
    text: str
    source_language: str  # ISO 639-1, e.g. "en"
    target_language: str
    params: Mapping[str, Any]


@dataclass(frozen=True)
class TranslationResult:
    text: str
    characters: int  # characters of the source text the provider counted (what it bills)


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompt: str
    max_tokens: int
    params: Mapping[str, Any]
    files: tuple[InputFile, ...] = ()


@dataclass(frozen=True)
class CompletionResult:
    text: str
    finish_reason: str  # "stop" | "length"
    usage: ChatUsage | None


@dataclass(frozen=True)
class SpeechRequest:
    model: str
    text: str
    voice: str
    params: Mapping[str, Any]


@dataclass(frozen=True)
class SpeechResult:
    audio: bytes
    mime: str  # e.g. "audio/wav"
    duration_ms: int
    voice: str


@dataclass(frozen=True)
class TranscriptionRequest:
    model: str
    audio: InputFile
    language: str | None  # ISO 639-1; None: let the provider detect it
    params: Mapping[str, Any]


@dataclass(frozen=True)
class Word:
    text: str
    start_ms: int
    end_ms: int
    confidence: float  # 0..1


@dataclass(frozen=True)
class TranscriptionResult:
    text: str
    language: str
    duration_ms: int
    words: tuple[Word, ...]


class InputRejected(ProviderError):
    """The provider refused the input itself (content policy, an unreadable or unsupported
    file): the task is REJECTED, not FAILED, and a retry with the same input will not help."""

    def __init__(self, message: str, *, code: str = "input_rejected", status: int | None = None):
        super().__init__(message, retryable=False, code=code, status=status)


class InvalidSignature(Exception):
    """A callback whose signature (or timestamp) does not verify: refused with 401."""


class Provider(Protocol):
    key: str

    def submit(self, request: SubmitRequest) -> SubmitResult: ...

    def fetch_status(self, upstream_id: str) -> JobStatus: ...

    def find_job(self, idempotency_key: str) -> JobStatus | None:
        """The job created under ``idempotency_key`` (our task id), or None when the provider
        says it has none. Asked before refunding a task whose submission may have reached the
        provider without a clear answer. Raises ProviderError when it cannot tell."""
        ...

    def cancel(self, upstream_id: str) -> None: ...

    def verify_callback(self, headers: Mapping[str, str], body: bytes) -> CallbackEvent: ...

    def status_from_callback(self, payload: Mapping[str, Any]) -> JobStatus | None:
        """The job status a verified callback carries, or None when the provider's signature
        does not cover the body (then we ask the provider: an unsigned body is not trusted)."""
        ...

    def download(self, output: Output, *, max_bytes: int, timeout_s: float) -> bytes:
        """The output's bytes: at most ``max_bytes`` (else a permanent ProviderError), within
        ``timeout_s`` in all (else a retryable one: a slow trickle must not outlive the lease
        on storing the outputs)."""
        ...

    async def translate(
        self, request: TranslationRequest, *, timeout_s: float
    ) -> TranslationResult: ...

    async def complete(
        self, request: CompletionRequest, *, timeout_s: float
    ) -> CompletionResult: ...

    async def synthesize_speech(
        self, request: SpeechRequest, *, timeout_s: float
    ) -> SpeechResult: ...

    async def transcribe(
        self, request: TranscriptionRequest, *, timeout_s: float
    ) -> TranscriptionResult: ...

    def stream_chat(self, request: ChatRequest) -> AsyncIterator[ChatDelta | ChatEnd]:
        """A streamed chat reply (an async generator; close it with ``aclose()`` when you stop
        early, which closes the upstream connection).

        An error answer before streaming raises ``ProviderError`` (code, message and
        ``retryable`` from the answer, as for ``submit``). Then it yields ``ChatDelta`` items
        and exactly one ``ChatEnd``, last. An error event mid-stream ends it with
        ``ChatEnd(finish_reason="error", error=ProviderError(...), usage=<reported or None>)``.
        A connection that breaks mid-stream, a read timeout between tokens or an unreadable
        event raises ``ProviderError(retryable=True)`` after whatever deltas came."""
        ...
