"""Validation and pricing of a generation request against its catalog model.

Everything here runs before any row is written: a request that fails creates no task.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import fastjsonschema
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from rivya.errors import ValidationFailed
from tasks.media import MediaInfo
from tasks.models import AIModel


def normalize_params(schema: Mapping[str, Any], params: Any) -> dict[str, Any]:
    """Fill defaults and check ``params`` against the model's JSON Schema.

    Unknown keys and out-of-range values are refused (the catalog schemas set
    ``additionalProperties: false``; we enforce it even when a schema forgets to).
    Raises ValidationFailed with ``params.<name>`` fields.
    """
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ValidationFailed({"params": ["Must be a JSON object."]})
    properties: Mapping[str, Any] = schema.get("properties", {})
    unknown = sorted(set(params) - set(properties))
    if unknown:
        raise ValidationFailed(
            {f"params.{k}": ["Unknown parameter for this model."] for k in unknown}
        )
    normalized = {
        name: spec["default"]
        for name, spec in properties.items()
        if isinstance(spec, Mapping) and "default" in spec
    }
    normalized.update(params)
    # JSON Schema counts 3.0 as an integer: store it as 3, so that everything reading the params
    # later (the price, the partial-success basis, the provider) sees one value.
    for name, value in normalized.items():
        spec = properties.get(name)
        if isinstance(value, float) and value.is_integer() and _is_integer_type(spec):
            normalized[name] = int(value)
    compiled = compiled_check(schema)
    if compiled is not None:
        try:
            compiled(normalized)
            return normalized
        except fastjsonschema.JsonSchemaException:
            pass  # refused: the messages come from the rule itself, below
    try:
        validator = Draft202012Validator({**schema, "type": "object"})
        errors = sorted(validator.iter_errors(normalized), key=lambda e: list(e.path))
    except SchemaError:  # a broken catalog entry is our problem, not the user's
        raise ValidationFailed(
            {"model": ["This model is misconfigured; try another."]}, code="model_misconfigured"
        ) from None
    if errors:
        fields: dict[str, list[str]] = {}
        for error in errors:
            path = ".".join(str(p) for p in error.absolute_path)
            fields.setdefault(f"params.{path}" if path else "params", []).append(error.message)
        raise ValidationFailed(fields)
    return normalized


# The rule is JSON Schema 2020-12 as ``jsonschema`` checks it. A schema that uses only these
# keywords, which mean the same in draft 7, is first checked by code fastjsonschema compiles
# from it (a tenth of the cost, on every submit); only a refusal is checked again by the rule,
# for its messages. ``tasks/tests/test_validation.py`` runs both on the catalog's schemas and on
# values around every bound, and requires the same verdict.
SAME_IN_DRAFT_7 = frozenset(
    {
        "type",
        "enum",
        "const",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "minLength",
        "maxLength",
        "properties",
        "additionalProperties",
        "required",
        "default",
        "description",
        "title",
    }
)
MAX_COMPILED = 256  # schemas kept compiled per process (the catalog has a few dozen)
_compiled: dict[str, Callable[[Any], Any] | None] = {}


def compiled_check(schema: Mapping[str, Any]) -> Callable[[Any], Any] | None:
    """The compiled check of ``schema`` (as ``normalize_params`` applies it, an object), or None
    if the schema uses a keyword outside ``SAME_IN_DRAFT_7``. It raises
    ``fastjsonschema.JsonSchemaException`` for a value the schema refuses; it fills no
    defaults."""
    text = json.dumps(schema, sort_keys=True)
    if text in _compiled:
        return _compiled.get(text)
    check = None
    if _only_keywords_same_in_draft_7(schema):
        try:
            check = fastjsonschema.compile({**schema, "type": "object"}, use_default=False)
        except fastjsonschema.JsonSchemaDefinitionException:
            check = None  # a broken schema: the rule says so, with its message
    if len(_compiled) >= MAX_COMPILED:
        _compiled.clear()
    _compiled[text] = check
    return check


def _only_keywords_same_in_draft_7(schema: Any) -> bool:
    if not isinstance(schema, Mapping) or not set(schema) <= SAME_IN_DRAFT_7:
        return False
    properties = schema.get("properties", {})
    if not isinstance(properties, Mapping):
        return False
    nested = list(properties.values())
    additional = schema.get("additionalProperties", True)
    if not isinstance(additional, bool):
        nested.append(additional)
    return all(_only_keywords_same_in_draft_7(spec) for spec in nested)


def _is_integer_type(spec: Any) -> bool:
    if not isinstance(spec, Mapping):
        return False
    kind = spec.get("type")
    return kind == "integer" or (isinstance(kind, list) and "integer" in kind)


@dataclass(frozen=True)
class FileCheck:
    name: str
    info: MediaInfo
    size: int


def check_files(
    rules: Mapping[str, Any], files: Sequence[FileCheck], *, field: str = "files"
) -> None:
    """Reference files against the model's rules: count, type (by content), size, duration.

    Errors are keyed by ``field`` (``field.<n>`` per file), the multipart field the client sent.
    """
    minimum, maximum = int(rules.get("min", 0)), int(rules.get("max", 0))
    if len(files) < minimum:
        raise ValidationFailed(
            {field: [f"This model needs {minimum} reference file(s); {len(files)} given."]},
            code="file_required",
        )
    if len(files) > maximum:
        raise ValidationFailed(
            {
                field: [
                    f"This model accepts at most {maximum} reference file(s); {len(files)} given."
                ]
            },
            code="too_many_files",
        )
    accept = set(rules.get("accept", []))
    max_bytes = rules.get("max_bytes")
    min_ms, max_ms = rules.get("min_duration_ms"), rules.get("max_duration_ms")
    errors: dict[str, list[str]] = {}
    for index, f in enumerate(files):
        key = f"{field}.{index}"
        if accept and f.info.mime not in accept:
            errors.setdefault(key, []).append(
                f"{f.name}: {f.info.mime} files are not accepted by this model "
                f"(accepted: {', '.join(sorted(accept))})."
            )
        if max_bytes and f.size > max_bytes:
            errors.setdefault(key, []).append(
                f"{f.name}: {f.size} bytes is over this model's limit of {max_bytes}."
            )
        if min_ms is not None or max_ms is not None:
            duration = f.info.duration_ms
            if duration is None:
                errors.setdefault(key, []).append(f"{f.name}: its duration could not be read.")
            elif min_ms is not None and duration < min_ms:
                errors.setdefault(key, []).append(
                    f"{f.name}: {duration / 1000:.1f} s is shorter than the minimum "
                    f"{min_ms / 1000:.1f} s."
                )
            elif max_ms is not None and duration > max_ms:
                errors.setdefault(key, []).append(
                    f"{f.name}: {duration / 1000:.1f} s is longer than the maximum "
                    f"{max_ms / 1000:.1f} s."
                )
    if errors:
        raise ValidationFailed(errors, code="invalid_file")


def check_prompt(model: AIModel, prompt: Any) -> str:
    if prompt is None:
        prompt = ""
    if not isinstance(prompt, str):
        raise ValidationFailed({"prompt": ["Must be a string."]})
    prompt = prompt.strip()
    if model.prompt_required and not prompt:
        raise ValidationFailed({"prompt": ["This model needs a prompt."]})
    if len(prompt) > model.max_prompt_length:
        raise ValidationFailed(
            {
                "prompt": [
                    f"At most {model.max_prompt_length} characters for this model "
                    f"({len(prompt)} given)."
                ]
            },
            code="prompt_too_long",
        )
    return prompt
