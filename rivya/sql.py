"""Hand-written SQL on the paths where the ORM's cost shows (a submit, an API key lookup).

- Rows built from model instances, so that a statement the ORM cannot express (a
  data-modifying ``WITH`` that does a whole operation in one round trip) still writes rows
  exactly as ``Model.objects.create`` would: the same columns, the same Python-side defaults and
  ``auto_now_add`` values, the same database preparation of each value (``insert_columns``,
  ``insert_values``), and read back as the ORM would (``select_list``, ``from_row``).
- Prepared statements (``execute_prepared``, PostgreSQL): PREPAREd once per server connection,
  so that PostgreSQL parses and plans them once per connection, not once per request.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from functools import cache
from typing import Any

from django.db import DatabaseError, InterfaceError, OperationalError, models, transaction
from django.db.backends.base.base import BaseDatabaseWrapper


@cache
def _insert_fields(model: type[models.Model], skip: tuple[str, ...]) -> tuple[models.Field, ...]:
    """The model's concrete fields a new row is written with: all but auto-increment keys
    (the database assigns them) and ``skip``."""
    return tuple(
        f
        for f in model._meta.concrete_fields
        if f.attname not in skip and not isinstance(f, models.AutoField | models.BigAutoField)
    )


def insert_columns(
    model: type[models.Model], connection: BaseDatabaseWrapper, *, skip: tuple[str, ...] = ()
) -> list[str]:
    """The quoted column names ``insert_values`` gives values for, in its order."""
    quote = connection.ops.quote_name
    return [quote(f.column) for f in _insert_fields(model, skip)]


def insert_values(
    instance: models.Model, connection: BaseDatabaseWrapper, *, skip: tuple[str, ...] = ()
) -> list[Any]:
    """The prepared values of a new row for ``instance``, as ``create()`` would insert them
    (``pre_save`` of each field sets ``auto_now_add`` and the like on the instance too); the
    database assigns auto-increment keys, and the caller supplies the fields in ``skip``.
    ``connection`` is a connection itself (``transaction.get_connection()``), not the proxy
    ``django.db.connection``, whose every attribute is a thread-local lookup."""
    values = []
    for field, plain, own_pre_save in _insert_plan(type(instance), skip):
        # Field.pre_save is getattr(instance, attname); fields that set a value on save
        # (auto_now_add and the like) have their own.
        value = (
            field.pre_save(instance, add=True) if own_pre_save else getattr(instance, field.attname)
        )
        # Values the field's preparation returns unchanged are not prepared: NULL for every field
        # but JSON (where None may mean JSON null), and a value of the field's own plain type.
        if not (
            (value is None and not isinstance(field, models.JSONField)) or type(value) is plain
        ):
            value = field.get_db_prep_save(value, connection)
        values.append(value)
    return values


_PLAIN_TYPES: tuple[tuple[type[models.Field], type], ...] = (
    (models.BooleanField, bool),
    (models.IntegerField, int),
    (models.CharField, str),
    (models.TextField, str),
)


@cache
def _insert_plan(
    model: type[models.Model], skip: tuple[str, ...]
) -> tuple[tuple[models.Field, type | None, bool], ...]:
    """Each field ``insert_values`` writes, with the Python type whose values its preparation
    returns as they are (``IntegerField.get_prep_value`` is ``int(value)``, ``CharField``'s
    ``str(value)``), or None; and whether it has a ``pre_save`` of its own."""

    def plain(field: models.Field) -> type | None:
        return next((t for cls, t in _PLAIN_TYPES if isinstance(field, cls)), None)

    return tuple(
        (f, plain(f), type(f).pre_save is not models.Field.pre_save)
        for f in _insert_fields(model, skip)
    )


_read_plans: dict[tuple[type[models.Model], str], list[tuple[models.Field, Any, list[Any]]]] = {}


def _read_plan(
    model: type[models.Model], connection: BaseDatabaseWrapper
) -> list[tuple[models.Field, Any, list[Any]]]:
    """For each concrete field: the field, its column expression and the converters the ORM
    applies to a value read from the database (the backend's, then the field's). The same for
    every connection to one kind of database, so kept per model and vendor."""
    key = (model, connection.vendor)
    plan = _read_plans.get(key)
    if plan is None:
        plan = []
        for field in model._meta.concrete_fields:
            column = field.get_col(model._meta.db_table)
            converters = connection.ops.get_db_converters(column)
            plan.append((field, column, converters + field.get_db_converters(connection)))
        _read_plans[key] = plan
    return plan


def select_list(model: type[models.Model], alias: str, connection: BaseDatabaseWrapper) -> str:
    """``alias."col", …`` for every concrete field of ``model``, in ``from_row``'s order."""
    quote = connection.ops.quote_name
    return ", ".join(f"{alias}.{quote(f.column)}" for f in model._meta.concrete_fields)


def from_row(
    model: type[models.Model], connection: BaseDatabaseWrapper, values: Any
) -> models.Model:
    """The instance the ORM would build from ``values`` (the columns of ``select_list``)."""
    plan = _read_plan(model, connection)
    converted = []
    for (_, column, converters), value in zip(plan, values, strict=True):
        for convert in converters:
            value = convert(value, column, connection)
        converted.append(value)
    return model.from_db(connection.alias, [field.attname for field, _, _ in plan], converted)


