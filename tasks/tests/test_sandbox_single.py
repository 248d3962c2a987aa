"""The sandbox's four synchronous services (translation, completion, speech, transcription),
through the adapter (``get_provider("sandbox")``) against the real sandbox process.

Each test drives the async methods with ``asyncio.run`` (no pytest-asyncio), and closes the
loop's pooled client before the loop ends, as a worker would (``http.aclose_clients``).
"""

from __future__ import annotations

import asyncio
import io
import math
import random
import time
import wave
from array import array
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import av
import httpx
import pytest

from tasks.providers import http
from tasks.providers.base import (
    CompletionRequest,
    InputFile,
    InputRejected,
    Provider,
    ProviderError,
    SpeechRequest,
    SpeechResult,
    TranscriptionRequest,
    TranscriptionResult,
    TranslationRequest,
)
from tasks.providers.registry import get_provider
from tasks.providers.sandbox import SandboxProvider
from tasks.sandbox import chat
from tasks.tests.sandbox_process import SandboxProcess, new_secret, start_sandbox, stop_sandbox

T = TypeVar("T")

TEN_WORDS = "The quick brown fox jumps over the lazy dog today."


def run(coro: Coroutine[Any, Any, T]) -> T:
    async def main() -> T:
        try:
            return await coro
        finally:
            await http.aclose_clients()

    return asyncio.run(main())


@pytest.fixture
def provider(sandbox: SandboxProcess) -> Provider:
    return get_provider("sandbox")


def translate(provider: Provider, text: str, source: str, target: str, **params: Any) -> Any:
    return run(
        provider.translate(
            TranslationRequest(
                model="sandbox-translate",
                text=text,
                source_language=source,
                target_language=target,
                params=params,
            ),
            timeout_s=10,
        )
    )


def speak(provider: Provider, text: str, voice: str = "", **params: Any) -> SpeechResult:
    return run(
        provider.synthesize_speech(
            SpeechRequest(model="sandbox-speech", text=text, voice=voice, params=params),
            timeout_s=20,
        )
    )


def transcribe(
    provider: Provider, audio: bytes, *, language: str | None = "en", name: str = "a.wav"
) -> TranscriptionResult:
    return run(
        provider.transcribe(
            TranscriptionRequest(
                model="sandbox-transcribe",
                audio=InputFile(name=name, mime="audio/wav", data=audio),
                language=language,
                params={},
            ),
            timeout_s=20,
        )
    )


def pcm(wav_bytes: bytes) -> tuple[array[int], tuple[int, int, int, int]]:
    """The samples, and (channels, sample width, rate, frames) from the header."""
    with wave.open(io.BytesIO(wav_bytes), "rb") as reader:
        samples = array("h", reader.readframes(reader.getnframes()))
        return samples, (
            reader.getnchannels(),
            reader.getsampwidth(),
            reader.getframerate(),
            reader.getnframes(),
        )


def wav_of(samples: array[int], rate: int = 16_000) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes(samples.tobytes())
    return out.getvalue()


def transcode(wav_bytes: bytes, container: str, codec: str, rate: int) -> bytes:
    """Re-encode a WAV with PyAV (MP3, Ogg Opus): no INFO chunk survives, only the sound."""
    out = io.BytesIO()
    with av.open(io.BytesIO(wav_bytes)) as source, av.open(out, "w", format=container) as target:
        stream = target.add_stream(codec, rate=rate, layout="mono")
        for frame in source.decode(audio=0):
            frame.pts = None
            for packet in stream.encode(frame):
                target.mux(packet)
        for packet in stream.encode(None):
            target.mux(packet)
    return out.getvalue()


