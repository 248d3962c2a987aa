from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from tasks.catalog import seed_catalog


class Command(BaseCommand):
    help = (
        "Load the seed catalog (sandbox models for every category). Safe to run again: "
        "existing models keep their admin edits unless --update is given."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--update", action="store_true", help="reset existing seed models to the seed values"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        created, updated = seed_catalog(update=options["update"])
        self.stdout.write(f"seed_catalog: {created} created, {updated} updated.")