# --- prepared statements (PostgreSQL) ----------------------------------------------------------


def prepared_on(connection: BaseDatabaseWrapper) -> set[str]:
    """The statements this process has prepared on ``connection``'s current server connection
    (a new server connection starts with none)."""
    state = getattr(connection, "rivya_prepared", None)
    if state is None or state[0] is not connection.connection:
        state = (connection.connection, set())
        connection.rivya_prepared = state
    return state[1]


_prepared_texts: dict[str, tuple[str, str]] = {}


def _prepared_text(sql: str, label: str) -> tuple[str, str]:
    """``sql`` with ``$1 … $n`` for its ``%s`` placeholders, and its statement name: ``label``
    and a hash of the text, so that a changed statement is never taken for the old one."""
    known = _prepared_texts.get(sql)
    if known is None:
        numbered = iter(range(1, sql.count("%s") + 1))
        text = re.sub(r"%s", lambda _: f"${next(numbered)}", sql)
        name = f"{label}_{hashlib.sha256(sql.encode()).hexdigest()[:16]}"
        known = _prepared_texts[sql] = (text, name)
    return known


def execute_prepared(
    connection: BaseDatabaseWrapper, sql: str, params: list[Any], *, label: str
) -> tuple[Any, ...] | None:
    """Run ``sql`` (``%s`` placeholders) with ``params`` as a prepared statement of the server
    connection, PREPAREd there at its first use, and answer its first row.

    Outside a transaction (autocommit) the statement is a transaction by itself: one round
    trip. Inside one it runs in a savepoint of its own, so that a statement that fails (one
    that raises on purpose, as the submit's accept does to refuse) leaves the transaction
    usable. If what this process knows of the server connection's prepared statements is wrong
    (``DISCARD ALL``; a pooler handing it another server connection, or back one that already
    has the statement) it is put right and the statement tried once more. With PgBouncer, use
    session pooling: transaction pooling does not keep SQL-level prepared statements. On a
    connection that lasts one request (``CONN_MAX_AGE`` 0) the statement is sent as it is."""
    from psycopg2.errors import DuplicatePreparedStatement, InvalidSqlStatementName

    if connection.settings_dict["CONN_MAX_AGE"] == 0:
        # A connection per request (DB_CONN_MAX_AGE=0): preparing would cost a round trip
        # more, and the statement would go with the connection.
        with _isolated(connection), connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchone()
    text, name = _prepared_text(sql, label)
    execute = f"EXECUTE {name}({', '.join(['%s'] * len(params))})" if params else f"EXECUTE {name}"
    for attempt in (1, 2):
        # What is prepared belongs to the server connection: have the one this statement uses.
        connection.close_if_health_check_failed()
        connection.ensure_connection()
        prepared = prepared_on(connection)
        try:
            with _isolated(connection), connection.cursor() as cursor:
                if name not in prepared:
                    cursor.execute(f"PREPARE {name} AS {text}")
                    prepared.add(name)
                cursor.execute(execute, params)
                return cursor.fetchone()
        except DatabaseError as exc:
            if attempt == 2:
                raise
            if isinstance(exc.__cause__, InvalidSqlStatementName):
                prepared.clear()
            elif isinstance(exc.__cause__, DuplicatePreparedStatement):
                prepared.add(name)
            else:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _isolated(connection: BaseDatabaseWrapper) -> Any:
    """A savepoint inside a transaction (so that a failing statement leaves it usable);
    nothing outside one, where the statement is a transaction by itself."""
    if connection.in_atomic_block:
        return transaction.atomic(using=connection.alias)
    return contextlib.nullcontext()


def execute_checking_connection(
    connection: BaseDatabaseWrapper, sql: str, params: list[Any], *, label: str
) -> tuple[Any, ...] | None:
    """``execute_prepared`` for the first statement of a request, standing in for Django's
    connection health check (``CONN_HEALTH_CHECKS``: a ``SELECT 1`` before a request's first
    statement on a persistent connection, one round trip more).

    The statement itself is the check: if it fails because the connection is dead (the server
    restarted, the backend was terminated), the connection is closed and the statement sent
    again on a new one, as the check would have done first. A failure on a live connection is
    raised as it is. The statement must be one that may be sent twice, as a connection can die
    after the server committed it: a read; or a write that recognises its own earlier success
    (the submit's accept inserts a task whose id it chose, so a second one fails on the
    primary key, and the caller takes that for the first's success)."""
    pending = (
        connection.connection is not None
        and connection.health_check_enabled
        and not connection.health_check_done
        and not connection.in_atomic_block
    )
    if not pending:
        return execute_prepared(connection, sql, params, label=label)
    connection.health_check_done = True
    try:
        return execute_prepared(connection, sql, params, label=label)
    except (OperationalError, InterfaceError):
        if connection.is_usable():
            raise
        connection.close()
    return execute_prepared(connection, sql, params, label=label)
