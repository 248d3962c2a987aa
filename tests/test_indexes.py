"""The schema's indexes: every foreign key can be found by an index, and no index only repeats
another.

Each index is written on every insert into its table, so an index that another one already
serves (a single column that leads a composite index) costs every submit a write and buys
nothing. And a foreign key without an index makes each delete of the row it points to scan the
whole referring table. Both are checked on the migrated PostgreSQL schema, for every table of
Rivya's own apps.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.apps import apps
from django.db import connection

pytestmark = pytest.mark.django_db

OWN_APPS = ("rivya", "billing", "tasks", "chat", "notifications")


def own_tables() -> list[str]:
    return sorted(
        model._meta.db_table
        for name in OWN_APPS
        for model in apps.get_app_config(name).get_models()
        if not model._meta.proxy and model._meta.managed
    )


def indexes(table: str) -> list[dict[str, Any]]:
    """Each index of ``table``: its name, columns (in order), uniqueness and whether it is
    partial or has expressions."""
    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT i.relname,
                   array(SELECT a.attname FROM unnest(x.indkey) WITH ORDINALITY AS k(attnum, n)
                         JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.attnum
                         ORDER BY k.n),
                   x.indisunique, x.indpred IS NOT NULL, x.indexprs IS NOT NULL,
                   pg_get_indexdef(x.indexrelid)
            FROM pg_index x
            JOIN pg_class t ON t.oid = x.indrelid
            JOIN pg_class i ON i.oid = x.indexrelid
            WHERE t.relname = %s AND t.relnamespace = 'public'::regnamespace
            """,
            [table],
        )
        return [
            {
                "name": name,
                "columns": list(columns),
                "unique": unique,
                "plain": not partial and not expressions,
                "definition": definition,
            }
            for name, columns, unique, partial, expressions, definition in cursor.fetchall()
        ]


def is_plain_btree(index: dict[str, Any]) -> bool:
    # varchar_pattern_ops indexes (Django's for LIKE on a CharField key) serve other queries.
    return (
        index["plain"]
        and "USING btree" in index["definition"]
        and "pattern_ops" not in index["definition"]
    )


def test_the_tables_are_found() -> None:
    tables = own_tables()
    assert {"ai_task", "tasks_taskevent", "billing_idempotencyrecord", "billing_hold"} <= set(
        tables
    )


def repeats(index: dict[str, Any], other: dict[str, Any]) -> bool:
    """``index`` (non-unique) is ``other``'s leading columns, and ``other`` is longer or
    unique: ``other`` serves every lookup ``index`` does."""
    width = len(index["columns"])
    return (
        other is not index
        and not index["unique"]
        and other["columns"][:width] == index["columns"]
        and (len(other["columns"]) > width or other["unique"])
    )


def test_no_index_is_only_the_start_of_another() -> None:
    """A plain, non-unique index on columns (a, …) that lead another plain index on the same
    table is a second copy of the first part of that index."""
    redundant = []
    for table in own_tables():
        found = [i for i in indexes(table) if is_plain_btree(i)]
        redundant += [
            f"{index['name']} repeats the start of {other['name']}"
            for index in found
            for other in found
            if repeats(index, other)
        ]
    assert redundant == [], "\n".join(redundant)


def test_every_foreign_key_leads_an_index() -> None:
    """Each foreign key column is the first column of some plain index (a partial one does not
    serve the delete of the row it points to)."""
    missing = []
    for name in OWN_APPS:
        for model in apps.get_app_config(name).get_models():
            if model._meta.proxy or not model._meta.managed:
                continue
            table = model._meta.db_table
            leading = {i["columns"][0] for i in indexes(table) if i["plain"] and i["columns"]}
            missing += [
                f"{table}.{field.column}"
                for field in model._meta.concrete_fields
                if field.is_relation and field.column not in leading
            ]
    assert missing == []
