"""Llama 3.1 / 3.2 JSON calls: ``{"name": ..., "parameters": {...}}``, optionally after
``<|python_tag|>``, several separated by ``;``. A call object starts a line; text before it
is content."""

from __future__ import annotations

import re
from typing import Any

from pagedllm.entrypoints.openai.tool_parsers.base import (
    CallScan,
    Piece,
    ToolParser,
    split_partial_marker,
)
from pagedllm.entrypoints.openai.tool_parsers.json_calls import ContainerEnds, scan_object

PYTHON_TAG = "<|python_tag|>"
_LINE_BRACE = re.compile(r"(?m)^[ \t]*\{")
_NAME_KEY = '"name"'
_WS = " \t\n\r"


def read_call_objects(text: str, pos: int, final: bool, sep: str, pieces: list[Piece],
                      ends: ContainerEnds | None = None) -> int | None:
    """Append the call objects at `text[pos:]` (separated by `sep` and whitespace) to
    `pieces`. Returns where the text after them starts, or None when the text ends inside
    or right after them (more may come). A part that is no call object stays text."""
    while True:
        scan = scan_object(text, pos, ends)
        if scan is None:
            pieces.append(text[pos:])
            return None
        if scan.end is None:
            if final:
                pieces.append(text[pos:])
            else:
                pieces.append(CallScan(pos, scan.name, scan.arguments, False))
            return None
        pieces.append(CallScan(pos, scan.name, scan.arguments, True))
        nxt = scan.end
        while nxt < len(text) and (text[nxt] in _WS or (sep and text[nxt] == sep)):
            nxt += 1
        if nxt < len(text) and text[nxt] == "{":
            pos = nxt
            continue
        if nxt >= len(text) and not final:
            return None
        rest = text[scan.end:]
        return scan.end if rest.strip(_WS + sep) else len(text)


class Llama3JsonToolParser(ToolParser):
    names = ("llama3_json", "llama4_json")

    def __init__(self, tokenizer: Any = None, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tokenizer, tools)
        self._ends = ContainerEnds()

    def _section_start(self, text: str, final: bool) -> tuple[int | None, int]:
        """(start of the calls, first object) or (None, where undecided text begins)."""
        tag = text.find(PYTHON_TAG)
        for m in _LINE_BRACE.finditer(text):
            brace = m.end() - 1
            if tag != -1 and tag < brace:
                break
            rest = text[brace + 1:].lstrip(_WS)
            if rest.startswith(_NAME_KEY):
                return brace, brace
            if not final and _NAME_KEY.startswith(rest):
                return None, brace
        if tag != -1:
            first = tag + len(PYTHON_TAG)
            while first < len(text) and text[first] in _WS:
                first += 1
            return tag, first
        if final:
            return None, len(text)
        return None, len(split_partial_marker(text, [PYTHON_TAG])[0])

    def parse(self, text: str, final: bool) -> list[Piece]:
        start, first = self._section_start(text, final)
        if start is None:
            return [text[:first]]
        pieces: list[Piece] = [text[:start]]
        if first >= len(text):
            if final:
                pieces.append(text[start:])
            return pieces
        if text[first] != "{":
            pieces.append(text[start:])
            return pieces
        after = read_call_objects(text, first, final, ";", pieces, self._ends)
        if after is not None:
            pieces.append(text[after:])
        return pieces
