from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from rivya import services
from rivya.errors import DomainError


class Command(BaseCommand):
    help = (
        "Create an API key for USER and print it once, alone on the last line. "
        "With --create-user, create the user first (starting with 0 credits)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("user", help="username (or a unique email)")
        parser.add_argument("--create-user", action="store_true")
        parser.add_argument("--name", default="cli")

    def handle(self, *args: Any, **options: Any) -> None:
        identifier: str = options["user"]
        try:
            user = services.user_find(identifier=identifier)
        except DomainError as exc:
            if not options["create_user"] or exc.code != "not_found":
                raise CommandError(f"{exc.message} (use --create-user to create it)") from None
            user = get_user_model().objects.create_user(username=identifier)
            self.stderr.write(f"Created user {user.username} (0 credits).")
        new = services.api_key_create(user=user, name=options["name"])
        self.stderr.write(f"API key for {user.username} (shown once; store it now):")
        self.stdout.write(new.raw)
