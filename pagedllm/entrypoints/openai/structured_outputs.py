"""OpenAI request fields -> StructuredOutputsParams (pure functions; ValueError -> HTTP 400).

Three spellings reach the same params: ``response_format`` (OpenAI's ``json_object`` and
``json_schema``, and vLLM's ``structural_tag``), vLLM's ``structured_outputs`` object, and
the legacy ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar`` /
``guided_whitespace_pattern`` fields. A request may use one constraint only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from pagedllm.structured_output import (
    StructuredOutputsConfig,
    StructuredOutputsParams,
    validate_structured_outputs,
)

_PARAM_FIELDS = tuple(f.name for f in fields(StructuredOutputsParams))
GUIDED_FIELDS = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
    "guided_whitespace_pattern": "whitespace_pattern",
}
_OPTIONS = ("whitespace_pattern", "disable_any_whitespace")


def _as_dict(value: Any, name: str) -> dict[str, Any]:
    if hasattr(value, "model_dump"):  # a pydantic model (extra fields included)
        value = value.model_dump(exclude_none=True)
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} must be an object, got {type(value).__name__}.")
    return dict(value)


def _from_response_format(response_format: Any) -> dict[str, Any]:
    fmt = _as_dict(response_format, "response_format")
    kind = fmt.get("type", "text")
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, Mapping) or "schema" not in spec:
            raise ValueError('response_format {"type": "json_schema"} needs "json_schema": '
                             '{"name": ..., "schema": {...}, "strict": true}.')
        name = spec.get("name")
        if name is not None and not isinstance(name, str):
            raise ValueError("response_format.json_schema.name must be a string.")
        if spec.get("strict") not in (None, True, False):
            raise ValueError("response_format.json_schema.strict must be a boolean.")
        return {"json": spec["schema"]}
    if kind == "structural_tag":
        tag = {k: v for k, v in fmt.items() if k != "type"}
        return {"structural_tag": json.dumps(tag)}
    raise ValueError(f"response_format type {kind!r} is not supported; use one of "
                     "'text', 'json_object', 'json_schema', 'structural_tag'.")


def _from_structured_outputs(value: Any) -> dict[str, Any]:
    so = {k: v for k, v in _as_dict(value, "structured_outputs").items() if v is not None}
    unknown = sorted(set(so) - set(_PARAM_FIELDS))
    if unknown:
        raise ValueError(f"structured_outputs has unknown fields {unknown}; known: "
                         f"{list(_PARAM_FIELDS)}.")
    return so


def _merge(into: dict[str, Any], sources: dict[str, str], new: dict[str, Any],
           source: str) -> None:
    """Add ``new`` (from ``source``) to ``into``; two sources may not both set a constraint,
    nor the same option (a source with two constraints is StructuredOutputsParams' error)."""
    for key, value in new.items():
        for seen, seen_source in sources.items():
            same_kind = (key in _OPTIONS and seen == key) or (
                key not in _OPTIONS and seen not in _OPTIONS)
            if same_kind and seen_source != source:
                what = key if key in _OPTIONS else "a constraint"
                raise ValueError(f"{source} and {seen_source} both set {what}: give one "
                                 "structured-output constraint per request.")
        into[key], sources[key] = value, source


def structured_outputs_from_fields(
        *, response_format: Any = None, structured_outputs: Any = None,
        guided: Mapping[str, Any] | None = None,
        config: StructuredOutputsConfig | None = None) -> StructuredOutputsParams | None:
    """The request's StructuredOutputsParams, or None when it has no constraint.

    ``guided`` holds the legacy ``guided_*`` fields by name. With ``config`` the backend also
    checks the schema, regex or grammar (ValueError with its diagnosis).
    """
    kwargs: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if structured_outputs is not None:
        _merge(kwargs, sources, _from_structured_outputs(structured_outputs),
               "structured_outputs")
    if response_format is not None:
        _merge(kwargs, sources, _from_response_format(response_format), "response_format")
    for name, value in (guided or {}).items():
        if name not in GUIDED_FIELDS:
            raise ValueError(f"unknown guided field {name!r}; known: {list(GUIDED_FIELDS)}.")
        if value is not None:
            _merge(kwargs, sources, {GUIDED_FIELDS[name]: value}, name)
    if not any(k not in _OPTIONS for k in kwargs):
        if kwargs:
            raise ValueError(f"{', '.join(sources.values())} needs a constraint (json, regex, "
                             "choice, grammar, json_object or structural_tag).")
        return None
    params = StructuredOutputsParams(**kwargs)
    if config is not None:
        validate_structured_outputs(params, config)
    return params


def structured_outputs_from_request(request: Any, config: StructuredOutputsConfig | None = None
                                    ) -> StructuredOutputsParams | None:
    """``structured_outputs_from_fields`` over a chat / completion request model, reading its
    declared fields or, for an ``extra="allow"`` model, its extra ones."""
    extra = getattr(request, "model_extra", None) or {}

    def field(name: str) -> Any:
        value = getattr(request, name, None)
        return extra.get(name) if value is None else value

    return structured_outputs_from_fields(
        response_format=field("response_format"),
        structured_outputs=field("structured_outputs"),
        guided={name: field(name) for name in GUIDED_FIELDS}, config=config)
