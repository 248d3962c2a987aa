"""The seed catalog: sandbox models covering every category (``manage.py seed_catalog``)."""

from __future__ import annotations

from typing import Any

from django.db import transaction

from tasks.models import AIModel, Category, SingleType

C = 1_000_000

# Every sandbox model accepts these knobs (docs/sandbox.md): any client can drive the sandbox's
# upstream behaviours deterministically through the public API.
SANDBOX_KNOBS: dict[str, Any] = {
    "sandbox_latency_ms": {
        "type": "integer",
        "minimum": 0,
        "maximum": 600_000,
        "default": 0,
        "description": "time until the upstream job finishes",
    },
    "sandbox_outcome": {"enum": ["success", "fail", "reject", "partial"], "default": "success"},
    "sandbox_callback": {
        "enum": ["once", "early", "duplicate", "none", "out_of_order"],
        "default": "once",
    },
    "sandbox_status": {"enum": ["ok", "error"], "default": "ok"},
    "sandbox_submit": {
        "enum": ["ok", "error", "invalid", "error_after_create", "in_progress", "busy"],
        "default": "ok",
    },
    "sandbox_cancel": {"enum": ["honour", "ignore"], "default": "honour"},
    "sandbox_submit_delay_ms": {"type": "integer", "minimum": 0, "maximum": 30_000, "default": 0},
}


def _schema(**properties: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {**properties, **SANDBOX_KNOBS},
    }


# The sandbox's chat knobs (docs/sandbox.md): how the streamed reply behaves.
# Makes the sandbox model call a tool (chat/tools.py) with these arguments, after its reply.
TOOL_CALL_KNOB: dict[str, Any] = {
    "type": ["object", "array"],
    "description": 'call a tool: {"tool": "generate_image", "arguments": {"prompt": "a red '
    'fox"}}, or a list of such calls',
}

CHAT_KNOBS: dict[str, Any] = {
    "sandbox_latency_ms": {
        "type": "integer",
        "minimum": 0,
        "maximum": 600_000,
        "default": 0,
        "description": "time until the first token",
    },
    "sandbox_token_delay_ms": {
        "type": "integer",
        "minimum": 0,
        "maximum": 5_000,
        "default": 2,
        "description": "time between tokens",
    },
    "sandbox_reply_tokens": {
        "type": "integer",
        "minimum": 0,
        "maximum": 8_192,
        "default": 120,
        "description": "length of the reply (cut by max_tokens)",
    },
    "sandbox_outcome": {
        "enum": ["success", "fail", "reject", "drop"],
        "default": "success",
        "description": "fail: an error event mid-stream; reject: refused before streaming; "
        "drop: the connection breaks mid-stream",
    },
    "sandbox_fail_after_tokens": {
        "type": "integer",
        "minimum": 0,
        "maximum": 8_192,
        "description": "tokens before fail / drop (default: half the reply)",
    },
    "sandbox_usage": {
        "enum": ["exact", "over", "omit"],
        "default": "exact",
        "description": "over: reports more tokens than it streamed; omit: reports no usage",
    },
    "sandbox_callback": {"enum": ["once", "early", "duplicate", "none", "out_of_order"]},
    "sandbox_status": {"enum": ["ok", "error"]},
    "sandbox_tool_call": TOOL_CALL_KNOB,
}


def _chat_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "temperature": {
                "type": "number",
                "minimum": 0,
                "maximum": 2,
                "default": 1,
                "description": "randomness of the reply (the sandbox ignores it)",
            },
            **CHAT_KNOBS,
        },
    }


# The sandbox's knobs for synchronous services (docs/sandbox.md).
SINGLE_KNOBS: dict[str, Any] = {
    "sandbox_latency_ms": {
        "type": "integer",
        "minimum": 0,
        "maximum": 600_000,
        "default": 0,
        "description": "time before the sandbox answers",
    },
    "sandbox_outcome": {
        "enum": ["success", "fail", "reject"],
        "default": "success",
        "description": "fail: the provider errors; reject: it refuses the input",
    },
}

LANGUAGES = ["en", "hi", "es", "fr", "de"]
VOICES = ["aria", "dev", "meera", "sam"]


def _single_schema(**properties: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {**properties, **SINGLE_KNOBS},
    }


AUDIO_TYPES = ["audio/wav", "audio/mpeg", "audio/ogg", "audio/flac", "audio/webm", "audio/mp4"]
IMAGE_TYPES = ["image/png", "image/jpeg", "image/webp"]

