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
def _insert_fields(
    model: type[models.Model], skip: tuple[str, ...], vendor: str
) -> tuple[list[models.Field], list[models.Field]]:
    """The model's concrete fields a new row is written with (``skip`` left out), split into
    auto-increment keys (omitted when unset) and the rest."""
    fields = [f for f in model._meta.concrete_fields if f.attname not in skip]
    autos = [f for f in fields if isinstance(f, models.AutoField | models.BigAutoField)]
    return autos, [f for f in fields if f not in autos]


def insert_row(
    instance: models.Model, connection: BaseDatabaseWrapper, *, skip: tuple[str, ...] = ()
) -> tuple[list[str], list[Any]]:
    """The quoted column names and prepared values of a new row for ``instance``, as
    ``create()`` would insert them (``pre_save`` of each field sets ``auto_now_add`` and the
    like on the instance too). Auto-increment primary keys left unset are omitted, for the
    database to assign; so are the fields named in ``skip`` (the caller supplies them).
    ``connection`` is a connection itself (``transaction.get_connection()``), not the proxy
    ``django.db.connection``, whose every attribute is a thread-local lookup."""
    autos, fields = _insert_fields(type(instance), skip, connection.vendor)
    chosen = [f for f in autos if getattr(instance, f.attname) is not None] + fields
    quote = connection.ops.quote_name
    columns = [quote(f.column) for f in chosen]
    values = [f.get_db_prep_save(f.pre_save(instance, add=True), connection) for f in chosen]
    return columns, values
