"""The sandbox's four synchronous services (docs/sandbox.md, "Synchronous services"):
translation, completion, text to speech and transcription. One request, one answer.

Pure functions and data, no I/O: ``server.py`` reads the body, counts the request in flight,
waits out ``sandbox_latency_ms`` (noticing a client that hangs up), applies ``sandbox_outcome``
and sends what ``run`` returns. Validation happens first (``parse``): a malformed body is a 400
``invalid_request``, an input the service cannot take (an unsupported language or voice, empty
text) a 422 with its own code, both at once; a 422 found only by doing the work (unreadable
audio) comes after the latency, like any answer.

Everything is deterministic: the same request always gives the same bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tasks.sandbox import chat, speech

SERVICES = ("translate", "completions", "speech", "transcriptions")
OUTCOMES = ("success", "fail", "reject")
LANGUAGES = ("en", "hi", "es", "fr", "de")
MAX_LATENCY_MS = 600_000
MAX_TRANSLATE_CHARS = 100_000

FAIL_MESSAGE = "The sandbox failed (sandbox_outcome=fail)."
REJECT_MESSAGE = "The sandbox refused the input (sandbox_outcome=reject)."


class Invalid(ValueError):
    """A malformed request: 400 ``invalid_request``."""


class Refused(ValueError):
    """An input the service cannot take: 422 with ``code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Answer:
    """What to send: a JSON ``payload``, or raw ``data`` of ``content_type`` with ``headers``."""

    status: int = 200
    payload: Any = None
    data: bytes | None = None
    content_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    """A validated request: the knobs, and the work to do once they allow it."""

    service: str
    latency_s: float
    outcome: str
    work: Callable[[], Answer]


def error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


# ---- request parsing -------------------------------------------------------------------------


def _integer(params: Mapping[str, Any], name: str, low: int, high: int, default: int) -> int:
    value = params.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Invalid(f"{name} must be a number.")
    if isinstance(value, float) and not value.is_integer():
        raise Invalid(f"{name} must be a whole number.")
    if not low <= value <= high:
        raise Invalid(f"{name} must be between {low} and {high}.")
    return int(value)


def _string(body: Mapping[str, Any], name: str, *, required: bool = True) -> str:
    value = body.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise Invalid(f"{name} must be a string.")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate survives JSON decoding
        raise Invalid(f"{name} is not valid Unicode.") from None
    return value


def _file(item: Any, where: str) -> tuple[str, str, bytes]:
    if not isinstance(item, dict) or not isinstance(item.get("data_b64"), str):
        raise Invalid(f"{where} needs name, mime and data_b64.")
    try:
        data = base64.b64decode(item["data_b64"], validate=True)
    except (binascii.Error, ValueError):
        raise Invalid(f"{where}.data_b64 is not valid base64.") from None
    return str(item.get("name") or ""), str(item.get("mime") or ""), data


