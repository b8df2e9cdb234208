"""`tool_choice` and `parallel_tool_calls` of a chat request: checked, reduced to one mode,
and, for ``required`` and a named function, the JSON schema that structured outputs must
hold the output to plus the parser that reads that constrained output back as calls.

Modes: ``none`` (tools may be in the prompt; the output is not parsed for calls), ``auto``
(the server's ``--tool-call-parser`` reads what the model wrote), ``required`` (the output
is a JSON list of ``{"name", "parameters"}`` objects, at least one, at most one without
parallel calls) and ``function`` (the output is the named function's arguments object).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pagedllm.entrypoints.chat_utils import ChatInputError, validate_tools
from pagedllm.entrypoints.openai.tool_parsers.base import CallScan, Piece, ToolParser
from pagedllm.entrypoints.openai.tool_parsers.json_calls import ContainerEnds, read_call_list

_WS = " \t\n\r"


@dataclass(frozen=True)
class ToolChoice:
    mode: Literal["none", "auto", "required", "function"]
    function: str | None = None  # the name, for mode "function"
    parallel: bool = True

    @property
    def max_calls(self) -> int | None:
        """At most this many calls (``parallel_tool_calls=false``: one)."""
        return 1 if self.mode == "function" or not self.parallel else None


def resolve_tool_choice(tool_choice: Any, tools: Any, parallel_tool_calls: Any = None, *,
                        auto_enabled: bool) -> ToolChoice:
    """The request's tool choice, or ChatInputError naming the field.

    No `tool_choice` means ``auto`` with tools and ``none`` without. `auto_enabled` is
    whether the server runs with ``--enable-auto-tool-choice`` and a tool-call parser.
    """
    tools = validate_tools(tools) or []
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise ChatInputError("parallel_tool_calls must be true or false.",
                             "parallel_tool_calls")
    parallel = parallel_tool_calls is not False
    if tool_choice is None:
        tool_choice = "auto" if tools else "none"
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if tool_choice.get("type", "function") != "function" or not isinstance(name, str):
            raise ChatInputError("tool_choice must be 'none', 'auto', 'required' or "
                                 "{'type': 'function', 'function': {'name': ...}}.",
                                 "tool_choice")
        names = [t["function"]["name"] for t in tools]
        if name not in names:
            known = ", ".join(repr(n) for n in names) if names else "none (tools is empty)"
            raise ChatInputError(f"tool_choice names the function {name!r}, which is not in "
                                 f"tools; the tools are {known}.",
                                 "tool_choice.function.name")
        return ToolChoice("function", name, parallel)
    if tool_choice not in ("none", "auto", "required"):
        raise ChatInputError(f"tool_choice is {tool_choice!r}; use 'none', 'auto', 'required' "
                             "or {'type': 'function', 'function': {'name': ...}}.",
                             "tool_choice")
    if tool_choice != "none" and not tools:
        raise ChatInputError(f"tool_choice {tool_choice!r} needs a non-empty tools list.",
                             "tools")
    if tool_choice == "auto" and not auto_enabled:
        raise ChatInputError('tool_choice "auto" needs the server to be started with '
                             "--enable-auto-tool-choice and --tool-call-parser NAME; pass "
                             'tool_choice "none", "required" or a named function instead.',
                             "tool_choice")
    return ToolChoice(tool_choice, None, parallel)


def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    return tool["function"].get("parameters") or {"type": "object"}


def tool_choice_json_schema(choice: ToolChoice, tools: Any) -> dict[str, Any] | None:
    """The JSON schema the output must follow (for structured outputs), None for modes
    that do not constrain it."""
    tools = validate_tools(tools) or []
    if choice.mode == "function":
        return next(_parameters(t) for t in tools if t["function"]["name"] == choice.function)
    if choice.mode != "required":
        return None
    one_of_each = [{
        "type": "object",
        "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                       "parameters": _parameters(t)},
        "required": ["name", "parameters"],
        "additionalProperties": False,
    } for t in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": one_of_each}}
    if not choice.parallel:
        schema["maxItems"] = 1
    return schema


class NamedFunctionParser(ToolParser):
    """Reads output constrained to one function's arguments object: the whole text is the
    arguments of `function` (the call's header can be sent before any text arrives)."""

    def __init__(self, function: str, tokenizer: Any = None,
                 tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tokenizer, tools)
        self.function = function
        self._ends = ContainerEnds()

    def parse(self, text: str, final: bool) -> list[Piece]:
        lead = len(text) - len(text.lstrip(_WS))
        if lead == len(text):
            return [text] if final else [CallScan(0, self.function, "", False)]
        if text[lead] != "{":
            return [text]
        end = self._ends.end(text, lead)
        if end is None:
            return [text] if final else [CallScan(0, self.function, text[lead:], False)]
        if text[end:].strip(_WS) or not _is_object(text[lead:end]):
            return [text]
        return [CallScan(0, self.function, text[lead:end], True)]


class RequiredCallsParser(ToolParser):
    """Reads output constrained to a JSON list of ``{"name", "parameters"}`` objects."""

    def __init__(self, tokenizer: Any = None, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tokenizer, tools)
        self._ends = ContainerEnds()

    def parse(self, text: str, final: bool) -> list[Piece]:
        lead = len(text) - len(text.lstrip(_WS))
        if lead == len(text):
            return [text] if final else []
        if text[lead] != "[":
            return [text]
        pieces: list[Piece] = []
        read_call_list(text, 0, lead, final, pieces, self._ends)
        return pieces


def constrained_output_parser(choice: ToolChoice, tools: Any,
                              tokenizer: Any = None) -> ToolParser | None:
    """The parser for the output of a ``required`` or named-function request."""
    if choice.mode == "function":
        assert choice.function is not None
        return NamedFunctionParser(choice.function, tokenizer, tools)
    if choice.mode == "required":
        return RequiredCallsParser(tokenizer, tools)
    return None


def _is_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False
