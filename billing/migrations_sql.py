"""Database-level guards for the ledger, for PostgreSQL and SQLite (used by migration 0002).

- Append-only: UPDATE and DELETE of entries and ledger transactions are refused by triggers.
  TRUNCATE is deliberately not refused: test databases are flushed with it.
- Balanced: on PostgreSQL a deferred constraint trigger checks, at commit, that each
  transaction touched by an insert sums to zero. SQLite has no deferred triggers; there
  ``ledger_check`` is the guard.
"""

from __future__ import annotations

from typing import Any

APPEND_ONLY_TABLES = ("billing_entry", "billing_ledgertransaction")

PG_FORWARD = """
CREATE OR REPLACE FUNCTION billing_refuse_change() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'ledger table % is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'integrity_constraint_violation';
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER billing_entry_append_only BEFORE UPDATE OR DELETE ON billing_entry
    FOR EACH ROW EXECUTE FUNCTION billing_refuse_change();
CREATE TRIGGER billing_ledgertransaction_append_only
    BEFORE UPDATE OR DELETE ON billing_ledgertransaction
    FOR EACH ROW EXECUTE FUNCTION billing_refuse_change();

CREATE OR REPLACE FUNCTION billing_check_balanced() RETURNS trigger AS $$
DECLARE total bigint;
BEGIN
    SELECT COALESCE(SUM(amount), 0) INTO total FROM billing_entry
        WHERE transaction_id = NEW.transaction_id;
    IF total <> 0 THEN
        RAISE EXCEPTION 'ledger transaction % does not balance (sum %)', NEW.transaction_id, total
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE CONSTRAINT TRIGGER billing_entry_balanced AFTER INSERT ON billing_entry
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION billing_check_balanced();
"""

PG_REVERSE = """
DROP TRIGGER IF EXISTS billing_entry_balanced ON billing_entry;
DROP TRIGGER IF EXISTS billing_entry_append_only ON billing_entry;
DROP TRIGGER IF EXISTS billing_ledgertransaction_append_only ON billing_ledgertransaction;
DROP FUNCTION IF EXISTS billing_check_balanced();
DROP FUNCTION IF EXISTS billing_refuse_change();
"""


def _sqlite_statements() -> list[str]:
    return [
        f"CREATE TRIGGER IF NOT EXISTS {table}_no_{op.lower()} BEFORE {op} ON {table} "
        f"BEGIN SELECT RAISE(ABORT, 'ledger table {table} is append-only: {op} refused'); END;"
        for table in APPEND_ONLY_TABLES
        for op in ("UPDATE", "DELETE")
    ]


def install(apps: Any, schema_editor: Any) -> None:
    connection = schema_editor.connection
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(PG_FORWARD)
        elif connection.vendor == "sqlite":
            for statement in _sqlite_statements():
                cursor.execute(statement)


def uninstall(apps: Any, schema_editor: Any) -> None:
    connection = schema_editor.connection
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(PG_REVERSE)
        elif connection.vendor == "sqlite":
            for table in APPEND_ONLY_TABLES:
                for op in ("update", "delete"):
                    cursor.execute(f"DROP TRIGGER IF EXISTS {table}_no_{op}")


def guards_present(cursor: Any, table: str) -> bool:
    """Whether the append-only trigger(s) of ``table`` are installed."""
    from django.db import connection

    if connection.vendor == "postgresql":
        cursor.execute(
            "SELECT COUNT(*) FROM pg_trigger WHERE tgname = %s AND NOT tgisinternal",
            (f"{table}_append_only",),
        )
        return cursor.fetchone()[0] == 1
    if connection.vendor == "sqlite":
        cursor.execute(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'trigger' AND name IN (%s, %s)",
            (f"{table}_no_update", f"{table}_no_delete"),
        )
        return cursor.fetchone()[0] == 2
    return False
