from __future__ import annotations

from billing.invariants import run_checks


def assert_ledger_ok() -> None:
    breaches = run_checks()
    assert breaches == [], "\n".join(f"{b.check}: {b.detail}" for b in breaches)
