"""StructuredOutputsParams: the one constraint a request's output must follow (vLLM's fields)."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any


class StructuredOutputKind(enum.Enum):
    """Which constraint a request carries; the spec string's meaning depends on it."""

    JSON = "json"  # a JSON schema
    JSON_OBJECT = "json_object"  # any JSON object
    REGEX = "regex"
    CHOICE = "choice"  # one of a list of strings
    GRAMMAR = "grammar"  # EBNF / GBNF (has "::=") or Lark
    STRUCTURAL_TAG = "structural_tag"


_CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass
class StructuredOutputsParams:
    """Constrain a request's output: set exactly one of ``json`` (a JSON schema as a dict or a
    JSON string), ``regex``, ``choice``, ``grammar``, ``json_object=True`` or
    ``structural_tag``. ``whitespace_pattern`` (guidance backend only) and
    ``disable_any_whitespace`` shape the whitespace of JSON output.

    Checked at construction (ValueError says what to fix); whether the backend accepts the
    schema, regex or grammar is checked by ``validate_structured_outputs``.
    """

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | dict[str, Any] | None = None
    whitespace_pattern: str | None = None
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        set_fields = [name for name in _CONSTRAINTS if getattr(self, name) is not None]
        if len(set_fields) != 1:
            raise ValueError(
                "structured_outputs needs exactly one of json, regex, choice, grammar, "
                f"json_object, structural_tag; got {set_fields or 'none'}.")
        if self.json is not None:
            self.json = _json_value("json", self.json, (dict, bool))
        if self.regex is not None:
            _text("regex", self.regex)
            if "\x00" in self.regex:
                raise ValueError("structured_outputs.regex must not contain a NUL character.")
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or any(not isinstance(c, str) or not c for c in self.choice)):
                raise ValueError("structured_outputs.choice must be a non-empty list of "
                                 "non-empty strings, e.g. [\"yes\", \"no\"].")
            self.choice = list(self.choice)
        if self.grammar is not None:
            _text("grammar", self.grammar)
        if self.json_object is not None and self.json_object is not True:
            raise ValueError("structured_outputs.json_object must be true when it is set.")
        if self.structural_tag is not None:
            tag = _json_value("structural_tag", self.structural_tag, (dict,))
            self.structural_tag = json.dumps(tag)
        if self.whitespace_pattern is not None:
            if not isinstance(self.whitespace_pattern, str) or not self.whitespace_pattern:
                raise ValueError("structured_outputs.whitespace_pattern must be a non-empty "
                                 "regex string, e.g. \"[ ]?\".")
            if self.kind not in (StructuredOutputKind.JSON, StructuredOutputKind.JSON_OBJECT):
                raise ValueError("structured_outputs.whitespace_pattern applies to json and "
                                 "json_object only.")
            if self.disable_any_whitespace:
                raise ValueError("structured_outputs: set whitespace_pattern or "
                                 "disable_any_whitespace, not both.")
        if not isinstance(self.disable_any_whitespace, bool):
            raise ValueError("structured_outputs.disable_any_whitespace must be a boolean.")

    @property
    def kind(self) -> StructuredOutputKind:
        for name in _CONSTRAINTS:
            if getattr(self, name) is not None:
                return StructuredOutputKind(name)
        raise AssertionError("validated at construction")

    @property
    def spec(self) -> str:
        """The constraint as one canonical string (JSON for schemas, choices and tags)."""
        kind = self.kind
        if kind is StructuredOutputKind.JSON:
            return json.dumps(self.json, sort_keys=True, separators=(",", ":"))
        if kind is StructuredOutputKind.JSON_OBJECT:
            return '{"type":"object"}'
        if kind is StructuredOutputKind.CHOICE:
            return json.dumps(self.choice)
        return str(getattr(self, kind.value))

    @property
    def schema(self) -> dict[str, Any] | bool | None:
        """The JSON schema of a json / json_object constraint (None otherwise)."""
        if self.kind is StructuredOutputKind.JSON_OBJECT:
            return {"type": "object"}
        return self.json if self.kind is StructuredOutputKind.JSON else None


def _text(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"structured_outputs.{name} must be a non-empty string.")


def _json_value(name: str, value: Any, types: tuple[type, ...]) -> Any:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"structured_outputs.{name} is not valid JSON: {e}") from e
    if not isinstance(value, types):
        what = "a JSON object" if types == (dict,) else "a JSON schema (an object or a boolean)"
        raise ValueError(f"structured_outputs.{name} must be {what}, got {type(value).__name__}.")
    return value
