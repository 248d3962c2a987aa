"""The four single services' handlers: one provider call each, routed by the model's provider.

A handler takes the provider adapter (``tasks.providers.registry.get_provider(model.provider)``),
the provider's model id, the task's input and its time budget, and returns the JSON answer and
the file it is stored as. It touches neither models nor money; the dispatcher
(``tasks.single.services``) records and settles. The ``*_PROVIDERS`` sets are the routing table:
a model whose provider is not listed for its type is refused before anything is held. The sandbox
serves all four; the vendors named in docs/single.md get their adapters in their own issue, and
are routed by adding their key here once their adapter implements the method.
"""

from __future__ import annotations

import json
from typing import Any

from tasks.providers.base import (
    CompletionRequest,
    Provider,
    SpeechRequest,
    TranscriptionRequest,
    TranslationRequest,
)
from tasks.single.registry import ResultFile, SingleInput, SingleOutput

# ``noop`` is the benchmark's provider whose calls do nothing (bench/single.py measures the
# dispatcher's own cost against it); it is routed for translation only.
TRANSLATION_PROVIDERS = {"sandbox", "noop"}
COMPLETION_PROVIDERS = {"sandbox"}
SPEECH_PROVIDERS = {"sandbox"}
TRANSCRIPTION_PROVIDERS = {"sandbox"}


def json_result(result: dict[str, Any]) -> ResultFile:
    """A text result, stored as a JSON document (``application/json``)."""
    return ResultFile(
        data=json.dumps(result, ensure_ascii=False, indent=1).encode(),
        mime="application/json",
        ext="json",
    )


async def translate(
    provider: Provider, model: str, task: SingleInput, timeout_s: float
) -> SingleOutput:
    answer = await provider.translate(
        TranslationRequest(
            model=model,
            text=task.prompt,
            source_language=task.params["source_language"],
            target_language=task.params["target_language"],
            params=task.params,
        ),
        timeout_s=timeout_s,
    )
    result = {
        "text": answer.text,
        "source_language": task.params["source_language"],
        "target_language": task.params["target_language"],
        "characters": answer.characters,
    }
    return SingleOutput(result=result, file=json_result(result))


async def complete(
    provider: Provider, model: str, task: SingleInput, timeout_s: float
) -> SingleOutput:
    answer = await provider.complete(
        CompletionRequest(
            model=model,
            prompt=task.prompt,
            max_tokens=int(task.params["max_tokens"]),
            params=task.params,
            files=task.files,
        ),
        timeout_s=timeout_s,
    )
    usage = (
        {"input_tokens": answer.usage.input_tokens, "output_tokens": answer.usage.output_tokens}
        if answer.usage
        else None
    )
    result = {"text": answer.text, "finish_reason": answer.finish_reason, "usage": usage}
    return SingleOutput(result=result, file=json_result(result))


async def synthesize_speech(
    provider: Provider, model: str, task: SingleInput, timeout_s: float
) -> SingleOutput:
    answer = await provider.synthesize_speech(
        SpeechRequest(
            model=model, text=task.prompt, voice=task.params["voice"], params=task.params
        ),
        timeout_s=timeout_s,
    )
    ext = {"audio/wav": "wav", "audio/mpeg": "mp3", "audio/ogg": "ogg"}.get(answer.mime, "bin")
    result = {
        "mime": answer.mime,
        "bytes": len(answer.audio),
        "duration_ms": answer.duration_ms,
        "voice": answer.voice,
        "characters": len(task.prompt),
    }
    return SingleOutput(
        result=result,
        file=ResultFile(
            data=answer.audio, mime=answer.mime, ext=ext, duration_ms=answer.duration_ms
        ),
    )


async def transcribe(
    provider: Provider, model: str, task: SingleInput, timeout_s: float
) -> SingleOutput:
    answer = await provider.transcribe(
        TranscriptionRequest(
            model=model,
            audio=task.files[0],
            language=task.params.get("language"),
            params=task.params,
        ),
        timeout_s=timeout_s,
    )
    result = {
        "text": answer.text,
        "language": answer.language,
        "duration_ms": answer.duration_ms,
        "words": [
            {
                "text": w.text,
                "start_ms": w.start_ms,
                "end_ms": w.end_ms,
                "confidence": w.confidence,
            }
            for w in answer.words
        ],
    }
    return SingleOutput(result=result, file=json_result(result))
