"""Qwen3-Coder XML-style calls::

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    </function>
    </tool_call>

Parameter values are text; each is typed by the request's `parameters` schema (strings stay
text, numbers / booleans / objects / arrays are read as JSON), and kept as text where the
schema does not say or the text does not read as that type. A stream sends each parameter
once its ``</parameter>`` arrives.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from pagedllm.entrypoints.openai.tool_parsers.base import CallScan
from pagedllm.entrypoints.openai.tool_parsers.hermes import DelimitedCallParser

_FUNCTION = re.compile(r"\s*<function=([^>\n]+)>")
_PARAMETER_OPEN = re.compile(r"\s*<parameter=([^>\n]+)>")
_PARAMETER_END = "</parameter>"
_FUNCTION_END = re.compile(r"\s*</function>\s*")


def _strip_newlines(value: str) -> str:
    """The value without the newline the format puts after the open and before the close tag."""
    if value.startswith("\n"):
        value = value[1:]
    if value.endswith("\n"):
        value = value[:-1]
    return value


def _typed(value: str, schema: dict[str, Any] | None) -> Any:
    kind = (schema or {}).get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    if value.strip().lower() == "null" and kind != "string":
        return None
    if kind in (None, "string"):
        return value
    if kind == "boolean" and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    try:
        typed = json.loads(value)
    except json.JSONDecodeError:
        if kind not in ("object", "array"):
            return value
        try:  # a Python literal such as {'a': 1}
            typed = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            return value
    if kind == "integer" and isinstance(typed, float) and typed.is_integer():
        typed = int(typed)
    return typed


class Qwen3CoderToolParser(DelimitedCallParser):
    names = ("qwen3_coder", "qwen3_xml")

    def _param_schema(self, function: str, param: str) -> dict[str, Any] | None:
        props = (self.tool_schema(function) or {}).get("properties")
        return props.get(param) if isinstance(props, dict) else None

    def read_body(self, body: str, start: int, complete: bool) -> CallScan | None:
        fn = _FUNCTION.match(body)
        if fn is None:
            return None if complete else CallScan(start, None, "", False)
        name = fn.group(1).strip()
        pos, items = fn.end(), []
        while (param := _PARAMETER_OPEN.match(body, pos)) is not None:
            close = body.find(_PARAMETER_END, param.end())
            if close < 0:
                break  # the value is still being written
            key = param.group(1).strip()
            value = _typed(_strip_newlines(body[param.end():close]),
                           self._param_schema(name, key))
            items.append(f"{json.dumps(key)}: {json.dumps(value)}")
            pos = close + len(_PARAMETER_END)
        args = "{" + ", ".join(items)
        if complete:
            end = _FUNCTION_END.match(body, pos)
            if end is None or end.end() != len(body):
                return None
            return CallScan(start, name, args + "}", True)
        return CallScan(start, name, args, False)