def _language(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise Invalid(f"{name} must be a string.")
    if value not in LANGUAGES:
        raise Refused(
            "unsupported_language",
            f"{name} {value!r} is not supported; the sandbox speaks {', '.join(LANGUAGES)}.",
        )
    return value


def parse(service: str, body: Any) -> Plan:
    """Validate a request to ``POST /v1/<service>``. Raises ``Invalid`` (400) or ``Refused``
    (422). Unknown params (the model's own options, other sandbox knobs) are ignored."""
    if not isinstance(body, dict):
        raise Invalid("The body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise Invalid("model is required.")
    params = body.get("params")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise Invalid("params must be an object.")
    latency_ms = _integer(params, "sandbox_latency_ms", 0, MAX_LATENCY_MS, 0)
    outcome = params.get("sandbox_outcome", "success")
    if outcome not in OUTCOMES:
        raise Invalid(f"sandbox_outcome must be one of {', '.join(OUTCOMES)}.")
    parsers = {
        "translate": _translation,
        "completions": _completion,
        "speech": _speech,
        "transcriptions": _transcription,
    }
    work = parsers[service](body, params)
    return Plan(service=service, latency_s=latency_ms / 1000, outcome=outcome, work=work)


def _translation(body: dict[str, Any], params: dict[str, Any]) -> Callable[[], Answer]:
    text = _string(body, "text")
    source = _language(body.get("source_language"), "source_language")
    target = _language(body.get("target_language"), "target_language")
    if source == target:
        raise Refused("same_language", "source_language and target_language are the same.")
    if not text.strip():
        raise Refused("empty_text", "There is no text to translate.")
    if len(text) > MAX_TRANSLATE_CHARS:
        raise Refused("text_too_long", f"At most {MAX_TRANSLATE_CHARS} characters.")

    def work() -> Answer:
        return Answer(
            payload={
                "text": translate(text, source, target),
                "characters": len(text),
                "source_language": source,
                "target_language": target,
            }
        )

    return work


def _completion(body: dict[str, Any], params: dict[str, Any]) -> Callable[[], Answer]:
    prompt = _string(body, "prompt")
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise Invalid("max_tokens must be an integer of at least 1.")
    files = body.get("files") or []
    if not isinstance(files, list):
        raise Invalid("files must be a list.")
    decoded = [_file(item, f"files[{n}]") for n, item in enumerate(files)]
    wanted = _integer(
        params, "sandbox_reply_tokens", 0, chat.MAX_REPLY_TOKENS, chat.DEFAULT_REPLY_TOKENS
    )

    def work() -> Answer:
        return Answer(payload=complete(prompt, max_tokens, wanted, [d for _, _, d in decoded]))

    return work


def _speech(body: dict[str, Any], params: dict[str, Any]) -> Callable[[], Answer]:
    text = _string(body, "text")
    voice = body.get("voice") or speech.DEFAULT_VOICE
    if not isinstance(voice, str):
        raise Invalid("voice must be a string.")
    if voice not in speech.VOICES:
        raise Refused(
            "unsupported_voice",
            f"No voice {voice!r}; the sandbox has {', '.join(sorted(speech.VOICES))}.",
        )
    if not speech.speech_words(text):
        raise Refused("empty_text", "There is nothing to say: the text has no words.")
    if len(text) > speech.MAX_SPEECH_CHARS:
        raise Refused("text_too_long", f"At most {speech.MAX_SPEECH_CHARS} characters.")

    def work() -> Answer:
        spoken = speech.synthesize(text, voice)
        return Answer(
            data=spoken.wav,
            content_type="audio/wav",
            headers={
                "X-Duration-Ms": str(spoken.duration_ms),
                "X-Voice": spoken.voice,
                "X-Characters": str(len(text)),
                "X-Words": str(spoken.words),
            },
        )

    return work


def _transcription(body: dict[str, Any], params: dict[str, Any]) -> Callable[[], Answer]:
    language = body.get("language")
    if language is not None:
        language = _language(language, "language")
    _, _, data = _file(body.get("audio"), "audio")

    def work() -> Answer:
        try:
            transcript = speech.transcribe(data, language)
        except speech.AudioTooLong as exc:
            return Answer(status=422, payload=error("audio_too_long", str(exc)))
        except speech.UnreadableAudio as exc:
            return Answer(
                status=422, payload=error("unreadable_audio", f"The audio cannot be read: {exc}")
            )
        return Answer(
            payload={
                "text": transcript.text,
                "language": transcript.language,
                "duration_ms": transcript.duration_ms,
                "words": [
                    {
                        "text": w.text,
                        "start_ms": w.start_ms,
                        "end_ms": w.end_ms,
                        "confidence": w.confidence,
                    }
                    for w in transcript.words
                ],
            }
        )

    return work


# ---- completion ------------------------------------------------------------------------------


def file_tokens(data: bytes) -> int:
    """A file's share of the input count: 4 (framing, as a chat message) + ceil(bytes / 4)."""
    return 4 + (len(data) + 3) // 4


def complete(prompt: str, max_tokens: int, wanted: int, files: list[bytes]) -> dict[str, Any]:
    """A completion counted like a chat turn made of one user message ``prompt``: the reply is
    ``chat.reply_tokens`` (seeded by the prompt, and the files' SHA-256 when there are any)
    cut at ``max_tokens``; ``input_tokens`` is ``chat.prompt_tokens([prompt])`` plus
    ``file_tokens`` per file."""
    seed = prompt + "".join("\x00" + hashlib.sha256(data).hexdigest() for data in files)
    tokens = chat.reply_tokens(seed, min(wanted, max_tokens))
    return {
        "text": "".join(tokens),
        "finish_reason": "length" if max_tokens < wanted else "stop",
        "usage": {
            "input_tokens": chat.prompt_tokens([prompt]) + sum(file_tokens(d) for d in files),
            "output_tokens": len(tokens),
        },
    }


# ---- translation -----------------------------------------------------------------------------

# English → (Hindi, Spanish, French, German). An empty entry: the word is dropped (Hindi has no
# articles). Multi-word keys and values are phrases, matched before single words.
DICTIONARY: dict[str, tuple[str, str, str, str]] = {
    "hello": ("नमस्ते", "hola", "bonjour", "hallo"),
    "world": ("दुनिया", "mundo", "monde", "Welt"),
    "good": ("अच्छा", "bueno", "bon", "gut"),
    "morning": ("सुबह", "mañana", "matin", "Morgen"),
    "evening": ("शाम", "tarde", "soir", "Abend"),
    "night": ("रात", "noche", "nuit", "Nacht"),
    "day": ("दिन", "día", "jour", "Tag"),
    "thank you": ("धन्यवाद", "gracias", "merci", "danke"),
    "thanks": ("धन्यवाद", "gracias", "merci", "danke"),
    "yes": ("हाँ", "sí", "oui", "ja"),
    "no": ("नहीं", "no", "non", "nein"),
    "please": ("कृपया", "por favor", "s'il vous plaît", "bitte"),
    "i": ("मैं", "yo", "je", "ich"),
    "you": ("आप", "tú", "tu", "du"),
    "we": ("हम", "nosotros", "nous", "wir"),
    "he": ("वह", "él", "il", "er"),
    "she": ("वह", "ella", "elle", "sie"),
    "is": ("है", "es", "est", "ist"),
    "am": ("हूँ", "soy", "suis", "bin"),
    "are": ("हैं", "son", "sont", "sind"),
    "the": ("", "el", "le", "der"),
    "a": ("एक", "un", "un", "ein"),
    "and": ("और", "y", "et", "und"),
    "or": ("या", "o", "ou", "oder"),
    "with": ("साथ", "con", "avec", "mit"),
    "water": ("पानी", "agua", "eau", "Wasser"),
    "food": ("भोजन", "comida", "nourriture", "Essen"),
    "house": ("घर", "casa", "maison", "Haus"),
    "book": ("किताब", "libro", "livre", "Buch"),
    "friend": ("दोस्त", "amigo", "ami", "Freund"),
    "love": ("प्यार", "amor", "amour", "Liebe"),
    "time": ("समय", "tiempo", "temps", "Zeit"),
    "today": ("आज", "hoy", "aujourd'hui", "heute"),
    "tomorrow": ("कल", "mañana", "demain", "morgen"),
    "name": ("नाम", "nombre", "nom", "Name"),
    "my": ("मेरा", "mi", "mon", "mein"),
    "your": ("आपका", "tu", "ton", "dein"),
    "what": ("क्या", "qué", "quoi", "was"),
    "how": ("कैसे", "cómo", "comment", "wie"),
    "where": ("कहाँ", "dónde", "où", "wo"),
    "big": ("बड़ा", "grande", "grand", "groß"),
    "small": ("छोटा", "pequeño", "petit", "klein"),
    "new": ("नया", "nuevo", "nouveau", "neu"),
    "city": ("शहर", "ciudad", "ville", "Stadt"),
    "country": ("देश", "país", "pays", "Land"),
    "language": ("भाषा", "idioma", "langue", "Sprache"),
    "speak": ("बोलना", "hablar", "parler", "sprechen"),
    "eat": ("खाना", "comer", "manger", "essen"),
    "go": ("जाना", "ir", "aller", "gehen"),
    "come": ("आना", "venir", "venir", "kommen"),
    "beautiful": ("सुंदर", "hermoso", "beau", "schön"),
    "cat": ("बिल्ली", "gato", "chat", "Katze"),
    "dog": ("कुत्ता", "perro", "chien", "Hund"),
    "red": ("लाल", "rojo", "rouge", "rot"),
    "blue": ("नीला", "azul", "bleu", "blau"),
    "green": ("हरा", "verde", "vert", "grün"),
    "sun": ("सूरज", "sol", "soleil", "Sonne"),
    "moon": ("चाँद", "luna", "lune", "Mond"),
    "one": ("एक", "uno", "un", "eins"),
    "two": ("दो", "dos", "deux", "zwei"),
    "three": ("तीन", "tres", "trois", "drei"),
    "very": ("बहुत", "muy", "très", "sehr"),
    "is not": ("नहीं है", "no es", "n'est pas", "ist nicht"),
    "not": ("नहीं", "no", "pas", "nicht"),
    "in": ("में", "en", "dans", "in"),
    "of": ("का", "de", "de", "von"),
    "to": ("को", "a", "à", "zu"),
    "for": ("के लिए", "para", "pour", "für"),
    "on": ("पर", "sobre", "sur", "auf"),
    "it": ("यह", "eso", "ça", "es"),
    "this": ("यह", "este", "ce", "dieser"),
    "that": ("वह", "ese", "cela", "das"),
    "from": ("से", "de", "de", "aus"),
}
_COLUMN = {"hi": 0, "es": 1, "fr": 2, "de": 3}


def _reverse(column: int) -> dict[str, str]:
    """Language → English, from ``DICTIONARY``'s column: the first English entry wins."""
    reverse: dict[str, str] = {}
    for english, row in DICTIONARY.items():
        word = row[column].lower()
        if word and word not in reverse:
            reverse[word] = english
    return reverse


FROM_ENGLISH = {
    lang: {en: row[col] for en, row in DICTIONARY.items()} for lang, col in _COLUMN.items()
}
TO_ENGLISH = {lang: _reverse(col) for lang, col in _COLUMN.items()}
MAX_PHRASE = max(
    len(key.split()) for table in (*FROM_ENGLISH.values(), *TO_ENGLISH.values()) for key in table
)


def _word_char(ch: str) -> bool:
    """Letters, digits and combining marks (Devanagari vowel signs are marks, not letters)."""
    return ch.isalnum() or unicodedata.category(ch).startswith("M")


def tokenize(text: str) -> list[str]:
    """``text`` as alternating runs of word characters and of the rest; an apostrophe between
    two word characters belongs to the word (``aujourd'hui``, ``s'il``)."""
    tokens: list[str] = []
    current = ""
    current_word = False
    for n, ch in enumerate(text):
        is_word = _word_char(ch) or (
            ch in "'’" and current_word and n + 1 < len(text) and _word_char(text[n + 1])
        )
        if current and is_word != current_word:
            tokens.append(current)
            current = ""
        current += ch
        current_word = is_word
    if current:
        tokens.append(current)
    return tokens


def _match_case(source: str, translation: str) -> str:
    """Keep the source word's capitalisation (in scripts that have case)."""
    if not translation or not source[:1].isupper():
        return translation
    if len(source) > 1 and source.isupper():
        return translation.upper()
    return translation[:1].upper() + translation[1:]


def _translate_step(text: str, source: str, target: str) -> str:
    """One hop, to or from English: phrases then words from the dictionary, the rest through
    ``fallback``; separators kept as they are."""
    table = FROM_ENGLISH[target] if source == "en" else TO_ENGLISH[source]
    tokens = tokenize(text)
    out: list[str] = []
    n = 0
    while n < len(tokens):
        token = tokens[n]
        if not _word_char(token[0]):
            out.append(token)
            n += 1
            continue
        matched = False
        for size in range(MAX_PHRASE, 0, -1):
            # words n, n+2, ... separated by single spaces
            span = tokens[n : n + 2 * size - 1]
            if len(span) != 2 * size - 1 or any(sep != " " for sep in span[1::2]):
                continue
            key = " ".join(span[::2]).lower()
            if key in table:
                translation = table[key]
                if not translation:  # dropped, with the space after it
                    n += 2 * size - 1
                    if n < len(tokens) and tokens[n] == " ":
                        n += 1
                else:
                    out.append(_match_case(token, translation))
                    n += 2 * size - 1
                matched = True
                break
        if not matched:
            out.append(_match_case(token, fallback(token, source, target)))
            n += 1
    return "".join(out)


def translate(text: str, source: str, target: str) -> str:
    """``text`` from ``source`` to ``target`` (both in ``LANGUAGES``, different): through
    English when neither is English. Out of Hindi (no letter case, the danda ends sentences)
    sentences get capitals and full stops; into Hindi full stops become dandas."""
    if source != "en" and target != "en":
        translated = _translate_step(_translate_step(text, source, "en"), "en", target)
    else:
        translated = _translate_step(text, source, target)
    if target == "hi":
        return re.sub(r"\.(?=\s|$)", "।", translated)
    if source == "hi" or _is_devanagari(text):
        translated = translated.replace("।", ".")
        return re.sub(r"(^|[.!?]\s+)([a-z])", lambda m: m.group(1) + m.group(2).upper(), translated)
    return translated


def fallback(word: str, source: str, target: str) -> str:
    """A word the dictionary lacks: transliterated between scripts (Latin ↔ Devanagari), given
    the target's spelling habits into Spanish, French or German, kept as is into English."""
    if target == "hi":
        return to_devanagari(word)
    if _is_devanagari(word):
        word = from_devanagari(word)
    if target == "es":
        return SPANISH.apply(word)
    if target == "fr":
        return FRENCH.apply(word)
    if target == "de":
        flavoured = GERMAN.apply(word)
        return flavoured[:1].upper() + flavoured[1:]  # German nouns are capitalised
    return word


def _is_devanagari(word: str) -> bool:
    return any("\u0900" <= ch <= "\u097f" for ch in word)


@dataclass(frozen=True)
class Spelling:
    """A target language's spelling habits for an English word it has no entry for: one
    suffix rewrite, letter rewrites in one left-to-right pass (longest first), and what a
    word ending in a consonant gets appended."""

    suffixes: tuple[tuple[str, str], ...]
    letters: Mapping[str, str]
    ending: str = ""

    def apply(self, word: str) -> str:
        lowered = word.lower()
        if not lowered.isascii() or not lowered.isalpha() or len(lowered) < 3:
            return word  # short words, names with accents, numbers: kept as they are
        stem, tail = lowered, ""
        for suffix, replacement in self.suffixes:
            if lowered.endswith(suffix):
                stem, tail = lowered[: -len(suffix)], replacement
                break
        out: list[str] = []
        n = 0
        while n < len(stem):
            key = next((k for k in (stem[n : n + 2], stem[n]) if k in self.letters), None)
            if key is None:
                out.append(stem[n])
                n += 1
            else:
                out.append(self.letters[key])
                n += len(key)
        rewritten = "".join(out) + tail
        if not tail and self.ending and rewritten[-1] not in "aeiouy":
            rewritten += self.ending
        return rewritten


SPANISH = Spelling(
    suffixes=(("tion", "ción"), ("ty", "dad"), ("ous", "oso"), ("ic", "ico")),
    letters={"ph": "f", "th": "t", "sh": "s", "k": "c", "w": "gu"},
    ending="o",
)
FRENCH = Spelling(
    suffixes=(("ty", "té"), ("ous", "eux"), ("ic", "ique"), ("ism", "isme"), ("er", "eur")),
    letters={"k": "qu", "sh": "ch"},
    ending="e",
)
GERMAN = Spelling(
    suffixes=(("ty", "tät"), ("ic", "isch"), ("ism", "ismus")),
    letters={"sh": "sch", "ch": "ch", "ck": "ck", "c": "k", "th": "t"},
)


# ---- transliteration -------------------------------------------------------------------------

_CONSONANTS = {
    "kh": "ख", "gh": "घ", "ch": "च", "jh": "झ", "th": "थ", "dh": "ध", "ph": "फ", "bh": "भ",
    "sh": "श", "b": "ब", "c": "क", "d": "द", "f": "फ़", "g": "ग", "h": "ह", "j": "ज", "k": "क",
    "l": "ल", "m": "म", "n": "न", "p": "प", "q": "क़", "r": "र", "s": "स", "t": "ट", "v": "व",
    "w": "व", "x": "क्स", "y": "य", "z": "ज़",
}  # fmt: skip
# vowel → (independent letter, sign after a consonant; "" for the inherent a)
_VOWELS = {
    "aa": ("आ", "ा"), "ai": ("ऐ", "ै"), "au": ("औ", "ौ"), "ee": ("ई", "ी"), "oo": ("ऊ", "ू"),
    "a": ("अ", ""), "e": ("ए", "े"), "i": ("इ", "ि"), "o": ("ओ", "ो"), "u": ("उ", "ु"),
}  # fmt: skip
VIRAMA = "्"


def to_devanagari(word: str) -> str:
    """Latin letters → Devanagari, phonetically: consonant clusters joined by the virama, vowels
    as signs after a consonant and as letters elsewhere, a final ``y`` after a consonant read as
    ``ee`` (city → सिटी). Other characters are kept."""
    text = word.lower()
    out: list[str] = []
    n = 0
    after_consonant = False
    while n < len(text):
        if text[n] == "y" and after_consonant and (n + 1 == len(text) or not text[n + 1].isalpha()):
            out.append("ी")
            after_consonant = False
            n += 1
            continue
        vowel = next((v for v in (text[n : n + 2], text[n]) if v in _VOWELS), None)
        if vowel is not None:
            letter, sign = _VOWELS[vowel]
            out.append(sign if after_consonant else letter)
            after_consonant = False
            n += len(vowel)
            continue
        consonant = next((c for c in (text[n : n + 2], text[n]) if c in _CONSONANTS), None)
        if consonant is not None:
            if after_consonant:
                out.append(VIRAMA)
            out.append(_CONSONANTS[consonant])
            after_consonant = True
            n += len(consonant)
            continue
        out.append(text[n])
        after_consonant = False
        n += 1
    return "".join(out)


_DEVANAGARI_CONSONANTS = {
    "क": "k", "ख": "kh", "ग": "g", "घ": "gh", "ङ": "ng", "च": "ch", "छ": "chh", "ज": "j",
    "झ": "jh", "ञ": "ny", "ट": "t", "ठ": "th", "ड": "d", "ढ": "dh", "ण": "n", "त": "t",
    "थ": "th", "द": "d", "ध": "dh", "न": "n", "प": "p", "फ": "ph", "ब": "b", "भ": "bh",
    "म": "m", "य": "y", "र": "r", "ल": "l", "व": "v", "श": "sh", "ष": "sh", "स": "s", "ह": "h",
}  # fmt: skip
_DEVANAGARI_VOWELS = {
    "अ": "a", "आ": "aa", "इ": "i", "ई": "ee", "उ": "u", "ऊ": "oo", "ऋ": "ri", "ए": "e",
    "ऐ": "ai", "ओ": "o", "औ": "au",
}  # fmt: skip
_DEVANAGARI_SIGNS = {
    "ा": "aa", "ि": "i", "ी": "ee", "ु": "u", "ू": "oo", "ृ": "ri", "े": "e", "ै": "ai",
    "ो": "o", "ौ": "au",
}  # fmt: skip
_DEVANAGARI_OTHER = {"ं": "n", "ँ": "n", "ः": "h", "़": "", "।": ".", "॥": "."}


def from_devanagari(word: str) -> str:
    """Devanagari → Latin letters: a consonant carries an ``a`` unless a vowel sign or the
    virama follows, and drops it at the end of the word (Hindi's final schwa: नाम → naam)."""
    out: list[str] = []
    pending_a = False
    for ch in word:
        if ch in _DEVANAGARI_CONSONANTS:
            if pending_a:
                out.append("a")
            out.append(_DEVANAGARI_CONSONANTS[ch])
            pending_a = True
        elif ch in _DEVANAGARI_SIGNS:
            out.append(_DEVANAGARI_SIGNS[ch])
            pending_a = False
        elif ch == VIRAMA:
            pending_a = False
        elif ch in _DEVANAGARI_OTHER:
            if pending_a and ch in "ंँः":
                out.append("a")
            pending_a = False
            out.append(_DEVANAGARI_OTHER[ch])
        else:
            if pending_a:
                out.append("a")
            pending_a = False
            if ch in _DEVANAGARI_VOWELS:
                out.append(_DEVANAGARI_VOWELS[ch])
            elif "\u0966" <= ch <= "\u096f":
                out.append(str(ord(ch) - 0x966))
            else:
                out.append(ch)
    return "".join(out)
