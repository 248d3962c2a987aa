"""The API keys this process has authenticated, kept for the submit's one-statement path
(``tasks.api.views.submit_json``, docs/submit.md).

A copy is never enough on its own to answer a request. A submit made with a copied key is
accepted only by the accept statement, which checks in the same transaction that the key is
still unrevoked and its user active (``Credential``, ``tasks.services.accept``). Every other
answer (a refusal, a validation error, the key changed) is given after the key is looked up in
the database again. So a revoked key or a deactivated user is refused on its next request,
whatever this process holds.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from django.utils import timezone

from rivya.models import ApiKey
from rivya.services import KEY_RE, key_use_due

MAX_KEYS = 10_000  # the oldest copy goes when a process has seen more keys than this


@dataclass(frozen=True)
class Credential:
    """What the accept statement checks of a copied key: this key of this user, unrevoked, the
    user active."""

    key_id: int
    user_id: int


_keys: dict[str, ApiKey] = {}
_changing = threading.Lock()  # remember and forget (gthread workers share the dict)


def copied_key(raw: str) -> ApiKey | None:
    """The copy of the key ``raw`` (with its user), if this process holds one, ``raw`` matches
    it, and the key's use need not be recorded now (that takes the database lookup)."""
    match = KEY_RE.match(raw)
    key = _keys.get(match.group(1)) if match else None
    if key is None or not key.matches(raw) or key_use_due(key, timezone.now()):
        return None
    return key


def credential(key: ApiKey) -> Credential:
    return Credential(key_id=key.pk, user_id=key.user_id)


def remember(key: ApiKey) -> None:
    """Keep ``key`` (just authenticated in the database, with its user)."""
    with _changing:
        _keys.pop(key.prefix, None)
        if len(_keys) >= MAX_KEYS:
            _keys.pop(next(iter(_keys)), None)
        _keys[key.prefix] = key


def forget(raw: str) -> None:
    """Drop the copy of the key ``raw`` (the database no longer accepts it). Only a request
    with the key itself can: another secret with the same prefix leaves the copy alone."""
    match = KEY_RE.match(raw)
    key = _keys.get(match.group(1)) if match else None
    if key is not None and key.matches(raw):
        with _changing:
            _keys.pop(key.prefix, None)


def clear() -> None:
    with _changing:
        _keys.clear()
