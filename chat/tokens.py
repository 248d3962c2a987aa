"""Counting tokens offline, conservatively (``docs/chat.md``).

No tokenizer that ships inside a package covers every model, and none may be downloaded at run
time, so Rivya estimates: one token per two bytes of UTF-8 text, plus 4 tokens per message (its
role and separators) and 3 per request (the reply's priming). Byte-pair tokenizers average about
four bytes per token on English text and rarely fall below two, so the estimate is high for
ordinary text. It decides how much a turn holds and how much history fits the context window;
what is billed is the usage the provider reports, capped at the hold.
"""

from __future__ import annotations

from collections.abc import Iterable

PER_REQUEST = 3
PER_MESSAGE = 4
BYTES_PER_TOKEN = 2


def text_tokens(text: str) -> int:
    """Estimated tokens of one piece of text (0 for empty text)."""
    size = len(text.encode("utf-8"))
    return -(-size // BYTES_PER_TOKEN)


def message_tokens(content: str) -> int:
    """Estimated tokens one message adds to a request."""
    return PER_MESSAGE + text_tokens(content)


def request_tokens(contents: Iterable[str]) -> int:
    """Estimated input tokens of a request made of these messages' contents."""
    return PER_REQUEST + sum(message_tokens(c) for c in contents)
