"""API keys and sessions: who the API lets in, what it answers everyone else."""

from __future__ import annotations

import io
import re
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client
from rest_framework.test import APIClient

from billing import selectors
from billing import services as billing
from billing.models import Account
from rivya import services
from rivya.models import ApiKey, hash_api_key

pytestmark = pytest.mark.django_db
C = 1_000_000
CREDITS = "/api/v1/credits/"


def bearer(raw: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    return client


def assert_401(response: Any, code: str) -> None:
    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Bearer"
    error = response.json()["error"]
    assert error["code"] == code
    assert error["kind"] == "user"
    assert isinstance(error["message"], str)
    assert error["message"]


def test_bearer_key_authenticates_as_its_owner(user: Any) -> None:
    billing.grant(user=user, amount=7 * C, reason="x")
    raw = services.api_key_create(user=user).raw

    response = bearer(raw).get(CREDITS)

    assert response.status_code == 200
    assert response.json()["balance_micro"] == 7 * C


def test_bearer_keyword_is_case_insensitive(user: Any) -> None:
    raw = services.api_key_create(user=user).raw
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"bearer {raw}")

    response = client.get(CREDITS)

    assert response.status_code == 200


def test_key_use_is_recorded(user: Any) -> None:
    new = services.api_key_create(user=user)
    assert new.api_key.last_used_at is None

    bearer(new.raw).get(CREDITS)

    new.api_key.refresh_from_db()
    assert new.api_key.last_used_at is not None


def test_wrong_key_is_refused(user: Any) -> None:
    raw = services.api_key_create(user=user).raw
    prefix, secret = raw.rsplit("_", 1)
    # Same prefix (so the key row is found) but a different secret: only the hash decides.
    wrong = f"{prefix}_{'A' * len(secret)}"

    response = bearer(wrong).get(CREDITS)

    assert_401(response, "authentication_failed")


def test_unknown_well_formed_key_is_refused(user: Any) -> None:
    services.api_key_create(user=user)

    response = bearer("rv_000000000000_" + "x" * 43).get(CREDITS)

    assert_401(response, "authentication_failed")


@pytest.mark.parametrize(
    "header",
    [
        "Bearer",
        "Bearer two parts",
        "Bearer not-a-key",
    ],
)
def test_malformed_bearer_header_is_refused(user: Any, header: str) -> None:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=header)

    response = client.get(CREDITS)

    assert_401(response, "authentication_failed")


def test_revoked_key_is_refused(user: Any) -> None:
    new = services.api_key_create(user=user)
    assert bearer(new.raw).get(CREDITS).status_code == 200

    services.api_key_revoke(user=user, prefix=new.api_key.prefix)
    response = bearer(new.raw).get(CREDITS)

    assert_401(response, "authentication_failed")


def test_key_of_a_deactivated_user_is_refused(user: Any) -> None:
    raw = services.api_key_create(user=user).raw
    get_user_model().objects.filter(pk=user.pk).update(is_active=False)

    response = bearer(raw).get(CREDITS)

    assert_401(response, "authentication_failed")


def test_no_credentials_is_not_authenticated() -> None:
    response = APIClient().get(CREDITS)

    assert_401(response, "not_authenticated")


def test_other_auth_schemes_are_not_authenticated(user: Any) -> None:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Basic dXNlcjpwdw==")

    response = client.get(CREDITS)

    assert_401(response, "not_authenticated")


def test_keys_are_stored_hashed(user: Any) -> None:
    new = services.api_key_create(user=user, name="laptop")
    secret = new.raw.split("_", 2)[2]  # rv_<prefix>_<secret>; the secret may hold "_" itself
    assert len(secret) >= 40

    row = ApiKey.objects.get(pk=new.api_key.pk)

    assert row.key_hash == hash_api_key(new.raw)
    stored = [str(getattr(row, f.attname)) for f in ApiKey._meta.concrete_fields]
    assert not any(new.raw in value or secret in value for value in stored)
    assert row.matches(new.raw)
    assert not row.matches(new.raw + "x")


def test_key_format_is_url_and_header_safe(user: Any) -> None:
    raws = [services.api_key_create(user=user).raw for _ in range(20)]

    for raw in raws:
        assert re.fullmatch(r"[A-Za-z0-9._-]+", raw), raw
        assert raw.startswith("rv_")
        assert len(raw) >= 40
    assert len(set(raws)) == len(raws)


def test_session_login_works_for_api_get(user: Any) -> None:
    billing.grant(user=user, amount=3 * C, reason="x")
    client = Client()
    assert client.login(username=user.username, password="pw-Secret-123")

    response = client.get(CREDITS)

    assert response.status_code == 200
    assert response.json()["available_micro"] == 3 * C