def pitch_hz(samples: array[int], rate: int, at_s: float) -> float:
    """The fundamental of 50 ms of voiced audio at ``at_s``, by autocorrelation (60-400 Hz)."""
    start = int(at_s * rate)
    segment = samples[start : start + rate // 20]
    lags = range(rate // 400, rate // 60)
    best = max(
        lags,
        key=lambda lag: sum(segment[i] * segment[i + lag] for i in range(len(segment) - lag)),
    )
    return rate / best


# ---- translation -----------------------------------------------------------------------------


def test_translate_english_to_hindi(provider: Provider) -> None:
    result = translate(provider, "Hello world", "en", "hi")

    assert result.text == "नमस्ते दुनिया"
    assert result.characters == len("Hello world")


def test_translate_hindi_to_english(provider: Provider) -> None:
    result = translate(provider, "नमस्ते दुनिया। धन्यवाद", "hi", "en")

    assert result.text == "Hello world. Thank you"
    assert result.characters == len("नमस्ते दुनिया। धन्यवाद")


def test_words_missing_from_the_dictionary_are_transliterated_into_hindi(
    provider: Provider,
) -> None:
    result = translate(provider, "Hello Rivya, my friend.", "en", "hi")

    assert result.text.startswith("नमस्ते ")
    assert result.text.endswith("मेरा दोस्त।")
    assert all("\u0900" <= ch <= "\u097f" or ch in " ," for ch in result.text), result.text


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("es", "Hola mundo, gracias por favor."),
        ("fr", "Bonjour monde, merci s'il vous plaît."),
        ("de", "Hallo Welt, danke bitte."),
    ],
)
def test_translate_english_to_european_languages(
    provider: Provider, target: str, expected: str
) -> None:
    assert translate(provider, "Hello world, thank you please.", "en", target).text == expected


def test_translate_between_two_languages_other_than_english_goes_through_english(
    provider: Provider,
) -> None:
    assert translate(provider, "hola mundo", "es", "de").text == "hallo Welt"
    assert translate(provider, "नमस्ते दुनिया", "hi", "fr").text == "Bonjour monde"


def test_translation_is_deterministic(provider: Provider) -> None:
    text = "The sandbox translates every sentence the same way, always."
    assert translate(provider, text, "en", "es") == translate(provider, text, "en", "es")


@pytest.mark.parametrize(
    ("source", "target", "code"),
    [
        ("en", "xx", "unsupported_language"),
        ("ja", "en", "unsupported_language"),
        ("en", "en", "same_language"),
    ],
)
def test_unsupported_languages_are_rejected(
    provider: Provider, source: str, target: str, code: str
) -> None:
    with pytest.raises(InputRejected) as caught:
        translate(provider, "Hello", source, target)

    assert caught.value.code == code
    assert caught.value.status == 422
    assert caught.value.retryable is False


# ---- completion ------------------------------------------------------------------------------


def complete(provider: Provider, prompt: str, max_tokens: int, **kwargs: Any) -> Any:
    files = kwargs.pop("files", ())
    return run(
        provider.complete(
            CompletionRequest(
                model="sandbox-complete",
                prompt=prompt,
                max_tokens=max_tokens,
                params=kwargs,
                files=files,
            ),
            timeout_s=10,
        )
    )


def test_completion_cut_by_max_tokens_says_length_and_counts_like_chat(
    provider: Provider,
) -> None:
    prompt = "Tell me about rivers."

    result = complete(provider, prompt, 5, sandbox_reply_tokens=20)

    assert result.finish_reason == "length"
    assert result.text == "".join(chat.reply_tokens(prompt, 5))
    assert result.usage is not None
    assert result.usage.output_tokens == 5
    assert result.usage.input_tokens == chat.prompt_tokens([prompt])


def test_completion_within_max_tokens_stops(provider: Provider) -> None:
    result = complete(provider, "Hi", 50, sandbox_reply_tokens=12)

    assert result.finish_reason == "stop"
    assert result.usage is not None
    assert result.usage.output_tokens == 12
    assert len(result.text.split()) == 12


def test_completion_files_count_as_input_tokens(provider: Provider) -> None:
    document = InputFile(name="notes.txt", mime="text/plain", data=b"x" * 101)
    plain = complete(provider, "Summarise", 8)

    with_file = complete(provider, "Summarise", 8, files=(document,))

    assert plain.usage is not None
    assert with_file.usage is not None
    assert with_file.usage.input_tokens == plain.usage.input_tokens + 4 + 26  # ceil(101 / 4)
    assert with_file.text != plain.text  # the files are part of what is answered


# ---- speech ----------------------------------------------------------------------------------


def test_speech_is_a_valid_wav_of_plausible_duration_with_energy(provider: Provider) -> None:
    result = speak(provider, TEN_WORDS)

    samples, (channels, width, rate, frames) = pcm(result.audio)
    assert result.mime == "audio/wav"
    assert result.voice == "aria"  # the default
    assert (channels, width, rate) == (1, 2, 16_000)
    seconds = frames / rate
    assert 2.0 <= seconds <= 8.0
    assert abs(result.duration_ms - seconds * 1000) <= 1
    rms = math.sqrt(sum(x * x for x in samples) / len(samples))
    assert rms > 1000, rms  # speech, not silence
    assert max(abs(x) for x in samples) < 32767  # and not clipping


