from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from billing import selectors, services
from rivya import services as rivya_services
from rivya.errors import DomainError
from rivya.money import format_credits, parse_credits


class Command(BaseCommand):
    help = "Grant AMOUNT credits (decimal, at most 6 places) to USER, with a reason."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("user", help="username (or a unique email)")
        parser.add_argument("amount", help="credits, e.g. 25 or 0.5")
        parser.add_argument("--reason", required=True)
        parser.add_argument("--kind", default="grant", choices=["grant", "purchase", "promotion"])
        parser.add_argument(
            "--idempotency-key", default="", help="make a retried command take effect once"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            user = rivya_services.user_find(identifier=options["user"])
            amount = parse_credits(options["amount"])
            services.grant(
                user=user,
                amount=amount,
                reason=options["reason"],
                kind=options["kind"],
                idempotency_key=options["idempotency_key"],
            )
        except DomainError as exc:
            raise CommandError(f"{exc.code}: {exc.message}") from None
        balance = selectors.balance_for_user(user=user)
        self.stdout.write(
            f"Granted {format_credits(amount)} credits to {user.username}; "
            f"available now {format_credits(balance.available)}."
        )
