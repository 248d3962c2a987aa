"""The Studio's form, generated from a model's parameter schema (JSON Schema) and file rules.

``param_fields`` turns the schema into fields to render (defaults, ranges, enums as selects,
booleans as checkboxes, ``description`` as help; the sandbox's ``sandbox_*`` knobs flagged as
testing fields); ``params_from_form`` reads the submitted form back into ``params`` (types only:
ranges, enums and unknown keys are the service's to check, with ``normalize_params``). Field
errors are keyed as the service keys them (``params.<name>``), so both land on the same field.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from django.template.defaultfilters import filesizeformat

TESTING_PREFIX = "sandbox_"
INPUT_PREFIX = "param_"

# Words a parameter name is made of, said the way a person reads them in a label.
_WORDS = {"num": "number of", "ms": "(ms)", "s": "(s)", "px": "(px)"}
_MIME_NAMES = {
    "image/png": "PNG",
    "image/jpeg": "JPEG",
    "image/webp": "WebP",
    "audio/wav": "WAV",
    "audio/mpeg": "MP3",
    "audio/ogg": "OGG",
    "audio/flac": "FLAC",
    "audio/webm": "WebM audio",
    "audio/mp4": "M4A",
    "video/mp4": "MP4",
    "video/webm": "WebM",
}


@dataclass(frozen=True)
class ParamField:
    """One parameter as a form field."""

    name: str
    label: str
    widget: str  # "number", "select", "checkbox", "text", "json"
    kind: str  # the JSON Schema type: "integer", "number", "boolean", "string", "any"
    value: Any = None
    default: Any = None
    minimum: Any = None
    maximum: Any = None
    options: tuple[Any, ...] = ()  # the enum's values, as the schema gives them
    help: str = ""
    required: bool = False
    max_length: int | None = None
    testing: bool = False
    errors: tuple[str, ...] = field(default=())

    @property
    def input_name(self) -> str:
        return f"{INPUT_PREFIX}{self.name}"

    @property
    def html_id(self) -> str:
        return f"id_{INPUT_PREFIX}{self.name}"

    @property
    def error_key(self) -> str:
        return f"params.{self.name}"

    @property
    def slot(self) -> str:
        """The id of the element that shows this field's errors."""
        return error_slot(self.error_key)

    @property
    def step(self) -> str:
        return "1" if self.kind == "integer" else "any"

    @property
    def display_value(self) -> str:
        """The value as the input shows it."""
        if self.value is None:
            return ""
        if self.widget == "json":
            return json.dumps(self.value)
        return str(self.value)

    @property
    def choices(self) -> list[str]:
        return [str(o) for o in self.options]

    @property
    def checked(self) -> bool:
        return self.value is True


def error_slot(key: str) -> str:
    """A safe element id for the errors of ``key`` (``params.num_outputs`` → ``err-params-
    num_outputs``): dots and other characters would need escaping in a CSS selector."""
    return "err-" + "".join(c if c.isalnum() or c in "_-" else "-" for c in key)


def label_for(name: str) -> str:
    """``num_outputs`` → "Number of outputs"; ``sandbox_latency_ms`` → "Latency (ms)"."""
    if name.startswith(TESTING_PREFIX):
        name = name[len(TESTING_PREFIX) :]
    words = [_WORDS.get(w, w) for w in name.split("_") if w]
    text = " ".join(words) or name
    return text[:1].upper() + text[1:]


def _kind(spec: Mapping[str, Any]) -> str:
    kind = spec.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    if kind in ("integer", "number", "boolean", "string"):
        return kind
    if kind is None and "enum" in spec:
        return "string"
    return "any"


def _help(spec: Mapping[str, Any], kind: str) -> str:
    """The schema's description, then the range and default: "Range 64–2048, default 512."."""
    sentences = []
    if spec.get("description"):
        text = str(spec["description"]).strip().rstrip(".")
        sentences.append(text[:1].upper() + text[1:] + ".")
    lo, hi = spec.get("minimum"), spec.get("maximum")
    facts = []
    if lo is not None and hi is not None:
        facts.append(f"Range {lo}–{hi}")
    elif lo is not None:
        facts.append(f"At least {lo}")
    elif hi is not None:
        facts.append(f"At most {hi}")
    if "default" in spec and kind != "boolean" and "enum" not in spec:
        facts.append(f"default {spec['default']}" if facts else f"Default {spec['default']}")
    if facts:
        sentences.append(", ".join(facts) + ".")
    return " ".join(sentences)