def test_longer_text_lasts_longer(provider: Provider) -> None:
    short = speak(provider, "Hello there.")
    long = speak(provider, "Hello there, it is a long and winding sentence to say out loud.")

    assert long.duration_ms > 3 * short.duration_ms


def test_speech_is_deterministic(provider: Provider) -> None:
    assert (
        speak(provider, "Same words, same sound.").audio
        == speak(provider, "Same words, same sound.").audio
    )


def test_voices_differ_in_pitch(provider: Provider) -> None:
    pitches = {}
    crossings = {}
    for voice in ("dev", "sam", "aria", "meera"):
        result = speak(provider, "Hello there friend", voice)
        assert result.voice == voice
        samples, (_, _, rate, _) = pcm(result.audio)
        # The middle of the first word ("Hello", from 150 to 505 ms).
        pitches[voice] = pitch_hz(samples, rate, 0.25)
        crossings[voice] = sum(
            1 for a, b in zip(samples, samples[1:], strict=False) if (a < 0) != (b < 0)
        )

    assert pitches["dev"] < pitches["sam"] < pitches["aria"] < pitches["meera"], pitches
    assert 95 < pitches["dev"] < 140, pitches
    assert 190 < pitches["aria"] < 240, pitches
    assert crossings["dev"] < crossings["meera"], crossings


@pytest.mark.parametrize(
    ("text", "voice", "code"),
    [
        ("Hello", "nobody", "unsupported_voice"),
        ("  ... —  ", "aria", "empty_text"),
        ("", "aria", "empty_text"),
    ],
)
def test_unusable_speech_requests_are_rejected(
    provider: Provider, text: str, voice: str, code: str
) -> None:
    with pytest.raises(InputRejected) as caught:
        speak(provider, text, voice)

    assert caught.value.code == code


# ---- transcription ---------------------------------------------------------------------------


def assert_timings(result: TranscriptionResult) -> None:
    previous_end = 0
    for word in result.words:
        assert previous_end <= word.start_ms < word.end_ms, result.words
        assert 0 < word.confidence <= 1
        previous_end = word.end_ms
    assert previous_end <= result.duration_ms


def test_speech_transcribed_gives_back_its_words_with_their_timings(provider: Provider) -> None:
    speech = speak(provider, TEN_WORDS, "sam")

    result = transcribe(provider, speech.audio)

    assert [w.text for w in result.words] == TEN_WORDS.split()
    assert result.text == TEN_WORDS
    assert result.language == "en"
    assert result.duration_ms == speech.duration_ms
    assert_timings(result)
    # Each word lasts about as long as it has letters (~65 ms each): measured, not invented.
    lengths = {w.text: w.end_ms - w.start_ms for w in result.words}
    assert lengths["fox"] < lengths["quick"] < lengths["today."] + 30
    assert all(150 <= ms <= 1100 for ms in lengths.values()), lengths
    # Words are separated by pauses, a longer one before the sentence's end is not needed here.
    gaps = [b.start_ms - a.end_ms for a, b in zip(result.words, result.words[1:], strict=False)]
    assert all(gap >= 80 for gap in gaps), gaps


def test_hindi_speech_round_trip_detects_the_language(provider: Provider) -> None:
    text = "नमस्ते दुनिया, आप कैसे हैं?"
    speech = speak(provider, text, "meera")

    result = transcribe(provider, speech.audio, language=None)

    assert result.text == text
    assert result.language == "hi"
    assert_timings(result)


def test_language_defaults_to_english(provider: Provider) -> None:
    result = transcribe(provider, speak(provider, "Hello world").audio, language=None)

    assert result.language == "en"


@pytest.mark.parametrize(
    ("container", "codec", "rate"), [("mp3", "libmp3lame", 16_000), ("ogg", "libopus", 48_000)]
)
def test_compressed_audio_is_timed_from_its_sound(
    provider: Provider, container: str, codec: str, rate: int
) -> None:
    speech = speak(provider, TEN_WORDS)
    reference = transcribe(provider, speech.audio)
    compressed = transcode(speech.audio, container, codec, rate)

    result = transcribe(provider, compressed, name=f"speech.{container}")

    # No INFO text survives: the words come from the vocabulary, but there are as many as were
    # spoken, where they were spoken.
    assert len(result.words) == len(reference.words)
    for word, expected in zip(result.words, reference.words, strict=True):
        assert abs(word.start_ms - expected.start_ms) <= 40
        assert abs(word.end_ms - expected.end_ms) <= 40
        assert word.text
    assert abs(result.duration_ms - speech.duration_ms) <= 100
    assert_timings(result)
    assert transcribe(provider, compressed, name=f"speech.{container}") == result


