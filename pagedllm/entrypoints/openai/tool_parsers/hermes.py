"""Hermes / Qwen2.5 / Qwen3 calls: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
one block per call, text allowed around them."""

from __future__ import annotations

from typing import Any

from pagedllm.entrypoints.openai.tool_parsers.base import Piece, ToolParser, split_partial_marker
from pagedllm.entrypoints.openai.tool_parsers.json_calls import (
    ContainerEnds,
    call_from_body,
    partial_call,
)


class DelimitedCallParser(ToolParser):
    """Calls written between a start and an end tag; subclasses read one call's body."""

    start_tag = "<tool_call>"
    end_tag = "</tool_call>"

    def read_body(self, body: str, start: int, complete: bool):
        """The call in `body`: complete (end tag seen, or final) or partial; a complete
        body that holds no valid call gives None."""
        raise NotImplementedError

    def parse(self, text: str, final: bool) -> list[Piece]:
        pieces: list[Piece] = []
        pos = 0
        while True:
            i = text.find(self.start_tag, pos)
            if i < 0:
                tail = text[pos:]
                pieces.append(tail if final else split_partial_marker(tail, [self.start_tag])[0])
                return pieces
            pieces.append(text[pos:i])
            body_start = i + len(self.start_tag)
            j = text.find(self.end_tag, body_start)
            if j < 0:
                if final:  # unclosed at the end: a call if the body is one, else text
                    call = self.read_body(text[body_start:], i, complete=True)
                    pieces.append(call if call is not None else text[i:])
                else:
                    body = text[body_start:]
                    held = split_partial_marker(body, [self.end_tag])[0]
                    pieces.append(self.read_body(held, i, complete=False))
                return pieces
            call = self.read_body(text[body_start:j], i, complete=True)
            end = j + len(self.end_tag)
            pieces.append(call if call is not None else text[i:end])
            pos = end


class HermesToolParser(DelimitedCallParser):
    names = ("hermes",)

    def __init__(self, tokenizer: Any = None, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tokenizer, tools)
        self._ends: dict[int, ContainerEnds] = {}  # per call start: its JSON read so far

    def read_body(self, body: str, start: int, complete: bool):
        ends = self._ends.setdefault(start, ContainerEnds())
        return call_from_body(body, start, ends) if complete else partial_call(body, start, ends)
