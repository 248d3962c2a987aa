"""Catalog models for the submit path, kept in each process and checked at every use.

A submit on PostgreSQL reads its model from here instead of the database. Each entry carries the
row's fingerprint (``md5`` of the whole row as PostgreSQL prints it, ``FINGERPRINT_SQL``). The
statement that accepts the task writes it only if the model row is still enabled and still has
that fingerprint, so a model disabled, repriced or otherwise changed (in the admin, by
``seed_catalog`` or by any UPDATE) applies to the very next submit: the statement refuses, the
entry is dropped, and the submit is validated again against the row read afresh. There is no
time-to-live: an entry is right until the row changes, and the accept statement is what notices.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.db.models.expressions import RawSQL

from tasks.models import AIModel

# The fingerprint of a model row: the whole row as text, hashed. In the accept statement the
# row is aliased ``m`` (``md5(m::text)``); both print the same row the same way.
FINGERPRINT_SQL = "md5(tasks_aimodel::text)"


@dataclass(frozen=True)
class CachedModel:
    model: AIModel
    fingerprint: str


_entries: dict[str, CachedModel] = {}  # by slug; at most the enabled models of the catalog


def cached_model(slug: str) -> CachedModel | None:
    """The enabled model ``slug`` with its fingerprint, from this process's copy if it has one
    (None if there is no such enabled model; unknown slugs are not remembered)."""
    entry = _entries.get(slug)
    if entry is not None:
        return entry
    model = (
        AIModel.objects.filter(slug=slug, enabled=True)
        .annotate(fingerprint=RawSQL(FINGERPRINT_SQL, ()))  # noqa: S611 - a constant
        .first()
    )
    if model is None:
        return None
    entry = CachedModel(model=model, fingerprint=model.fingerprint)
    _entries[slug] = entry
    return entry


def forget_model(slug: str) -> None:
    """Drop this process's copy of ``slug`` (its row changed)."""
    _entries.pop(slug, None)
