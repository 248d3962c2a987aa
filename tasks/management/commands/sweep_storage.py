from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from tasks import services


class Command(BaseCommand):
    help = (
        "Delete stored files under results/ and uploads/ that no row references and that are "
        "older than --min-age seconds (default STORAGE_SWEEP_MIN_AGE). See docs/storage.md."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--dry-run", action="store_true", help="list what would be deleted; delete nothing"
        )
        parser.add_argument(
            "--min-age",
            type=int,
            default=None,
            metavar="SECONDS",
            help="only files at least this old (default STORAGE_SWEEP_MIN_AGE)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        seconds = options["min_age"]
        if seconds is None:
            seconds = settings.STORAGE_SWEEP_MIN_AGE
        if seconds < 0:
            raise CommandError("--min-age must not be negative.")
        dry_run = options["dry_run"]
        report = services.storage_sweep(min_age=timedelta(seconds=seconds), dry_run=dry_run)
        verb = "would delete" if dry_run else "deleted"
        for name in report.names:
            self.stdout.write(f"{verb} {name}")
        if report.names_left_off:
            self.stdout.write(f"… and {report.names_left_off} more")
        self.stdout.write(
            f"sweep_storage{' (dry run)' if dry_run else ''}: {report.scanned} scanned, "
            f"{report.orphaned} orphaned older than {seconds} s, {report.deleted} deleted "
            f"({report.bytes} bytes), {report.recent} too recent, {report.skipped} skipped, "
            f"{report.failed} failed."
        )
        if report.failed:
            raise CommandError(f"{report.failed} file(s) could not be deleted.")