SEED: list[dict[str, Any]] = [
    {
        "slug": "sandbox-image",
        "name": "Sandbox Image",
        "category": Category.IMAGE,
        "description": "PNG images drawn from your prompt. Billed per image.",
        "upstream_model": "sandbox/image-v1",
        "price_micro": C,
        "billing_type": AIModel.BillingType.PER_OUTPUT,
        "params_schema": _schema(
            width={"type": "integer", "minimum": 64, "maximum": 2048, "default": 512},
            height={"type": "integer", "minimum": 64, "maximum": 2048, "default": 512},
            num_outputs={"type": "integer", "minimum": 1, "maximum": 4, "default": 1},
        ),
        "file_rules": {"accept": IMAGE_TYPES, "min": 0, "max": 1, "max_bytes": 10 * 2**20},
        "timeout_seconds": 300,
        "poll_interval_seconds": 2,
    },
    {
        "slug": "sandbox-video",
        "name": "Sandbox Video",
        "category": Category.VIDEO,
        "description": "Short WebM clips from your prompt. Billed per second of video.",
        "upstream_model": "sandbox/video-v1",
        "price_micro": C // 2,
        "billing_type": AIModel.BillingType.PER_OUTPUT_SECOND,
        "params_schema": _schema(
            duration_s={"type": "integer", "minimum": 1, "maximum": 10, "default": 2},
        ),
        "file_rules": {"accept": IMAGE_TYPES, "min": 0, "max": 1, "max_bytes": 10 * 2**20},
        "timeout_seconds": 600,
        "poll_interval_seconds": 2,
    },
    {
        "slug": "sandbox-speech",
        "name": "Sandbox Speech",
        "category": Category.AUDIO,
        "description": "Text to speech (a tone shaped by your text). Billed per second.",
        "upstream_model": "sandbox/speech-v1",
        "price_micro": C // 10,
        "billing_type": AIModel.BillingType.PER_OUTPUT_SECOND,
        "max_prompt_length": 5000,
        "params_schema": _schema(
            duration_s={"type": "integer", "minimum": 1, "maximum": 60, "default": 2},
        ),
        "file_rules": {"max": 0},
        "timeout_seconds": 300,
        "poll_interval_seconds": 2,
    },
    {
        "slug": "sandbox-audio-isolation",
        "name": "Sandbox Audio Isolation",
        "category": Category.AUDIO,
        "description": "Isolates the voice in an uploaded recording (1 s to 10 min). Billed per "
        "second of the recording.",
        "upstream_model": "sandbox/audio-isolation-v1",
        "price_micro": C // 20,
        "billing_type": AIModel.BillingType.PER_OUTPUT_SECOND,
        "prompt_required": False,
        "params_schema": _schema(),
        "file_rules": {
            "accept": AUDIO_TYPES,
            "min": 1,
            "max": 1,
            "max_bytes": 50 * 2**20,
            "min_duration_ms": 1000,
            "max_duration_ms": 600_000,
        },
        "timeout_seconds": 600,
        "poll_interval_seconds": 2,
    },
    {
        "slug": "sandbox-chat",
        "name": "Sandbox Chat",
        "category": Category.CHAT,
        "description": "A chat model for trying Rivya: streamed replies, billed per token.",
        "upstream_model": "sandbox/chat-v1",
        # 30 credits per million output tokens, 10 per million input tokens.
        "price_micro": 30,
        "input_price_micro": 10,
        "context_window": 8192,
        "max_output_tokens": 2048,
        "billing_type": AIModel.BillingType.PER_TOKEN,
        "direct_generation": False,
        "max_prompt_length": 20_000,
        "params_schema": _chat_schema(),
        "file_rules": {"max": 0},
    },
    {
        "slug": "sandbox-chat-mini",
        "name": "Sandbox Chat Mini",
        "category": Category.CHAT,
        "description": "A small, cheap chat model with a short memory (1,024 tokens of context).",
        "upstream_model": "sandbox/chat-mini",
        "price_micro": 8,
        "input_price_micro": 2,
        "context_window": 1024,
        "max_output_tokens": 512,
        "billing_type": AIModel.BillingType.PER_TOKEN,
        "direct_generation": False,
        "max_prompt_length": 2_000,
        "params_schema": _chat_schema(),
        "file_rules": {"max": 0},
    },
]


