"""Single (synchronous) tasks on the pages: the Studio offers the four types with their forms and
a price by the character, History shows their results (the detail page reads them back, the
list never does), and another user's task is a 404."""

from __future__ import annotations

import html
import json
import re
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from rivya.pages import history as history_page
from tasks.models import Task
from tasks.single.registry import ResultFile, SingleOutput
from tasks.single.services import single_finish, single_start

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("seeded_catalog")]
C = 1_000_000


def logged_in(some_user: Any) -> Client:
    client = Client()
    client.force_login(some_user)
    return client


def text(response: Any) -> str:
    """The page's visible text, roughly (tags and scripts dropped, entities decoded)."""
    body = re.sub(r"<script.*?</script>", " ", response.content.decode(), flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", body)).split())


def config(response: Any) -> dict[str, Any]:
    match = re.search(
        r'<script id="single-config" type="application/json">(.*?)</script>',
        response.content.decode(),
        flags=re.S,
    )
    assert match, "no single-config"
    return json.loads(match.group(1))


def selected(response: Any, name: str) -> str:
    """The selected option of the select ``id_param_<name>`` ("" when none is marked)."""
    page = response.content.decode()
    block = re.search(rf'<select id="id_param_{name}".*?</select>', page, flags=re.S)
    assert block, f"no select for {name}"
    chosen = re.search(r'<option value="([^"]*)" selected>', block.group(0))
    return chosen.group(1) if chosen else ""


def run_single(
    user: Any, single_type: str, data: dict[str, Any], result: dict[str, Any], **file: Any
) -> Task:
    """A single task recorded and finished as the API does (phases 1 and 3), with ``result``
    as the provider's answer: stored as the task's JSON result, or ``file`` (speech)."""
    start = single_start(user=user, single_type=single_type, data=data)
    assert start.run is not None, start.task.error_message
    stored = ResultFile(
        data=file.get("content") or json.dumps(result).encode(),
        mime=file.get("mime", "application/json"),
        ext=file.get("ext", "json"),
        duration_ms=file.get("duration_ms"),
    )
    task, _ = single_finish(start.run, SingleOutput(result=result, file=stored))
    assert task.status == Task.Status.SUCCESS
    return task


TRANSLATION = {"text": "Thank you", "source_language": "en", "target_language": "hi"}
TRANSLATED = {
    "text": "धन्यवाद",
    "source_language": "en",
    "target_language": "hi",
    "characters": 9,
}
TRANSCRIBED = {
    "text": "Hello there friend",
    "language": "en",
    "duration_ms": 1860,
    "words": [
        {"text": "Hello", "start_ms": 150, "end_ms": 510, "confidence": 0.98},
        {"text": "there", "start_ms": 640, "end_ms": 1000, "confidence": 0.95},
        {"text": "friend", "start_ms": 1130, "end_ms": 1710, "confidence": 0.91},
    ],
}


# --- the Studio ---------------------------------------------------------------------------


def test_the_studio_lists_the_sync_models_next_to_the_async_ones(history_user: Any) -> None:
    client = logged_in(history_user())

    opened = client.get("/studio/")
    text_tab = client.get("/studio/?category=text")
    audio_tab = client.get("/studio/?category=audio")

    assert 'data-model="sandbox-image"' in opened.content.decode()  # still opens on images
    assert 'id="cat-text"' in opened.content.decode()
    for slug in ("sandbox-translate", "sandbox-complete", "sandbox-transcribe"):
        assert f'id="pick-{slug}"' in text_tab.content.decode()
    audio = audio_tab.content.decode()
    for slug in ("sandbox-tts", "sandbox-speech", "sandbox-audio-isolation"):
        assert f'id="pick-{slug}"' in audio
    assert "0.00002 credits per character" in text(text_tab)  # the picker's price


@pytest.mark.parametrize(
    ("slug", "single_type", "body_fields"),
    [
        ("sandbox-translate", "translation", ["source_language", "target_language"]),
        ("sandbox-complete", "completion", ["max_tokens"]),
        ("sandbox-tts", "text_to_speech", ["voice"]),
        ("sandbox-transcribe", "transcription", ["language"]),
    ],
)
def test_each_sync_model_has_its_form_posting_to_the_single_api(
    history_user: Any, slug: str, single_type: str, body_fields: list[str]
) -> None:
    response = logged_in(history_user()).get(f"/studio/?model={slug}")

    assert response.status_code == 200
    page = response.content.decode()
    assert f'data-single-type="{single_type}"' in page
    assert 'id="single-form"' in page
    assert 'id="studio-form"' not in page
    assert "js/studio-single.js" in page
    settings = config(response)
    assert settings["apiUrl"] == f"/api/v1/single/{single_type}/"
    assert settings["bodyFields"] == body_fields
    names = {p["name"] for p in settings["params"]}
    assert set(body_fields) <= names
    assert "sandbox_outcome" in names
    # The model's parameters come from its schema; the sandbox's knobs are under Testing.
    for name in body_fields:
        assert f'id="id_param_{name}"' in page
    assert '<details class="testing"' in page
    assert 'id="id_param_sandbox_outcome"' in page


def test_the_type_inputs_of_each_form(history_user: Any) -> None:
    client = logged_in(history_user())

    translate = client.get("/studio/?model=sandbox-translate")
    complete = client.get("/studio/?model=sandbox-complete")
    speak = client.get("/studio/?model=sandbox-tts")
    transcribe = client.get("/studio/?model=sandbox-transcribe")

    # Translation: the text and the two languages, starting as a valid pair.
    assert '<label for="id_prompt">Text</label>' in translate.content.decode()
    assert (selected(translate, "source_language"), selected(translate, "target_language")) == (
        "en",
        "hi",
    )
    assert config(translate)["textField"] == "text"
    # Completion: a prompt, max_tokens with its default, up to 4 optional images.
    page = complete.content.decode()
    assert '<label for="id_prompt">Prompt</label>' in page
    assert re.search(r'id="id_param_max_tokens"[^>]*value="256"', page)
    assert re.search(r'<input type="file" id="id_files" name="files" accept="image/png', page)
    assert "multiple" in re.search(r'<input type="file"[^>]*>', page, flags=re.S).group(0)
    # Speech: the text and the voice (its default chosen).
    assert selected(speak, "voice") == "aria"
    assert "Speak</button>" in speak.content.decode()
    # Transcription: one audio file (required), the language optional ("Detect"), no text.
    page = transcribe.content.decode()
    file_input = re.search(r'<input type="file"[^>]*>', page, flags=re.S).group(0)
    assert "required" in file_input
    assert "multiple" not in file_input
    assert 'accept="audio/wav' in file_input
    assert '<option value="">Detect</option>' in page
    assert selected(transcribe, "language") == ""
    assert 'id="id_prompt"' not in page
    assert config(transcribe)["textField"] == ""


def test_the_price_counts_the_characters_on_the_server(history_user: Any) -> None:
    client = logged_in(history_user(credits=10))

    english = client.post(
        "/studio/price/",
        {"model": "sandbox-translate", "prompt": "Hello", "param_source_language": "en"},
    )
    hindi = client.post("/studio/price/", {"model": "sandbox-tts", "prompt": "नमस्ते"})
    empty = client.post("/studio/price/", {"model": "sandbox-translate", "prompt": ""})
    per_request = client.post(
        "/studio/price/", {"model": "sandbox-complete", "prompt": "anything at all"}
    )
    per_second = client.post("/studio/price/", {"model": "sandbox-transcribe"})
    image = client.get("/studio/price/", {"model": "sandbox-image", "param_num_outputs": "2"})

    assert "0.0001 credits" in text(english)  # 5 × 20 µ-credits
    assert "5 characters × 0.00002" in text(english)
    assert "0.0003 credits" in text(hindi)  # 6 code points × 50
    assert "6 characters × 0.00005" in text(hindi)
    assert "0.00002 per character of the text" in text(empty)
    assert "0.05 credits" in text(per_request)
    assert "from 0.01 credits" in text(per_second)
    assert "per second of the recording" in text(per_second)
    assert "2 credits" in text(image)  # the async models' price is unchanged


def test_the_studio_form_reprices_the_text_as_it_is_typed(history_user: Any) -> None:
    page = logged_in(history_user()).get("/studio/?model=sandbox-translate").content.decode()
    quote = re.search(r'<div id="quote".*?>', page, flags=re.S).group(0)

    assert 'hx-post="/studio/price/"' in quote
    assert "input delay:300ms from:#single-form" in quote
    assert "[name='prompt']" in quote


def test_a_sync_model_submitted_without_javascript_says_it_needs_it(history_user: Any) -> None:
    client = logged_in(history_user())

    response = client.post(
        "/studio/submit/",
        {"model": "sandbox-translate", "prompt": "Hello", "param_target_language": "hi"},
    )

    assert response.status_code == 200
    assert "needs JavaScript" in text(response)
    assert not Task.objects.exists()


def test_a_rerun_prefills_a_single_task(history_user: Any) -> None:
    user = history_user()
    task = run_single(user, "translation", {**TRANSLATION, "target_language": "de"}, {**TRANSLATED})

    response = logged_in(user).get(f"/studio/?rerun={task.pk}")

    assert 'data-model="sandbox-translate"' in response.content.decode()
    assert selected(response, "target_language") == "de"
    assert "Thank you</textarea>" in response.content.decode()


# --- History ------------------------------------------------------------------------------


def test_the_task_page_shows_a_translation_read_back_from_storage(history_user: Any) -> None:
    user = history_user()
    task = run_single(user, "translation", TRANSLATION, TRANSLATED)

    response = logged_in(user).get(f"/history/{task.pk}/")

    assert response.status_code == 200
    shown = text(response)
    assert "Translation en→hi" in shown
    assert "धन्यवाद" in shown
    assert "English → Hindi" in shown
    assert 'lang="hi"' in response.content.decode()


def test_the_task_page_shows_a_transcription_with_its_word_timings(history_user: Any) -> None:
    user = history_user()
    task = _transcribed(user)

    response = logged_in(user).get(f"/history/{task.pk}/")

    page = response.content.decode()
    assert "Hello there friend" in text(response)
    table = re.search(r'<table class="words".*?</table>', page, flags=re.S).group(0)
    rows = re.findall(r"<tr data-start-ms.*?</tr>", table, flags=re.S)
    assert len(rows) == 3
    assert [" ".join(re.sub(r"<[^>]+>", " ", r).split()) for r in rows] == [
        "Hello 0:00.15 0:00.51 0.98",
        "there 0:00.64 0:01.00 0.95",
        "friend 0:01.13 0:01.71 0.91",
    ]


def _transcribed(user: Any) -> Task:
    """A transcription task (it needs an audio file: a short WAV of a tone)."""
    import io
    import math
    import struct
    import wave

    from django.core.files.uploadedfile import SimpleUploadedFile

    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(
            b"".join(
                struct.pack("<h", int(8000 * math.sin(2 * math.pi * 220 * n / 16000)))
                for n in range(16000 * 2)
            )
        )
    audio = SimpleUploadedFile("speech.wav", buffer.getvalue(), content_type="audio/wav")
    start = single_start(
        user=user, single_type="transcription", data={"language": "en"}, files=[audio]
    )
    assert start.run is not None, start.task.error_message
    task, _ = single_finish(
        start.run,
        SingleOutput(
            result=TRANSCRIBED,
            file=ResultFile(
                data=json.dumps(TRANSCRIBED).encode(), mime="application/json", ext="json"
            ),
        ),
    )
    return task


def test_the_list_labels_single_tasks_without_reading_their_results(
    history_user: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    user = history_user()
    translation = run_single(user, "translation", TRANSLATION, TRANSLATED)
    transcription = _transcribed(user)

    def never(task: Any) -> None:
        raise AssertionError("the list read a stored result")

    monkeypatch.setattr(history_page, "single_result", never)
    response = logged_in(user).get("/history/")

    assert response.status_code == 200
    page = response.content.decode()
    row = re.search(rf'<li class="task card" id="task-{translation.pk}".*?</li>', page, re.S)
    assert "Translation en→hi" in row.group(0)
    assert "Thank you" in row.group(0)  # its prompt
    row = re.search(rf'<li class="task card" id="task-{transcription.pk}".*?</li>', page, re.S)
    assert "Transcription (en)" in row.group(0)
    assert "(no prompt)" not in row.group(0)


def test_speech_is_an_audio_player_on_the_task_page(history_user: Any) -> None:
    user = history_user()
    task = run_single(
        user,
        "text_to_speech",
        {"text": "Hello there", "voice": "meera"},
        {"voice": "meera", "characters": 11},
        content=b"RIFF....WAVEfmt ",
        mime="audio/wav",
        ext="wav",
        duration_ms=1200,
    )

    response = logged_in(user).get(f"/history/{task.pk}/")
    listed = logged_in(user).get("/history/")

    assert f'<audio controls preload="metadata" src="/api/v1/tasks/{task.pk}/results/0/"' in (
        response.content.decode()
    )
    assert "Speech, voice meera" in text(response)
    assert "Speech, voice meera" in text(listed)
    assert "voice meera" in text(response)


def test_an_expired_result_shows_as_expired(history_user: Any) -> None:
    user = history_user()
    task = run_single(user, "translation", TRANSLATION, TRANSLATED)
    Task.objects.filter(pk=task.pk).update(results_expired_at=timezone.now())

    response = logged_in(user).get(f"/history/{task.pk}/")

    assert "धन्यवाद" not in text(response)
    assert "The result files were deleted" in text(response)


def test_the_studio_shows_a_single_result_in_place(history_user: Any) -> None:
    user = history_user()
    task = run_single(user, "translation", TRANSLATION, TRANSLATED)

    response = logged_in(user).get(f"/studio/tasks/{task.pk}/result/")
    card = logged_in(user).get(f"/studio/tasks/{task.pk}/")

    assert response.status_code == 200
    assert "धन्यवाद" in text(response)
    assert "Charged 0.00018 credits" in text(response)  # 9 characters × 20
    assert "Translation en→hi" in text(card)


def test_another_users_single_task_is_404(history_user: Any) -> None:
    owner, stranger = history_user(), history_user()
    task = run_single(owner, "translation", TRANSLATION, TRANSLATED)
    client = logged_in(stranger)

    assert client.get(f"/history/{task.pk}/").status_code == 404
    assert client.get(f"/studio/tasks/{task.pk}/result/").status_code == 404
    assert client.get(f"/studio/tasks/{task.pk}/").status_code == 404
    assert "धन्यवाद" not in client.get(f"/history/{task.pk}/").content.decode()


def test_the_dashboard_names_a_single_task_that_has_no_prompt(history_user: Any) -> None:
    user = history_user()
    _transcribed(user)
    page = text(logged_in(user).get("/dashboard/"))
    assert "Transcription (en)" in page
    assert "(no prompt)" not in page
