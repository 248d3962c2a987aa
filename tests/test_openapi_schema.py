"""The OpenAPI schema is generated; this snapshot fails when it changes unintentionally.

After an intended API change: `make schema` rewrites docs/openapi.yaml; commit it with the change.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import pytest
from django.core.management import call_command

SNAPSHOT = Path(__file__).resolve().parents[1] / "docs" / "openapi.yaml"


@pytest.mark.django_db
def test_schema_matches_the_committed_snapshot(tmp_path: Path) -> None:
    out = tmp_path / "schema.yaml"
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(out))

    current, expected = out.read_text(), SNAPSHOT.read_text()

    diff = "".join(
        difflib.unified_diff(
            expected.splitlines(True),
            current.splitlines(True),
            "docs/openapi.yaml",
            "generated",
            n=2,
        )
    )
    assert current == expected, f"The API schema changed (run `make schema` if intended):\n{diff}"