def param_fields(
    schema: Mapping[str, Any],
    values: Mapping[str, Any] | None = None,
    errors: Mapping[str, list[str]] | None = None,
) -> list[ParamField]:
    """The schema's properties as form fields, in schema order, ``values`` (a previous task's
    params, or what was submitted) over the defaults."""
    values = values or {}
    errors = errors or {}
    properties = schema.get("properties", {}) if isinstance(schema, Mapping) else {}
    required = set(schema.get("required", [])) if isinstance(schema, Mapping) else set()
    fields = []
    for name, spec in properties.items():
        if not isinstance(spec, Mapping):
            continue
        kind = _kind(spec)
        if "enum" in spec:
            widget = "select"
        elif kind == "boolean":
            widget = "checkbox"
        elif kind in ("integer", "number"):
            widget = "number"
        elif kind == "string":
            widget = "text"
        else:
            widget = "json"
        default = spec.get("default")
        fields.append(
            ParamField(
                name=name,
                label=str(spec.get("title") or label_for(name)),
                widget=widget,
                kind=kind,
                value=values.get(name, default),
                default=default,
                minimum=spec.get("minimum"),
                maximum=spec.get("maximum"),
                options=tuple(spec.get("enum", ())),
                help=_help(spec, kind),
                required=name in required and default is None,
                max_length=spec.get("maxLength"),
                testing=name.startswith(TESTING_PREFIX),
                errors=tuple(errors.get(f"params.{name}", ())),
            )
        )
    return fields


def split_testing(
    fields: list[ParamField], first: tuple[str, ...] = ()
) -> tuple[list[ParamField], list[ParamField]]:
    """(the fields a person sets, the sandbox's testing knobs). The knobs named in ``first``
    come first in that order (JSON columns do not keep the schema's key order), then the others
    by name."""
    testing = sorted(
        (f for f in fields if f.testing),
        key=lambda f: (first.index(f.name) if f.name in first else len(first), f.name),
    )
    return [f for f in fields if not f.testing], testing


def params_from_form(
    schema: Mapping[str, Any], data: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """Read ``param_<name>`` inputs back into typed params. Returns (params, errors).

    An empty input is left out (the schema's default applies); an unchecked checkbox is False.
    Only types are checked here; everything else is the service's to refuse.
    """
    params: dict[str, Any] = {}
    errors: dict[str, list[str]] = {}
    for f in param_fields(schema):
        if f.widget == "checkbox":
            params[f.name] = f.input_name in data
            continue
        raw = data.get(f.input_name)
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            continue
        raw = str(raw).strip()
        try:
            params[f.name] = _parse(f, raw)
        except ValueError as exc:
            errors[f.error_key] = [str(exc)]
    return params, errors


def _parse(f: ParamField, raw: str) -> Any:
    if f.widget == "select":
        # Enum values may be numbers: give back the schema's own value for the chosen option.
        for option in f.options:
            if str(option) == raw:
                return option
        raise ValueError("Choose one of the options.")
    if f.kind == "integer":
        try:
            number = float(raw)
        except ValueError:
            raise ValueError("Enter a whole number.") from None
        if not number.is_integer():
            raise ValueError("Enter a whole number.")
        return int(number)
    if f.kind == "number":
        try:
            number = float(raw)
        except ValueError:
            raise ValueError("Enter a number.") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise ValueError("Enter a number.")
        return int(number) if number.is_integer() and "." not in raw else number
    if f.widget == "json":
        try:
            return json.loads(raw)
        except ValueError:
            raise ValueError("Enter valid JSON.") from None
    return raw


def file_rules_text(rules: Mapping[str, Any]) -> list[str]:
    """The model's reference-file rules in plain words; empty when it takes no files."""
    if not isinstance(rules, Mapping):
        return []
    minimum, maximum = int(rules.get("min", 0) or 0), int(rules.get("max", 0) or 0)
    if maximum <= 0:
        return []
    if minimum == maximum:
        count = f"Required: {maximum} file" + ("s" if maximum > 1 else "")
    elif minimum == 0:
        count = f"Optional: up to {maximum} file" + ("s" if maximum > 1 else "")
    else:
        count = f"{minimum} to {maximum} files"
    lines = [count]
    accept = rules.get("accept") or []
    if accept:
        lines.append("Types: " + ", ".join(_MIME_NAMES.get(m, m) for m in accept))
    if rules.get("max_bytes"):
        each = " each" if maximum > 1 else ""
        lines.append(f"At most {filesizeformat(rules['max_bytes'])}{each}")
    lo, hi = rules.get("min_duration_ms"), rules.get("max_duration_ms")
    if lo is not None and hi is not None:
        lines.append(f"Length: {_duration(lo)} to {_duration(hi)}")
    elif lo is not None:
        lines.append(f"Length: at least {_duration(lo)}")
    elif hi is not None:
        lines.append(f"Length: at most {_duration(hi)}")
    return lines


def _duration(ms: int) -> str:
    seconds = ms / 1000
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)} min"
    return f"{seconds:g} s"
