"""The two checks of a request's parameters against its model's JSON Schema agree.

``tasks.validation.normalize_params`` first checks with code compiled by fastjsonschema (draft 7)
when the schema uses only keywords that mean the same in 2020-12, and the rule itself is
``jsonschema``'s 2020-12 validator. A value one accepts and the other refuses would be a
request accepted against the rule, so both run here on every catalog schema, on values at and
around every bound, and on values hypothesis draws.
"""

from __future__ import annotations

from typing import Any

import fastjsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from tasks.catalog import SEED
from tasks.validation import compiled_check

# Every keyword the compiled check is trusted with, in one schema.
EVERY_KEYWORD = {
    "title": "every keyword",
    "description": "each keyword the compiled check is used for",
    "properties": {
        "n": {"type": "integer", "minimum": 1, "maximum": 8, "default": 2},
        "x": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1.5},
        "s": {"type": "string", "minLength": 2, "maxLength": 4, "enum": ["ab", "abc", "abcd"]},
        "c": {"const": "fixed"},
        "e": {"enum": [0, 1, "1", None, 1.5, [1], {"a": 0}]},
        "k": {"const": 1},
        "q": {"const": 'a"b\\"c\\\\'},  # quotes and backslashes: nothing may escape into code
        "big": {"type": "integer", "maximum": 2**60},
        "b": {"type": "boolean"},
        "t": {"type": ["integer", "null"]},
        "o": {"type": "object", "properties": {"k": {"type": "string"}}, "required": ["k"]},
    },
    "required": ["n"],
    "additionalProperties": False,
}


# The catalog's schemas as tasks.catalog seeds them, and the one with every keyword.
SCHEMAS = [spec["params_schema"] for spec in SEED] + [EVERY_KEYWORD]


def by_the_rule(schema: dict[str, Any], params: Any) -> bool:
    return Draft202012Validator({**schema, "type": "object"}).is_valid(params)


def by_the_compiled_check(schema: dict[str, Any], params: Any) -> bool:
    check = compiled_check(schema)
    assert check is not None
    try:
        check(params)
    except fastjsonschema.JsonSchemaException:
        return False
    return True


def around(spec: Any) -> list[Any]:
    """Values at and around what ``spec`` allows, and of every JSON type."""
    values: list[Any] = [None, True, False, 0, 1, -1, 0.5, 1.0, "", "x", [], {}, [1], {"k": "v"}]
    values += [[True], {"a": False}, 2**53 + 1, 2**60, 2**60 + 1, -(2**63), float(2**60), "1"]
    if isinstance(spec, dict):
        for bound in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            if isinstance(spec.get(bound), int | float):
                b = spec[bound]
                values += [b - 1, b - 0.5, b, b + 0.5, b + 1, float(b)]
        for length in ("minLength", "maxLength"):
            if isinstance(spec.get(length), int):
                values += [
                    "a" * max(spec[length] - 1, 0),
                    "a" * spec[length],
                    "a" * (spec[length] + 1),
                ]
        values += list(spec.get("enum", [])) + [spec.get("const"), spec.get("default")]
    return values


def test_the_catalog_and_every_trusted_keyword_are_checked_by_compiled_code() -> None:
    for schema in SCHEMAS:
        assert compiled_check(schema) is not None, schema


@pytest.mark.parametrize(
    "schema",
    [
        {"properties": {"p": {"type": "string", "pattern": "^a"}}},
        {"properties": {"l": {"type": "array", "prefixItems": [{"type": "integer"}]}}},
        {"properties": {"l": {"type": "array", "items": {"type": "integer"}}}},
        {"additionalProperties": {"type": "string", "format": "email"}},
        {"$defs": {}, "properties": {}},
        # jsonschema divides in floats, fastjsonschema exactly: 0.3 is refused by the rule
        {"properties": {"g": {"type": "number", "multipleOf": 0.1}}},
        {"properties": {"n": {"type": "integer", "multipleOf": 2}}},
    ],
)
def test_a_schema_with_another_keyword_is_checked_by_the_rule_alone(schema: Any) -> None:
    assert compiled_check(schema) is None


def test_both_checks_agree_at_and_around_every_bound() -> None:
    verdicts = []
    for schema in SCHEMAS:
        defaults = _defaults(schema)
        cases = [{}, {"unknown": 1}, defaults, {**defaults, "zz": None}]
        for name, spec in schema.get("properties", {}).items():
            cases += [{name: v} for v in around(spec)] + [
                {**defaults, name: v} for v in around(spec)
            ]
        for params in cases:
            verdict = by_the_rule(schema, params)
            assert by_the_compiled_check(schema, params) == verdict, (schema, params)
            verdicts.append(verdict)
    assert len(verdicts) > 500
    assert verdicts.count(True) > 100
    assert verdicts.count(False) > 100


def _defaults(schema: dict[str, Any]) -> dict[str, Any]:
    return {
        name: spec["default"]
        for name, spec in schema.get("properties", {}).items()
        if isinstance(spec, dict) and "default" in spec
    }


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3), children, max_size=3)
    ),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_both_checks_agree_on_drawn_values(data: st.DataObject) -> None:
    schema = data.draw(st.sampled_from(SCHEMAS))
    names = list(schema.get("properties", {})) + ["other"]
    params = data.draw(st.dictionaries(st.sampled_from(names), JSON, max_size=len(names)))
    assert by_the_compiled_check(schema, params) == by_the_rule(schema, params), (schema, params)
