"""Building hand-written SQL from model instances, so that a statement the ORM cannot express
(a data-modifying ``WITH`` that does a whole operation in one round trip) still writes rows
exactly as ``Model.objects.create`` would: the same columns, the same Python-side defaults and
``auto_now_add`` values, the same database preparation of each value.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from django.db import models
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
    for field, plain in _insert_plan(type(instance), skip):
        value = field.pre_save(instance, add=True)
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
) -> tuple[tuple[models.Field, type | None], ...]:
    """Each field ``insert_values`` writes, with the Python type whose values its preparation
    returns as they are (``IntegerField.get_prep_value`` is ``int(value)``, ``CharField``'s
    ``str(value)``), or None."""

    def plain(field: models.Field) -> type | None:
        return next((t for cls, t in _PLAIN_TYPES if isinstance(field, cls)), None)

    return tuple((f, plain(f)) for f in _insert_fields(model, skip))


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
