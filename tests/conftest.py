"""Fixtures of the cross-app and end-to-end tests (the harness lives in ``tests/e2e.py``)."""

from __future__ import annotations

from tests.e2e import e2e, stack  # noqa: F401 (pytest fixtures)
