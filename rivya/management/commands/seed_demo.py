from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandParser

from billing import selectors, services
from rivya import services as rivya_services
from rivya.models import ApiKey
from rivya.money import format_credits, parse_credits


class Command(BaseCommand):
    help = (
        "Create (or refresh) the demo user with DEMO_USER_CREDITS credits and print its "
        "login and a fresh API key. Safe to run again: the grant is made once."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--username", default="demo")
        parser.add_argument("--password", default="demo-password")

    def handle(self, *args: Any, **options: Any) -> None:
        users = get_user_model().objects
        user = users.filter(username=options["username"]).first()
        if user is None:
            user = users.create_superuser(
                username=options["username"], email="demo@example.com", password=options["password"]
            )
        amount = parse_credits(settings.DEMO_USER_CREDITS, allow_zero=True)
        if amount:
            services.grant(
                user=user, amount=amount, reason="Demo credits", idempotency_key="demo-seed-grant"
            )
        # The previous run's key cannot be shown again (only its hash is kept): revoke it and
        # print a new one.
        for key in ApiKey.objects.filter(user=user, name="make run", revoked_at__isnull=True):
            rivya_services.api_key_revoke(user=user, prefix=key.prefix)
        raw = rivya_services.api_key_create(user=user, name="make run").raw
        balance = selectors.balance_for_user(user=user)
        self.stdout.write(
            f"Demo login: {user.username} / {options['password']} (also a superuser for "
            f"/admin/), {format_credits(balance.available)} credits available.\n"
            f"Demo API key: {raw}"
        )
