"""Every answer under /api/ carries the error envelope, whatever the method, the auth or the body
(issue 13): unknown URLs, wrong methods, oversized JSON bodies."""

from __future__ import annotations

import io
import json
import logging
import uuid
from typing import Any

import pytest
from django.core.handlers.asgi import ASGIRequest
from django.core.handlers.base import BaseHandler
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver
from rest_framework.test import APIClient

from billing.models import IdempotencyRecord
from rivya import services as rivya_services

pytestmark = pytest.mark.django_db

UNSAFE = ["post", "put", "patch", "delete"]


def assert_envelope(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.content[:300]
    assert response["Content-Type"].startswith("application/json")
    body = json.loads(response.content)
    assert set(body) == {"error"}
    error = body["error"]
    assert (error["code"], error["kind"]) == (code, "user")
    assert isinstance(error["message"], str)
    assert error["message"]
    return error


@pytest.fixture
def session(user: Any) -> Client:
    """A browser: logged in with a session cookie, CSRF enforced as in production."""
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    return client


@pytest.fixture(params=["session", "api_key", "anonymous"])
def any_client(request: pytest.FixtureRequest, user: Any) -> Client:
    if request.param == "session":
        return request.getfixturevalue("session")
    client = Client(enforce_csrf_checks=True)
    if request.param == "api_key":
        raw = rivya_services.api_key_create(user=user).raw
        client.defaults["HTTP_AUTHORIZATION"] = f"Bearer {raw}"
    return client


# --- unknown URLs ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", UNSAFE)
@pytest.mark.parametrize("path", ["/api/v1/tasks/123/", "/api/v1/nope/", "/api/nope"])
def test_unsafe_method_to_an_unknown_api_url_is_json_404_not_csrf_403(
    any_client: Client, method: str, path: str
) -> None:
    # Given any client, without a CSRF token; when it sends a write to a URL that does not exist
    response = getattr(any_client, method)(path, data="{}", content_type="application/json")

    # Then it learns the URL is wrong, in the API's shape (not an HTML CSRF page)
    error = assert_envelope(response, 404, "not_found")
    assert "did you mean" not in error["message"]


@pytest.mark.parametrize("method", ["get", *UNSAFE])
@pytest.mark.parametrize(
    ("path", "meant"),
    [("/api/v1/tasks", "/api/v1/tasks/"), ("/api/v1/credits/ledger", "/api/v1/credits/ledger/")],
)
def test_api_url_without_its_trailing_slash_says_which_url_was_meant(
    session: Client, method: str, path: str, meant: str
) -> None:
    response = getattr(session, method)(path)

    error = assert_envelope(response, 404, "not_found")
    assert f"did you mean {meant} ?" in error["message"]


def test_unknown_url_gets_no_suggestion_when_a_slash_would_not_help(session: Client) -> None:
    # /api/v1/nope/ only matches the catch-all: suggesting it would send the client in a circle
    error = assert_envelope(session.post("/api/v1/nope"), 404, "not_found")

    assert "did you mean" not in error["message"]


# --- wrong methods --------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["get", "put", "patch", "delete"])
def test_callback_url_with_another_method_than_post_is_json_405(
    any_client: Client, method: str
) -> None:
    response = getattr(any_client, method)("/api/v1/callbacks/sandbox/")

    error = assert_envelope(response, 405, "method_not_allowed")
    assert method.upper() in error["message"]
    assert response["Allow"] == "POST"


def _api_paths() -> list[str]:
    """Every /api/v1/ route, with sample values in place of its converters."""
    samples = {"uuid": str(uuid.uuid4()), "int": "0", "slug": "sandbox", "str": "x"}
    found: list[str] = []

    def walk(patterns: list[Any], prefix: str) -> None:
        for pattern in patterns:
            route = str(pattern.pattern)
            for converter, sample in samples.items():
                while f"<{converter}:" in route:
                    start = route.index(f"<{converter}:")
                    route = route[:start] + sample + route[route.index(">", start) + 1 :]
            if isinstance(pattern, URLResolver):
                walk(pattern.url_patterns, prefix + route)
            elif isinstance(pattern, URLPattern):
                found.append("/" + prefix + route)

    walk(get_resolver().url_patterns, "")
    return sorted(p for p in found if p.startswith("/api/v1/"))


def test_every_api_route_is_walked() -> None:
    paths = _api_paths()

    assert "/api/v1/callbacks/sandbox/" in paths
    assert "/api/v1/credits/" in paths
    assert len(paths) >= 10
    assert not [p for p in paths if "<" in p]  # every converter was given a sample


@pytest.mark.parametrize("path", _api_paths())
def test_every_api_route_answers_a_wrong_method_with_the_envelope(
    api: APIClient, path: str
) -> None:
    # Given every route under /api/v1/; when each method is tried on it
    for method in ["get", "post", "put", "patch", "delete"]:
        response = getattr(api, method)(path)

        # Then a refusal is never a bare status: it is the envelope, and a 405 names what is allowed
        assert response.status_code < 500, (method, path)
        if response.status_code >= 400:
            assert response["Content-Type"].startswith("application/json"), (method, path)
            assert set(json.loads(response.content)) == {"error"}, (method, path)
        if response.status_code == 405:
            assert method.upper() not in response["Allow"], (method, path)


# --- JSON bodies over MAX_JSON_BYTES --------------------------------------------------------


def _no_traceback_logged(caplog: pytest.LogCaptureFixture) -> None:
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


@pytest.mark.parametrize("idempotency_key", [None, "big-json"])
def test_json_body_over_the_limit_is_413_json(
    api: APIClient, settings: Any, caplog: pytest.LogCaptureFixture, idempotency_key: str | None
) -> None:
    # Given a JSON body over MAX_JSON_BYTES (its Content-Length tells before anything is read)
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}

    response = api.post(
        "/api/v1/tasks/",
        {"model": "sandbox-image", "prompt": "x" * 2000},
        format="json",
        headers=headers,
    )

    # Then it is refused as too large, in the envelope, quietly, and the key is not burnt
    error = assert_envelope(response, 413, "request_too_large")
    assert "1000" in error["message"]
    _no_traceback_logged(caplog)
    assert IdempotencyRecord.objects.count() == 0


def test_multipart_fields_over_the_limit_are_413_json(
    api: APIClient, settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000

    response = api.post("/api/v1/tasks/", {"prompt": "x" * 2000}, format="multipart")

    assert_envelope(response, 413, "request_too_large")
    _no_traceback_logged(caplog)


def test_json_body_over_the_limit_with_an_understated_content_length_is_413_json(
    user: Any, settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Given an ASGI request whose Content-Length understates its body (the header passes the
    # early check; the size is only found while reading, from the spooled body itself)
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    raw = rivya_services.api_key_create(user=user).raw
    body = json.dumps({"model": "sandbox-image", "prompt": "x" * 2000}).encode()
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/api/v1/tasks/",
        "query_string": b"",
        "server": ("testserver", 80),
        "headers": [
            (b"host", b"testserver"),
            (b"content-type", b"application/json"),
            (b"content-length", b"20"),
            (b"authorization", f"Bearer {raw}".encode()),
        ],
    }
    handler = BaseHandler()
    handler.load_middleware()

    # When it goes through the middleware and the view
    response = handler.get_response(ASGIRequest(scope, io.BytesIO(body)))

    # Then it is refused like any other oversized body
    assert_envelope(response, 413, "request_too_large")
    _no_traceback_logged(caplog)
