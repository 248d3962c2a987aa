"""The single-task registry: the one place that says what each ``/api/v1/single/<type>/`` runs.

A ``SingleService`` names, for one type: the request serializer (the body's shape), the payload
validator (the body → the task's prompt, params and billing basis), the file validator (the
files' count, type and duration, and whether they may run inside the request), the handler (the
provider call, chosen by the model's provider) and the providers it is routed for. Adding a type
is one ``register(SingleService(...))`` here plus its handler in ``tasks.single.handlers``
(docs/single.md, "Adding a type").
"""

from __future__ import annotations

import enum
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rest_framework import serializers

from rivya.errors import ValidationFailed
from tasks.models import AIModel, Category, SingleType
from tasks.providers.base import InputFile, Provider
from tasks.validation import FileCheck, check_files

LANGUAGE = r"^[a-z]{2}$"  # ISO 639-1


class Files(enum.StrEnum):
    """Whether a type takes files (the model's ``file_rules`` bound their count, type, size and
    duration)."""

    NONE = "none"
    OPTIONAL = "optional"
    REQUIRED = "required"


@dataclass(frozen=True)
class Payload:
    """What the payload validator makes of a valid body: the task's prompt (the text it is
    about), its params before the model's schema fills defaults and checks values, and the
    number of characters a per-character price counts."""

    prompt: str
    params: dict[str, Any]
    characters: int = 0


@dataclass(frozen=True)
class SingleInput:
    """What a handler gets: the task's prompt and normalized params, and its files' bytes."""

    prompt: str
    params: Mapping[str, Any]
    files: tuple[InputFile, ...] = ()


@dataclass(frozen=True)
class ResultFile:
    """The file a single task's result is stored as (the JSON answer, or the speech)."""

    data: bytes
    mime: str
    ext: str
    duration_ms: int | None = None


@dataclass(frozen=True)
class SingleOutput:
    """A handler's answer: ``result``, the JSON the API returns, and ``file``, what is stored
    as the task's one output (so History, expiry and the results URL treat it as any output)."""

    result: dict[str, Any]
    file: ResultFile


Handler = Callable[[Provider, str, SingleInput, float], Awaitable[SingleOutput]]


@dataclass(frozen=True)
class SingleService:
    type: SingleType
    category: Category
    files: Files
    request_serializer: type[serializers.Serializer]
    validate_payload: Callable[[Mapping[str, Any]], Payload]
    handler: Handler
    # Provider keys this type is routed for (the model's ``provider`` must be one of them).
    providers: frozenset[str]
    # Body fields that are model parameters: checked against the model's parameter schema
    # (which lists their allowed values per model) and stored in the task's params. Errors on
    # them are reported under their own name, not ``params.<name>``.
    param_fields: tuple[str, ...] = ()
    # Files → None when they may run inside the request, or why they may not (then the request
    # is refused, or with ``Prefer: respond-async`` run by a worker). Raises ValidationFailed.
    validate_files: Callable[[AIModel, Sequence[FileCheck]], str | None] = field(
        default=lambda model, files: check_model_files(model, files)
    )


REGISTRY: dict[str, SingleService] = {}


def register(service: SingleService) -> SingleService:
    REGISTRY[service.type.value] = service
    return service


def get_service(single_type: str) -> SingleService | None:
    return REGISTRY.get(single_type)


# --- shared validators ------------------------------------------------------------------------


def check_model_files(model: AIModel, files: Sequence[FileCheck]) -> str | None:
    """The model's file rules (count, type by content, size, duration), then whether the files
    are short enough to run inside the request (``file_rules.sync_max_duration_ms``)."""
    rules = model.file_rules if isinstance(model.file_rules, dict) else {}
    check_files(rules, files)
    limit = rules.get("sync_max_duration_ms")
    longest = max((f.info.duration_ms or 0 for f in files), default=0)
    if isinstance(limit, int) and longest > limit:
        return (
            f"{_clock(longest)} of audio is longer than the {_clock(limit)} this model handles "
            "inside a request."
        )
    return None


def _clock(ms: int) -> str:
    seconds = round(ms / 1000)
    return f"{seconds // 60}:{seconds % 60:02d}"


class ParamsField(serializers.JSONField):
    """The model's own options (``params``): a JSON object, or in a multipart body a JSON
    string holding one."""

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, str):
            try:
                data = json.loads(data)
            except ValueError:
                raise serializers.ValidationError("Must be a JSON object.") from None
        if not isinstance(data, dict):
            raise serializers.ValidationError("Must be a JSON object.")
        return data