def test_session_write_without_csrf_token_is_refused(user: Any) -> None:
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)

    response = client.post(CREDITS, data={}, content_type="application/json")

    # Refused by the CSRF check before the view is even reached (it would otherwise be 405).
    assert response.status_code == 403
    error = response.json()["error"]
    assert error["code"] == "permission_denied"
    assert "CSRF" in error["message"]


def test_api_key_requests_need_no_csrf_token(user: Any) -> None:
    raw = services.api_key_create(user=user).raw
    client = APIClient(enforce_csrf_checks=True)
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")

    response = client.post(CREDITS, data={}, format="json")

    # Authenticated and past CSRF: the view itself answers that POST is not allowed.
    assert response.status_code == 405


# --- manage.py create_api_key ---------------------------------------------------------------


def run_create_api_key(*args: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("create_api_key", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_create_api_key_prints_a_working_key_alone_on_the_last_line(user: Any) -> None:
    out, _ = run_create_api_key(user.username)

    raw = out.rstrip("\n").splitlines()[-1]
    assert raw == raw.strip()
    assert re.fullmatch(r"[A-Za-z0-9._-]+", raw)
    assert ApiKey.objects.filter(user=user).count() == 1
    response = bearer(raw).get(CREDITS)
    assert response.status_code == 200


def test_create_api_key_accepts_a_unique_email(user: Any) -> None:
    out, _ = run_create_api_key(user.email)

    raw = out.splitlines()[-1]
    assert services.api_key_authenticate(raw=raw).user == user


def test_create_api_key_can_create_the_user_with_zero_credits() -> None:
    out, _ = run_create_api_key("newcomer", "--create-user")

    created = get_user_model().objects.get(username="newcomer")
    raw = out.splitlines()[-1]
    assert services.api_key_authenticate(raw=raw).user == created
    balance = selectors.balance_for_user(user=created)
    assert (balance.balance, balance.held, balance.available) == (0, 0, 0)
    assert not Account.objects.filter(user=created).exists()
    assert bearer(raw).get(CREDITS).json()["available_micro"] == 0


def test_create_api_key_for_unknown_user_without_flag_is_refused() -> None:
    with pytest.raises(CommandError, match="ghost"):
        run_create_api_key("ghost")

    assert not get_user_model().objects.filter(username="ghost").exists()
    assert ApiKey.objects.count() == 0


def test_create_api_key_with_create_user_finds_an_email_in_another_case(make_user: Any) -> None:
    owner = make_user("owner", email="shared@example.com")

    out, _ = run_create_api_key("SHARED@example.com", "--create-user")

    assert services.api_key_authenticate(raw=out.splitlines()[-1]).user == owner
    assert get_user_model().objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_the_key_lookup_of_a_request_replaces_a_dead_connection(
    user: Any, monkeypatch: pytest.MonkeyPatch, terminate_backend: Any
) -> None:
    # On PostgreSQL the key lookup is a request's first statement and stands in for Django's
    # connection health check (rivya.sql.execute_checking_connection): a persistent connection
    # whose server backend is gone is replaced, and the request goes on as if nothing happened.
    from django.core.signals import request_finished, request_started
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("the health check stands in only on PostgreSQL")
    raw = str(services.api_key_create(user=user, name="ci").raw)
    # A persistent connection opened now, which the end of a request keeps (in a long test
    # run the one open may be past its CONN_MAX_AGE, and closed between the two requests).
    monkeypatch.setitem(connection.settings_dict, "CONN_MAX_AGE", 600)
    connection.close()
    assert services.api_key_authenticate(raw=raw) is not None
    before = connection.connection.get_backend_pid()
    request_finished.send(sender=None)  # as between two requests: the check is due again
    request_started.send(sender=None)
    assert terminate_backend() == before

    key = services.api_key_authenticate(raw=raw)

    assert key is not None
    assert key.user == user
    assert connection.connection.get_backend_pid() != before


def test_the_process_keeps_a_bounded_number_of_key_copies(
    user: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # rivya.key_cache: the oldest copy goes first; a copy answers only its own raw key.
    from rivya import key_cache

    monkeypatch.setattr(key_cache, "MAX_KEYS", 3)
    key_cache.clear()
    raws = [services.api_key_create(user=user, name=f"k{n}").raw for n in range(4)]
    for raw in raws:
        key_cache.remember(services.api_key_authenticate(raw=raw))

    assert key_cache.copied_key(raws[0]) is None
    assert [key_cache.copied_key(raw).user for raw in raws[1:]] == [user] * 3
    assert key_cache.copied_key(raws[1][:-1] + ("A" if raws[1][-1] != "A" else "B")) is None
