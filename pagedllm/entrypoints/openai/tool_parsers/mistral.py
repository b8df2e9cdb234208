"""Mistral calls after the ``[TOOL_CALLS]`` token: a JSON list of
``{"name", "arguments"}`` objects (older tokenizers), or ``name[ARGS]{...}`` per call
(tokenizer v11+; several calls each start with ``[TOOL_CALLS]``). Text before is content.
`[TOOL_CALLS]` is a special token: detokenize with skip_special_tokens=False. Call ids are
9 letters and digits (not ``call_...``), the only ids Mistral's templates accept."""

from __future__ import annotations

import re
import secrets
import string
from typing import Any

from pagedllm.entrypoints.openai.tool_parsers.base import (
    CallScan,
    Piece,
    ToolParser,
    split_partial_marker,
)
from pagedllm.entrypoints.openai.tool_parsers.json_calls import (
    ContainerEnds,
    decode_container,
    read_call_list,
)

TOOL_CALLS = "[TOOL_CALLS]"
ARGS = "[ARGS]"
_ID_CHARS = string.ascii_letters + string.digits
_NAME = re.compile(r"[A-Za-z_][\w.\-]*")
_WS = " \t\n\r"


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WS:
        pos += 1
    return pos


class MistralToolParser(ToolParser):
    names = ("mistral",)
    needs_special_tokens = True

    def __init__(self, tokenizer: Any = None, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tokenizer, tools)
        self._ends = ContainerEnds()

    def new_call_id(self) -> str:
        """9 letters and digits: Mistral's chat templates refuse other tool-call ids when
        the conversation comes back."""
        return "".join(secrets.choice(_ID_CHARS) for _ in range(9))

    def parse(self, text: str, final: bool) -> list[Piece]:
        i = text.find(TOOL_CALLS)
        if i < 0:
            return [text if final else split_partial_marker(text, [TOOL_CALLS])[0]]
        pieces: list[Piece] = [text[:i]]
        pos = _skip_ws(text, i + len(TOOL_CALLS))
        if pos >= len(text):
            if final:
                pieces.append(text[i:])
            return pieces
        if text[pos] == "[":
            read_call_list(text, i, pos, final, pieces, self._ends)
        else:
            self._read_args_form(text, i, pos, final, pieces)
        return pieces

    def _read_args_form(self, text: str, mark: int, pos: int, final: bool,
                        pieces: list[Piece]) -> None:
        while True:
            name_start = pos
            k = text.find(ARGS, pos)
            if k < 0:
                if not final:
                    head = split_partial_marker(text[pos:], [ARGS])[0].strip()
                    if not head or _NAME.fullmatch(head):
                        return  # the name is still being written
                pieces.append(text[mark:])
                return
            name = text[pos:k].strip()
            if not _NAME.fullmatch(name):
                pieces.append(text[mark:])
                return
            args_pos = _skip_ws(text, k + len(ARGS))
            decoded = decode_container(text, args_pos, self._ends) \
                if args_pos < len(text) else None
            if decoded is None:
                if final or (args_pos < len(text) and text[args_pos] != "{"):
                    pieces.append(text[mark:])
                else:
                    pieces.append(CallScan(name_start, name, text[args_pos:], False))
                return
            value, end = decoded
            if not isinstance(value, dict):
                pieces.append(text[mark:])
                return
            pieces.append(CallScan(name_start, name, text[args_pos:end], True))
            pos = _skip_ws(text, end)
            if text.startswith(TOOL_CALLS, pos):
                mark, pos = pos, _skip_ws(text, pos + len(TOOL_CALLS))
                continue
            rest = text[end:]
            if not final:
                rest = split_partial_marker(rest, [TOOL_CALLS])[0]
            pieces.append(rest)
            return
