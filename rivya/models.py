"""Users and API keys."""

from __future__ import annotations

import hashlib
import hmac

from django.conf import settings
from django.contrib.auth.models import AbstractUser
from django.db import models
from django.db.models.functions import Lower


class User(AbstractUser):
    """The custom user model, in place from the first migration so it can grow later.

    A non-empty email belongs to one account, whatever its case: each signup is granted credits,
    and operator commands accept an email for a username. Accounts without one (as
    ``create_api_key --create-user`` makes them) are not limited.
    """

    class Meta(AbstractUser.Meta):
        swappable = "AUTH_USER_MODEL"
        constraints = [
            models.UniqueConstraint(
                Lower("email"),
                condition=~models.Q(email=""),
                name="user_email_unique_ci",
                violation_error_message="An account with this email already exists.",
            )
        ]


def hash_api_key(raw: str) -> str:
    # API keys carry 256 bits of randomness, so a fast hash is enough: there is nothing to
    # brute-force that a slow hash would protect.
    return hashlib.sha256(raw.encode()).hexdigest()


class ApiKey(models.Model):
    """A per-user API key, stored hashed. The raw key is shown once, at creation."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_keys"
    )
    name = models.CharField(max_length=100, blank=True)
    prefix = models.CharField(max_length=16, unique=True)
    key_hash = models.CharField(max_length=64)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.name or 'unnamed'})"

    def matches(self, raw: str) -> bool:
        return hmac.compare_digest(self.key_hash, hash_api_key(raw))
