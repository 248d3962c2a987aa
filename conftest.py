"""Shared fixtures. Tests run on PostgreSQL and Redis (``make test`` sets the URLs)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from rivya import services as rivya_services

_counter = itertools.count()


@pytest.fixture
def make_user(db: Any) -> Any:
    def make(username: str | None = None, **extra: Any) -> Any:
        name = username or f"user{next(_counter)}"
        extra.setdefault("email", f"{name}@example.com")
        return get_user_model().objects.create_user(
            username=name, password="pw-Secret-123", **extra
        )

    return make


@pytest.fixture
def user(make_user: Any) -> Any:
    return make_user()


@pytest.fixture
def staff(make_user: Any) -> Any:
    return make_user(is_staff=True, is_superuser=True)


@pytest.fixture
def api(user: Any) -> APIClient:
    """An API client authenticated with a real API key of ``user``."""
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {rivya_services.api_key_create(user=user).raw}")
    return client


@pytest.fixture
def api_for() -> Any:
    def make(some_user: Any) -> APIClient:
        client = APIClient()
        raw = rivya_services.api_key_create(user=some_user).raw
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
        return client

    return make