def test_noise_is_transcribed_into_words(provider: Provider) -> None:
    rng = random.Random(7)
    noise = array("h", (int(rng.gauss(0, 3000)) for _ in range(3 * 16_000)))

    result = transcribe(provider, wav_of(noise))

    assert result.duration_ms == 3000
    assert result.text
    assert len(result.words) >= 3
    assert_timings(result)


def test_silence_has_no_words(provider: Provider) -> None:
    result = transcribe(provider, wav_of(array("h", bytes(2 * 16_000))), language="de")

    assert result.text == ""
    assert result.words == ()
    assert result.language == "de"
    assert result.duration_ms == 1000


@pytest.mark.parametrize("data", [b"not audio at all " * 64, b"RIFF" + bytes(200), b""])
def test_undecodable_audio_is_rejected(provider: Provider, data: bytes) -> None:
    with pytest.raises(InputRejected) as caught:
        transcribe(provider, data)

    assert caught.value.code == "unreadable_audio"
    assert caught.value.status == 422


# ---- knobs, for every service ------------------------------------------------------------------

Call = Callable[[Provider, dict[str, Any], float], Awaitable[Any]]


def _call_translate(provider: Provider, params: dict[str, Any], timeout_s: float) -> Any:
    return provider.translate(
        TranslationRequest("sandbox-translate", "Hello", "en", "hi", params), timeout_s=timeout_s
    )


def _call_complete(provider: Provider, params: dict[str, Any], timeout_s: float) -> Any:
    return provider.complete(
        CompletionRequest("sandbox-complete", "Hello", 4, params), timeout_s=timeout_s
    )


def _call_speech(provider: Provider, params: dict[str, Any], timeout_s: float) -> Any:
    return provider.synthesize_speech(
        SpeechRequest("sandbox-speech", "Hello", "dev", params), timeout_s=timeout_s
    )


_SILENT_WAV = wav_of(array("h", bytes(3200)))


def _call_transcribe(provider: Provider, params: dict[str, Any], timeout_s: float) -> Any:
    return provider.transcribe(
        TranscriptionRequest(
            "sandbox-transcribe", InputFile("a.wav", "audio/wav", _SILENT_WAV), None, params
        ),
        timeout_s=timeout_s,
    )


SERVICES: dict[str, Call] = {
    "translate": _call_translate,
    "complete": _call_complete,
    "speech": _call_speech,
    "transcribe": _call_transcribe,
}


@pytest.fixture(params=sorted(SERVICES))
def call(request: pytest.FixtureRequest) -> Call:
    return SERVICES[request.param]


def test_latency_is_honoured(provider: Provider, call: Call) -> None:
    started = time.monotonic()

    run(call(provider, {"sandbox_latency_ms": 600}, 10))

    assert time.monotonic() - started >= 0.6


def test_latency_beyond_the_timeout_ends_the_call_at_the_deadline(
    provider: Provider, call: Call
) -> None:
    started = time.monotonic()

    with pytest.raises(ProviderError) as caught:
        run(call(provider, {"sandbox_latency_ms": 10_000}, 0.5))

    elapsed = time.monotonic() - started
    assert 0.5 <= elapsed < 2.0
    assert caught.value.code == "upstream_timeout"
    assert caught.value.retryable is False
    assert caught.value.maybe_received is True
    assert not isinstance(caught.value, InputRejected)


def test_fail_is_a_retryable_provider_error(provider: Provider, call: Call) -> None:
    with pytest.raises(ProviderError) as caught:
        run(call(provider, {"sandbox_outcome": "fail", "sandbox_latency_ms": 50}, 10))

    assert not isinstance(caught.value, InputRejected)
    assert caught.value.code == "sandbox_failure"
    assert caught.value.status == 500
    assert caught.value.retryable is True


def test_reject_is_an_input_rejection(provider: Provider, call: Call) -> None:
    with pytest.raises(InputRejected) as caught:
        run(call(provider, {"sandbox_outcome": "reject"}, 10))

    assert caught.value.code == "content_policy"
    assert caught.value.retryable is False


def test_invalid_knob_is_a_permanent_error(provider: Provider, call: Call) -> None:
    with pytest.raises(ProviderError) as caught:
        run(call(provider, {"sandbox_outcome": "partial"}, 10))

    assert caught.value.code == "invalid_request"
    assert caught.value.status == 400
    assert caught.value.retryable is False