class TextField(serializers.CharField):
    """A string, never a number or a boolean turned into one (DRF's CharField converts them),
    not blank, sent on as given (no trimming)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(trim_whitespace=False, **kwargs)

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            raise serializers.ValidationError("Must be a string.")
        if not data.strip():
            raise serializers.ValidationError("Must not be empty.")
        return data


def _strict_text(**kwargs: Any) -> serializers.CharField:
    return TextField(**kwargs)


class SingleRequest(serializers.Serializer):
    model = TextField(
        required=False, help_text="a model slug (default: the type's seeded sandbox model)"
    )
    params = ParamsField(required=False, help_text="the model's own options (its params_schema)")


# --- translation ------------------------------------------------------------------------------


class TranslationRequestSerializer(SingleRequest):
    text = _strict_text()
    source_language = serializers.RegexField(LANGUAGE, help_text="ISO 639-1, e.g. en")
    target_language = serializers.RegexField(LANGUAGE, help_text="ISO 639-1, e.g. hi")

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if attrs["source_language"] == attrs["target_language"]:
            raise serializers.ValidationError(
                {"target_language": ["Must differ from source_language."]}
            )
        return attrs


def translation_payload(data: Mapping[str, Any]) -> Payload:
    return Payload(
        prompt=data["text"],
        params={
            **data.get("params", {}),
            "source_language": data["source_language"],
            "target_language": data["target_language"],
        },
        characters=len(data["text"]),
    )


# --- completion -------------------------------------------------------------------------------


class CompletionRequestSerializer(SingleRequest):
    prompt = _strict_text()
    max_tokens = serializers.IntegerField(required=False, min_value=1)


def completion_payload(data: Mapping[str, Any]) -> Payload:
    params = dict(data.get("params", {}))
    if "max_tokens" in data:
        params["max_tokens"] = data["max_tokens"]
    return Payload(prompt=data["prompt"], params=params, characters=len(data["prompt"]))


# --- text to speech ---------------------------------------------------------------------------


class SpeechRequestSerializer(SingleRequest):
    text = _strict_text()
    voice = TextField(required=False)


def speech_payload(data: Mapping[str, Any]) -> Payload:
    params = dict(data.get("params", {}))
    if "voice" in data:
        params["voice"] = data["voice"]
    return Payload(prompt=data["text"], params=params, characters=len(data["text"]))


# --- transcription ----------------------------------------------------------------------------


class TranscriptionRequestSerializer(SingleRequest):
    language = serializers.RegexField(
        LANGUAGE, required=False, help_text="ISO 639-1; omit to detect"
    )


def transcription_payload(data: Mapping[str, Any]) -> Payload:
    params = dict(data.get("params", {}))
    if "language" in data:
        params["language"] = data["language"]
    return Payload(prompt="", params=params)


def _register_builtin() -> None:
    from tasks.single import handlers

    register(
        SingleService(
            type=SingleType.TRANSLATION,
            category=Category.TEXT,
            files=Files.NONE,
            request_serializer=TranslationRequestSerializer,
            validate_payload=translation_payload,
            handler=handlers.translate,
            providers=frozenset(handlers.TRANSLATION_PROVIDERS),
            param_fields=("source_language", "target_language"),
        )
    )
    register(
        SingleService(
            type=SingleType.COMPLETION,
            category=Category.TEXT,
            files=Files.OPTIONAL,
            request_serializer=CompletionRequestSerializer,
            validate_payload=completion_payload,
            handler=handlers.complete,
            providers=frozenset(handlers.COMPLETION_PROVIDERS),
            param_fields=("max_tokens",),
        )
    )
    register(
        SingleService(
            type=SingleType.TEXT_TO_SPEECH,
            category=Category.AUDIO,
            files=Files.NONE,
            request_serializer=SpeechRequestSerializer,
            validate_payload=speech_payload,
            handler=handlers.synthesize_speech,
            providers=frozenset(handlers.SPEECH_PROVIDERS),
            param_fields=("voice",),
        )
    )
    register(
        SingleService(
            type=SingleType.TRANSCRIPTION,
            category=Category.TEXT,
            files=Files.REQUIRED,
            request_serializer=TranscriptionRequestSerializer,
            validate_payload=transcription_payload,
            handler=handlers.transcribe,
            providers=frozenset(handlers.TRANSCRIPTION_PROVIDERS),
            param_fields=("language",),
        )
    )


_register_builtin()


def validation_error(errors: Any) -> ValidationFailed:
    """A DRF serializer's errors as our 400 (``fields`` of lists of strings)."""
    fields: dict[str, list[str]] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, dict | list):
                    walk(prefix, item)
                else:
                    fields.setdefault(prefix or "body", []).append(str(item))
        else:
            fields.setdefault(prefix or "body", []).append(str(value))

    walk("", errors)
    return ValidationFailed(fields)
