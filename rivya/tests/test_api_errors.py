"""Every API error has one shape, {"error": {"code", "message", "kind"}}, and the right status."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.http import Http404
from rest_framework import exceptions as drf
from rest_framework.test import APIClient

from rivya.errors import DomainError, HoldAlreadyResolved, InsufficientCredits, NotFound
from rivya.exceptions import api_exception_handler

pytestmark = pytest.mark.django_db


def assert_error(body: dict[str, Any], code: str, kind: str = "user") -> dict[str, Any]:
    assert set(body) == {"error"}
    error = body["error"]
    assert error["code"] == code
    assert error["kind"] == kind
    assert isinstance(error["message"], str)
    assert error["message"]
    return error


# --- through the URL conf -------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/v1/nope/", "/api/v1/credits/nope/", "/api/nope"])
def test_unknown_api_url_is_json_404(api: APIClient, path: str) -> None:
    response = api.get(path)

    assert response.status_code == 404
    assert response["Content-Type"].startswith("application/json")
    assert_error(response.json(), "not_found")


def test_unknown_api_url_is_json_404_without_auth_too() -> None:
    response = APIClient().get("/api/v1/nope/")

    assert response.status_code == 404
    assert_error(response.json(), "not_found")


def test_method_not_allowed(api: APIClient) -> None:
    response = api.post("/api/v1/credits/", data={}, format="json")

    assert response.status_code == 405
    error = assert_error(response.json(), "method_not_allowed")
    assert "POST" in error["message"]


def test_schema_is_public_and_lists_the_credit_endpoints() -> None:
    response = APIClient().get("/api/schema/")

    assert response.status_code == 200
    text = response.content.decode()
    assert "/api/v1/credits/" in text
    assert "/api/v1/credits/ledger/" in text


def test_schema_is_available_as_json() -> None:
    response = APIClient().get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")

    assert response.status_code == 200
    assert "/api/v1/credits/" in response.json()["paths"]


def test_docs_are_public() -> None:
    response = APIClient().get("/api/docs/")

    assert response.status_code == 200
    assert b"swagger" in response.content.lower()
    assert b"/api/schema/" in response.content


# --- the handler itself ---------------------------------------------------------------------


def test_validation_error_with_fields() -> None:
    exc = drf.ValidationError({"amount": ["Too many decimal places."], "reason": ["Required."]})

    response = api_exception_handler(exc, {})

    assert response is not None
    assert response.status_code == 400
    error = assert_error(response.data, "validation_error")
    assert error["fields"] == {
        "amount": ["Too many decimal places."],
        "reason": ["Required."],
    }


def test_validation_error_nested_fields_are_plain_strings() -> None:
    exc = drf.ValidationError({"inputs": {"prompt": ["Required."]}})

    response = api_exception_handler(exc, {})

    assert response is not None
    error = assert_error(response.data, "validation_error")
    assert error["fields"] == {"inputs": {"prompt": ["Required."]}}
    assert type(error["fields"]["inputs"]["prompt"][0]) is str


def test_validation_error_without_fields_goes_under_non_field_errors() -> None:
    response = api_exception_handler(drf.ValidationError("Nothing to do."), {})

    assert response is not None
    assert response.status_code == 400
    error = assert_error(response.data, "validation_error")
    assert error["fields"] == {"non_field_errors": ["Nothing to do."]}


def test_parse_error_is_malformed_request() -> None:
    response = api_exception_handler(drf.ParseError("JSON parse error - bad"), {})

    assert response is not None
    assert response.status_code == 400
    error = assert_error(response.data, "malformed_request")
    assert error["message"] == "JSON parse error - bad"
    assert "fields" not in error


def test_insufficient_credits_is_402_with_its_details() -> None:
    exc = InsufficientCredits(extra={"available": "1.5", "available_micro": 1_500_000})

    response = api_exception_handler(exc, {})

    assert response is not None
    assert response.status_code == 402
    error = assert_error(response.data, "insufficient_credits")
    assert error["message"] == InsufficientCredits.message
    assert error["available_micro"] == 1_500_000
    assert error["available"] == "1.5"


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (HoldAlreadyResolved(), 409, "hold_already_resolved"),
        (NotFound("No such task."), 404, "not_found"),
        (DomainError("Upstream down.", code="provider_down", status=502, kind="provider"), 502, ""),
    ],
)
def test_domain_errors_keep_their_status_and_code(exc: DomainError, status: int, code: str) -> None:
    response = api_exception_handler(exc, {})

    assert response is not None
    assert response.status_code == status
    assert_error(response.data, code or exc.code, exc.kind)


def test_django_http404_becomes_not_found() -> None:
    response = api_exception_handler(Http404("gone"), {})

    assert response is not None
    assert response.status_code == 404
    assert_error(response.data, "not_found")


def test_django_permission_denied_becomes_permission_denied() -> None:
    response = api_exception_handler(DjangoPermissionDenied(), {})

    assert response is not None
    assert response.status_code == 403
    assert_error(response.data, "permission_denied")


def test_throttled_keeps_retry_after() -> None:
    response = api_exception_handler(drf.Throttled(wait=30), {})

    assert response is not None
    assert response.status_code == 429
    assert response["Retry-After"] == "30"
    assert_error(response.data, "throttled")


def test_server_side_api_exception_is_infra() -> None:
    response = api_exception_handler(drf.APIException(), {})

    assert response is not None
    assert response.status_code == 500
    assert_error(response.data, "error", kind="infra")


def test_unexpected_exceptions_are_left_to_django() -> None:
    assert api_exception_handler(RuntimeError("bug"), {}) is None