# Synchronous ("single") services, one sandbox model each (docs/single.md).
SEED += [
    {
        "slug": "sandbox-translate",
        "name": "Sandbox Translate",
        "category": Category.TEXT,
        "single_type": SingleType.TRANSLATION,
        "runtime": AIModel.Runtime.SYNC,
        "description": "Translates text between English, Hindi, Spanish, French and German. "
        "Billed per character.",
        "upstream_model": "sandbox/translate-v1",
        "price_micro": 20,
        "billing_type": AIModel.BillingType.PER_CHARACTER,
        "max_prompt_length": 5000,
        "params_schema": _single_schema(
            source_language={"enum": LANGUAGES, "description": "language of the text"},
            target_language={"enum": LANGUAGES, "description": "language to translate into"},
        ),
        "file_rules": {"max": 0},
        "timeout_seconds": 30,
    },
    {
        "slug": "sandbox-complete",
        "name": "Sandbox Complete",
        "category": Category.TEXT,
        "single_type": SingleType.COMPLETION,
        "runtime": AIModel.Runtime.SYNC,
        "description": "Completes a prompt in one answer (optionally about up to 4 images). "
        "Billed per request.",
        "upstream_model": "sandbox/complete-v1",
        "price_micro": C // 20,
        "billing_type": AIModel.BillingType.PER_TASK,
        "max_prompt_length": 20_000,
        "params_schema": _single_schema(
            max_tokens={
                "type": "integer",
                "minimum": 1,
                "maximum": 2048,
                "default": 256,
                "description": "the longest answer, in tokens",
            },
            sandbox_reply_tokens={
                "type": "integer",
                "minimum": 0,
                "maximum": 8192,
                "default": 120,
                "description": "length of the sandbox's answer (cut by max_tokens)",
            },
        ),
        "file_rules": {"accept": IMAGE_TYPES, "min": 0, "max": 4, "max_bytes": 10 * 2**20},
        "timeout_seconds": 30,
    },
    {
        "slug": "sandbox-tts",
        "name": "Sandbox Text to Speech",
        "category": Category.AUDIO,
        "single_type": SingleType.TEXT_TO_SPEECH,
        "runtime": AIModel.Runtime.SYNC,
        "description": "Speaks your text in one of four voices (WAV). Billed per character.",
        "upstream_model": "sandbox/tts-v1",
        "price_micro": 50,
        "billing_type": AIModel.BillingType.PER_CHARACTER,
        "max_prompt_length": 2000,
        "params_schema": _single_schema(
            voice={"enum": VOICES, "default": "aria", "description": "who speaks"},
        ),
        "file_rules": {"max": 0},
        "timeout_seconds": 30,
    },
    {
        "slug": "sandbox-transcribe",
        "name": "Sandbox Transcribe",
        "category": Category.TEXT,
        "single_type": SingleType.TRANSCRIPTION,
        "runtime": AIModel.Runtime.SYNC,
        "description": "Transcribes a recording with word timings. Up to 2 minutes inside the "
        "request; up to an hour in the background. Billed per second of audio.",
        "upstream_model": "sandbox/transcribe-v1",
        "price_micro": C // 100,
        "billing_type": AIModel.BillingType.PER_OUTPUT_SECOND,
        "prompt_required": False,
        "params_schema": _single_schema(
            language={"enum": LANGUAGES, "description": "spoken language (omit to detect)"},
        ),
        "file_rules": {
            "accept": AUDIO_TYPES,
            "min": 1,
            "max": 1,
            "max_bytes": 25 * 2**20,
            "max_duration_ms": 3_600_000,
            "sync_max_duration_ms": 120_000,
        },
        "timeout_seconds": 60,
    },
]

# The model a single request without ``model`` runs.
SINGLE_DEFAULT_MODELS: dict[str, str] = {
    SingleType.TRANSLATION: "sandbox-translate",
    SingleType.COMPLETION: "sandbox-complete",
    SingleType.TEXT_TO_SPEECH: "sandbox-tts",
    SingleType.TRANSCRIPTION: "sandbox-transcribe",
}


@transaction.atomic
def seed_catalog(*, update: bool = False) -> tuple[int, int]:
    """Create the seed models that are missing (and, with ``update``, reset the others to the
    seed values). Returns (created, updated). Idempotent."""
    created = updated = 0
    for spec in SEED:
        values = {"provider": "sandbox", **spec}
        slug = values.pop("slug")
        if update:
            _, was_created = AIModel.objects.update_or_create(slug=slug, defaults=values)
            updated += not was_created
        else:
            _, was_created = AIModel.objects.get_or_create(slug=slug, defaults=values)
        created += was_created
    return created, updated
