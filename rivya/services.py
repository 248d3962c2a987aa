"""Writes for users and API keys."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Any

from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone

from rivya.errors import NotFound
from rivya.models import ApiKey, User, hash_api_key
from rivya.sql import execute_checking_connection, from_row, select_list

KEY_RE = re.compile(r"^rv_([a-f0-9]{12})_([A-Za-z0-9_-]{20,100})$")


@dataclass(frozen=True)
class NewApiKey:
    api_key: ApiKey
    raw: str  # shown once; only its hash is stored


def api_key_create(*, user: User, name: str = "") -> NewApiKey:
    """Create a key for ``user``. The raw key is returned once and never stored."""
    prefix = secrets.token_hex(6)
    raw = f"rv_{prefix}_{secrets.token_urlsafe(32)}"
    api_key = ApiKey.objects.create(
        user=user, name=name[:100], prefix=prefix, key_hash=hash_api_key(raw)
    )
    return NewApiKey(api_key=api_key, raw=raw)


def api_key_revoke(*, user: User, prefix: str) -> ApiKey:
    """Revoke one of ``user``'s keys; revoking twice is harmless. Raises NotFound."""
    ApiKey.objects.filter(user=user, prefix=prefix, revoked_at__isnull=True).update(
        revoked_at=timezone.now()
    )
    try:
        return ApiKey.objects.get(user=user, prefix=prefix)
    except ApiKey.DoesNotExist:
        raise NotFound("No such API key.") from None


def api_key_authenticate(*, raw: str) -> ApiKey | None:
    """The active key matching ``raw`` (constant-time comparison), or None."""
    match = KEY_RE.match(raw)
    if not match:
        return None
    key = _active_key_with_user(match.group(1))
    if key is None or not key.matches(raw):
        return None
    now = timezone.now()
    if key_use_due(key, now):
        ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)
        key.last_used_at = now
    return key


def key_use_due(key: ApiKey, now: Any) -> bool:
    """Whether a request with ``key`` records its use (``last_used_at``): at most once a minute,
    so that requests do not write."""
    return key.last_used_at is None or (now - key.last_used_at).total_seconds() > 60


def usable_key_condition(key: str, user: str) -> str:
    """The SQL condition under which a key row (alias ``key``) with its user row (alias
    ``user``) authenticates: the key unrevoked, the user active. The key lookup uses it, and so
    does the submit's accept statement, which checks a key the process has copied."""
    return f"{key}.revoked_at IS NULL AND {user}.is_active"


def _active_key_with_user(prefix: str) -> ApiKey | None:
    """The usable key ``prefix`` with its user, in one query written out once (this runs on
    every API request; building it with the ORM cost more CPU than the rest of a submit)."""
    db = transaction.get_connection()
    # Prepared on PostgreSQL (parsed and planned once per connection), when outside a
    # transaction, as on every request: inside one it would need a savepoint (two more round
    # trips) to stay usable if the connection lost the prepared statement. The first statement
    # of an API request, it is the connection's health check too.
    if db.vendor == "postgresql" and not db.in_atomic_block:
        row = execute_checking_connection(db, _key_query(db), [prefix], label="rivya_api_key")
    else:
        with db.cursor() as cursor:
            cursor.execute(_key_query(db), [prefix])
            row = cursor.fetchone()
    if row is None:
        return None
    width = len(ApiKey._meta.concrete_fields)
    key = from_row(ApiKey, db, row[:width])
    key.user = from_row(User, db, row[width:])
    return key


_key_queries: dict[str, str] = {}


def _key_query(db: Any) -> str:
    """The query's text, built once per kind of database from the model metadata (the prefix
    is a parameter)."""
    if db.vendor not in _key_queries:
        _key_queries[db.vendor] = (
            f"SELECT {select_list(ApiKey, 'k', db)}, {select_list(User, 'u', db)} "  # noqa: S608
            f"FROM {ApiKey._meta.db_table} k JOIN {User._meta.db_table} u ON u.id = k.user_id "
            f"WHERE k.prefix = %s AND {usable_key_condition('k', 'u')}"
        )
    return _key_queries[db.vendor]


def user_find(*, identifier: str) -> User:
    """A user by username, or by email where the email is unique. Raises NotFound."""
    users = get_user_model().objects
    user = users.filter(username=identifier).first()
    if user is not None:
        return user
    matches = list(users.filter(email__iexact=identifier)[:2])
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise NotFound(
            f"Several users have the email {identifier!r}; use the username.",
            code="ambiguous_user",
            status=400,
        )
    raise NotFound(f"No user {identifier!r}.")


@transaction.atomic
def user_signup(*, username: str, email: str, password: str) -> User:
    """Create a user and grant the signup credits (SIGNUP_GRANT_CREDITS), in one transaction."""
    from django.conf import settings

    from billing import services as billing
    from rivya.money import parse_credits

    user = get_user_model().objects.create_user(username=username, email=email, password=password)
    amount = parse_credits(settings.SIGNUP_GRANT_CREDITS, allow_zero=True)
    if amount:
        billing.grant(
            user=user,
            amount=amount,
            reason="Signup grant",
            kind="grant",
            idempotency_key=f"signup:{user.pk}",
        )
    return user
