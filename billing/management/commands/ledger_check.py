from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from billing.invariants import REGISTRY, run_checks, run_reports


class Command(BaseCommand):
    help = (
        "Verify every ledger invariant (docs/ledger.md) on one consistent snapshot. "
        "Exit 1 naming each breach; safe on a live system."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        breaches = run_checks()
        for note in run_reports():
            self.stdout.write(f"NOTE {note.check}: {note.detail}")
        for breach in breaches:
            self.stderr.write(f"BREACH {breach.check}: {breach.detail}")
        if breaches:
            self.stderr.write(f"ledger_check: {len(breaches)} breach(es) found.")
            raise SystemExit(1)
        self.stdout.write(f"ledger_check: all {len(REGISTRY)} checks pass ({', '.join(REGISTRY)}).")