def test_unknown_params_are_ignored(provider: Provider, call: Call) -> None:
    run(call(provider, {"sandbox_callback": "none", "temperature": 0.2, "voice": "x"}, 10))


# ---- concurrency stats (a sandbox of our own: these tests reset it) ------------------------------


@pytest.fixture
def own_sandbox() -> Iterator[tuple[str, SandboxProvider]]:
    secret = new_secret()
    base_url, process = start_sandbox(secret)
    try:
        yield base_url, SandboxProvider(base_url, secret)
    finally:
        stop_sandbox(process)


def single_stats(base_url: str) -> dict[str, Any]:
    return httpx.get(f"{base_url}/v1/single/stats", trust_env=False).json()


def test_max_in_flight_counts_concurrent_requests_exactly(
    own_sandbox: tuple[str, SandboxProvider],
) -> None:
    base_url, provider = own_sandbox
    n = 6

    async def burst() -> None:
        calls = [SERVICES[name] for name in sorted(SERVICES)]
        await asyncio.gather(
            *(calls[i % 4](provider, {"sandbox_latency_ms": 800}, 10) for i in range(n))
        )

    run(burst())

    stats = single_stats(base_url)
    assert stats["max_in_flight"] == n
    assert stats["in_flight"] == 0
    assert stats["requests"] == n
    assert sum(stats["by_service"].values()) == n

    run(_call_translate(provider, {}, 10))  # one at a time: the maximum stays
    assert single_stats(base_url)["max_in_flight"] == n

    httpx.post(f"{base_url}/v1/_reset", trust_env=False).raise_for_status()
    assert single_stats(base_url) == {
        "requests": 0,
        "in_flight": 0,
        "max_in_flight": 0,
        "disconnects": 0,
        "by_service": {"translate": 0, "completions": 0, "speech": 0, "transcriptions": 0},
    }

    async def sequential() -> None:
        for _ in range(3):
            await _call_complete(provider, {"sandbox_latency_ms": 20}, 10)

    run(sequential())
    assert single_stats(base_url)["max_in_flight"] == 1
    # The job stats keep their shape (other tests compare them whole).
    assert set(httpx.get(f"{base_url}/v1/stats", trust_env=False).json()) == {
        "jobs_created",
        "submits",
        "by_key",
        "callbacks_sent",
        "callbacks_failed",
    }


def test_a_client_that_hangs_up_frees_its_request_at_once(
    own_sandbox: tuple[str, SandboxProvider],
) -> None:
    base_url, provider = own_sandbox

    with pytest.raises(ProviderError):
        run(_call_speech(provider, {"sandbox_latency_ms": 600_000}, 0.3))

    deadline = time.monotonic() + 3
    while single_stats(base_url)["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = single_stats(base_url)
    assert stats["in_flight"] == 0
    assert stats["disconnects"] == 1


# ---- the async HTTP seam -----------------------------------------------------------------------


def test_arequest_pools_one_client_per_event_loop(sandbox: SandboxProcess) -> None:
    async def two_requests() -> tuple[httpx.AsyncClient, httpx.AsyncClient]:
        first = await http.arequest("GET", f"{sandbox.base_url}/healthz", timeout_s=5)
        client = http._loop_client()
        second = await http.arequest("GET", f"{sandbox.base_url}/healthz", timeout_s=5)
        assert first.json() == second.json() == {"ok": True}
        # Clients of loops that have ended are dropped, never handed out again.
        assert all(not loop.is_closed() for loop in http._aclients)
        return client, http._loop_client()

    async def keep_open() -> httpx.AsyncClient:
        await http.arequest("GET", f"{sandbox.base_url}/healthz", timeout_s=5)
        return http._loop_client()  # the loop ends without aclose_clients()

    one, again = run(two_requests())
    assert one is again
    assert one.is_closed  # closed by run() with the loop
    left_open = asyncio.run(keep_open())
    other, _ = run(two_requests())
    assert other is not one
    assert other is not left_open


def test_arequest_maps_an_unreachable_upstream_to_a_retryable_error() -> None:
    from tasks.tests.sandbox_process import free_port

    with pytest.raises(ProviderError) as caught:
        run(http.arequest("GET", f"http://127.0.0.1:{free_port()}/", timeout_s=5))

    assert caught.value.code == "upstream_unreachable"
    assert caught.value.retryable is True
    assert caught.value.maybe_received is False
