"""Ledger invariants (numbered as in ``docs/ledger.md``) and the registry that
``manage.py ledger_check`` runs.

Billing registers the checks for invariants 1-3 and 5; other apps register theirs (``tasks``:
invariant 4) from their ``AppConfig.ready`` so billing never imports them. A check is a function
taking a DB-API cursor and returning a list of human-readable breaches (empty when it holds).
Every query is written to run on PostgreSQL and SQLite.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.db import connection, transaction

Check = Callable[[Any], list[str]]


@dataclass(frozen=True)
class Registered:
    name: str
    description: str
    func: Check


REGISTRY: dict[str, Registered] = {}


def register(name: str, description: str) -> Callable[[Check], Check]:
    def decorator(func: Check) -> Check:
        REGISTRY[name] = Registered(name=name, description=description, func=func)
        return func

    return decorator


# Findings that are not breaches but that an operator must see (e.g. chat usage a provider
# reported beyond the hold, recorded as uncollected): printed by ``ledger_check``, exit 0.
REPORTS: dict[str, Registered] = {}


def register_report(name: str, description: str) -> Callable[[Check], Check]:
    def decorator(func: Check) -> Check:
        REPORTS[name] = Registered(name=name, description=description, func=func)
        return func

    return decorator


@dataclass(frozen=True)
class Breach:
    check: str
    detail: str


def run_checks() -> list[Breach]:
    """Run every registered check on one consistent snapshot.

    On PostgreSQL the snapshot is a READ ONLY REPEATABLE READ transaction, so the checks can run
    on a live system without seeing half of a concurrent operation; SQLite transactions are
    serializable already.
    """
    breaches: list[Breach] = []
    outermost = not connection.in_atomic_block
    with transaction.atomic(), connection.cursor() as cursor:
        if connection.vendor == "postgresql" and outermost:
            cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        for registered in REGISTRY.values():
            breaches.extend(Breach(registered.name, detail) for detail in registered.func(cursor))
    return breaches


def run_reports() -> list[Breach]:
    """Run every registered report on one consistent snapshot (as ``run_checks``)."""
    found: list[Breach] = []
    outermost = not connection.in_atomic_block
    with transaction.atomic(), connection.cursor() as cursor:
        if connection.vendor == "postgresql" and outermost:
            cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        for registered in REPORTS.values():
            found.extend(Breach(registered.name, detail) for detail in registered.func(cursor))
    return found


def query_rows(cursor: Any, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    cursor.execute(sql, params)
    return list(cursor.fetchall())


LIMIT = 20  # breaches named per check; the count says how many more


def describe_rows(rows: list[tuple[Any, ...]], fmt: Callable[[tuple[Any, ...]], str]) -> list[str]:
    out = [fmt(r) for r in rows[:LIMIT]]
    if len(rows) > LIMIT:
        out.append(f"... and {len(rows) - LIMIT} more")
    return out


@register("1.balanced", "every ledger transaction has at least two entries summing to zero")
def check_balanced(cursor: Any) -> list[str]:
    rows = query_rows(
        cursor,
        """
        SELECT t.id, COALESCE(SUM(e.amount), 0), COUNT(e.id)
        FROM billing_ledgertransaction t LEFT JOIN billing_entry e ON e.transaction_id = t.id
        GROUP BY t.id HAVING COALESCE(SUM(e.amount), 0) <> 0 OR COUNT(e.id) < 2
        ORDER BY t.id""",
    )
    return describe_rows(rows, lambda r: f"transaction {r[0]}: {r[2]} entries summing to {r[1]}")


@register("1.append_only", "the database refuses UPDATE and DELETE of ledger entries")
def check_append_only(cursor: Any) -> list[str]:
    from billing.migrations_sql import APPEND_ONLY_TABLES, guards_present

    missing = [t for t in APPEND_ONLY_TABLES if not guards_present(cursor, t)]
    return [f"table {t} has no append-only trigger" for t in missing]


@register("2.account_balance", "each user account's balance equals the sum of its entries")
def check_account_balance(cursor: Any) -> list[str]:
    rows = query_rows(
        cursor,
        """
        SELECT a.id, a.balance, COALESCE(s.total, 0)
        FROM billing_account a
        LEFT JOIN (SELECT account_id, SUM(amount) AS total FROM billing_entry
                   GROUP BY account_id) s ON s.account_id = a.id
        WHERE a.kind = 'user' AND a.balance <> COALESCE(s.total, 0)
        ORDER BY a.id""",
    )
    return describe_rows(
        rows, lambda r: f"account {r[0]}: balance {r[1]} but entries sum to {r[2]}"
    )


@register("2.account_held", "each user account's held equals the sum of its open holds")
def check_account_held(cursor: Any) -> list[str]:
    rows = query_rows(
        cursor,
        """
        SELECT a.id, a.held, COALESCE(h.total, 0)
        FROM billing_account a
        LEFT JOIN (SELECT account_id, SUM(amount) AS total FROM billing_hold
                   WHERE status = 'open' GROUP BY account_id) h ON h.account_id = a.id
        WHERE a.kind = 'user' AND a.held <> COALESCE(h.total, 0)
        ORDER BY a.id""",
    )
    return describe_rows(
        rows, lambda r: f"account {r[0]}: held {r[1]} but open holds sum to {r[2]}"
    )


@register("2.no_overdraft", "every user account has held >= 0 and available >= 0")
def check_no_overdraft(cursor: Any) -> list[str]:
    rows = query_rows(
        cursor,
        """
        SELECT id, balance, held FROM billing_account
        WHERE kind = 'user' AND (held < 0 OR balance - held < 0) ORDER BY id""",
    )
    return describe_rows(rows, lambda r: f"account {r[0]}: balance {r[1]}, held {r[2]}")


@register("2.sum_zero", "all entries together sum to zero")
def check_sum_zero(cursor: Any) -> list[str]:
    total = query_rows(cursor, "SELECT COALESCE(SUM(amount), 0) FROM billing_entry")[0][0]
    return [] if total == 0 else [f"all entries sum to {total}"]


@register("3.holds", "each hold is resolved once and captured <= reserved")
def check_holds(cursor: Any) -> list[str]:
    out: list[str] = []
    rows = query_rows(
        cursor,
        """
        SELECT id, status, amount, captured FROM billing_hold
        WHERE captured < 0 OR captured > amount
           OR (status <> 'captured' AND captured <> 0) ORDER BY id""",
    )
    out += describe_rows(rows, lambda r: f"hold {r[0]} ({r[1]}): captured {r[3]} of {r[2]}")
    # A captured hold has exactly one capture transaction charging exactly ``captured`` to the
    # hold's account; an open or released hold has none.
    rows = query_rows(
        cursor,
        """
        SELECT h.id, h.status, h.captured, COUNT(DISTINCT t.id),
               COALESCE(SUM(CASE WHEN e.account_id = h.account_id THEN e.amount END), 0)
        FROM billing_hold h
        LEFT JOIN billing_ledgertransaction t ON t.hold_id = h.id AND t.kind = 'capture'
        LEFT JOIN billing_entry e ON e.transaction_id = t.id
        GROUP BY h.id, h.status, h.captured
        HAVING (h.status = 'captured' AND (COUNT(DISTINCT t.id) <> 1 OR
                COALESCE(SUM(CASE WHEN e.account_id = h.account_id THEN e.amount END), 0)
                <> -h.captured))
            OR (h.status <> 'captured' AND COUNT(DISTINCT t.id) <> 0)
        ORDER BY h.id""",
    )
    out += describe_rows(
        rows,
        lambda r: (
            f"hold {r[0]} ({r[1]}, captured {r[2]}): {r[3]} capture transactions charging {-r[4]}"
        ),
    )
    return out


@register("5.adjustments", "every staff adjustment has an actor and a reason")
def check_adjustments(cursor: Any) -> list[str]:
    rows = query_rows(
        cursor,
        """
        SELECT id FROM billing_ledgertransaction
        WHERE kind = 'adjustment' AND (actor_id IS NULL OR TRIM(reason) = '') ORDER BY id""",
    )
    return describe_rows(rows, lambda r: f"adjustment {r[0]} lacks an actor or a reason")


@register("5.reversals", "each reversal is the exact opposite of its original, once")
def check_reversals(cursor: Any) -> list[str]:
    rows = query_rows(
        cursor,
        """
        SELECT r.id, r.reversal_of_id FROM billing_ledgertransaction r
        WHERE r.kind = 'reversal' AND (r.reversal_of_id IS NULL OR EXISTS (
            SELECT 1 FROM (
                SELECT account_id, SUM(amount) AS s FROM billing_entry
                WHERE transaction_id IN (r.id, r.reversal_of_id) GROUP BY account_id
            ) x WHERE x.s <> 0))
        ORDER BY r.id""",
    )
    return describe_rows(rows, lambda r: f"reversal {r[0]} does not mirror transaction {r[1]}")


@register("5.idempotency", "each idempotency key took effect once")
def check_idempotency(cursor: Any) -> list[str]:
    rows = query_rows(
        cursor,
        """
        SELECT idempotency_scope, idempotency_key, COUNT(*) FROM billing_ledgertransaction
        WHERE idempotency_key <> '' GROUP BY idempotency_scope, idempotency_key
        HAVING COUNT(*) > 1""",
    )
    return describe_rows(rows, lambda r: f"key {r[1]!r} in {r[0]} used {r[2]} times")
