"""What every tool-call parser shares: the call and delta types, the `ToolParser` contract
and the streaming diff that turns repeated partial parses into OpenAI-shaped deltas.

A parser only says how its format reads: `parse(text, final)` splits the model's text into
text pieces and `CallScan`s. With ``final=False`` the text may still grow: the parser leaves
out a trailing piece that could become a call marker and reports an unfinished call with
what is known so far (its name once complete; a prefix of its arguments JSON). With
``final=True`` a call that does not parse is left in the text as it was written.
`extract` (non-streamed) and `ToolCallStream` (streamed) both build on it, so the deltas of a
stream assemble to what `extract` returns for the same text.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pagedllm.entrypoints.chat_utils import validate_tools
from pagedllm.utils import random_uuid


def make_tool_call_id() -> str:
    """An OpenAI-style tool call id (``call_`` + 24 hex digits)."""
    return f"call_{random_uuid()[:24]}"


@dataclass(frozen=True)
class ToolCall:
    """One complete call: `arguments` is the JSON text of an object."""

    name: str
    arguments: str
    id: str = field(default_factory=make_tool_call_id)

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ExtractedToolCalls:
    """A whole output split into the text outside calls (None when empty) and the calls."""

    content: str | None
    tool_calls: list[ToolCall]

    @property
    def tools_called(self) -> bool:
        return bool(self.tool_calls)


@dataclass(frozen=True)
class DeltaToolCall:
    """One entry of a stream chunk's ``delta.tool_calls``."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str | None = None

    def to_openai(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index}
        fn: dict[str, str] = {}
        if self.id is not None:
            out["id"] = self.id
            out["type"] = "function"
        if self.name is not None:
            fn["name"] = self.name
        if self.arguments is not None:
            fn["arguments"] = self.arguments
        out["function"] = fn
        return out


@dataclass(frozen=True)
class ToolCallDelta:
    """What one step of a stream adds: content text and/or tool-call entries."""

    content: str | None = None
    tool_calls: list[DeltaToolCall] = field(default_factory=list)


@dataclass(frozen=True)
class CallScan:
    """A call as far as the text shows it. `start` (its offset in the text) identifies it
    across partial parses; `arguments` only ever grows and is final once `done`."""

    start: int
    name: str | None
    arguments: str
    done: bool


Piece = str | CallScan


def json_object_text(value: Any) -> str:
    """The arguments text used when a format's arguments are not JSON as written."""
    if not isinstance(value, dict):
        raise ValueError("arguments must be an object")
    return "{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in value.items()) + "}"


def split_partial_marker(text: str, markers: Sequence[str]) -> tuple[str, str]:
    """(text, held): `held` is the longest suffix of `text` that starts some marker."""
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), best, -1):
            if marker.startswith(text[-n:]):
                best = n
                break
    return (text[:-best], text[-best:]) if best else (text, "")


def content_of(pieces: list[Piece], final: bool) -> str:
    """Text outside calls. Whitespace that touches a call is dropped (a model writes a
    newline around each call); while the text may still grow, trailing whitespace is held
    back, since a call may follow it."""
    merged: list[Piece] = []
    for piece in pieces:
        if isinstance(piece, str) and merged and isinstance(merged[-1], str):
            merged[-1] += piece
        elif piece != "":
            merged.append(piece)
    out = []
    for k, piece in enumerate(merged):
        if not isinstance(piece, str):
            continue
        if k > 0:
            piece = piece.lstrip()
        if k + 1 < len(merged) or not final:
            piece = piece.rstrip()
        out.append(piece)
    return "".join(out)


class ToolParser(ABC):
    """One tool-call format. Subclasses set `names` (the ``--tool-call-parser`` values) and
    implement `parse`; an instance serves one request (it may keep the request's tools)."""

    names: ClassVar[tuple[str, ...]] = ()
    # True when the format's markers are special tokens, so the output must be detokenized
    # with skip_special_tokens=False for the parser to see them.
    needs_special_tokens: ClassVar[bool] = False

    def __init__(self, tokenizer: Any = None, tools: list[dict[str, Any]] | None = None) -> None:
        self.tokenizer = tokenizer
        self.tools = validate_tools(tools) or []

    def new_call_id(self) -> str:
        """The id of a new call (a format whose templates check ids overrides this)."""
        return make_tool_call_id()

    def tool_schema(self, name: str) -> dict[str, Any] | None:
        """The `parameters` schema of the request's function `name`, if given."""
        for tool in self.tools:
            if tool["function"]["name"] == name:
                return tool["function"].get("parameters")
        return None

    @abstractmethod
    def parse(self, text: str, final: bool) -> list[Piece]:
        """The text split into text pieces and calls, in order (see the module doc)."""

    def extract(self, text: str) -> ExtractedToolCalls:
        """Non-streamed: the content outside calls and the complete calls."""
        pieces = self.parse(text, final=True)
        calls = [ToolCall(p.name, p.arguments, self.new_call_id()) for p in pieces
                 if isinstance(p, CallScan) and p.done and p.name is not None]
        return ExtractedToolCalls(content_of(pieces, final=True) or None, calls)

    def stream(self) -> ToolCallStream:
        """A per-choice incremental parser for streamed output."""
        return ToolCallStream(self)


class ToolCallStream:
    """Feed the text deltas of one choice; get OpenAI-shaped deltas back.

    Every step re-reads the whole text with `parse(text, final=False)` and sends what is new
    since the last step: content, a header for each newly named call (index, id, type,
    name, empty arguments) and the arguments text added to each call. `finish()` reads the
    text as final and sends what was held back.
    """

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self.text = ""
        self.content = ""
        # call start offset -> (index, id, arguments sent)
        self.sent: dict[int, tuple[int, str, str]] = {}

    @property
    def tools_called(self) -> bool:
        return bool(self.sent)

    def feed(self, delta_text: str, final: bool = False) -> ToolCallDelta | None:
        """Add text; with ``final=True`` the output is complete (held-back text is sent)."""
        self.text += delta_text
        return self._step(final)

    def finish(self) -> ToolCallDelta | None:
        return self._step(final=True)

    def _step(self, final: bool) -> ToolCallDelta | None:
        pieces = self.parser.parse(self.text, final)
        content = content_of(pieces, final)
        new_content = None
        if content.startswith(self.content) and len(content) > len(self.content):
            new_content = content[len(self.content):]
            self.content = content
        entries: list[DeltaToolCall] = []
        for piece in pieces:
            if not isinstance(piece, CallScan) or piece.name is None:
                continue
            if piece.start not in self.sent:
                index, call_id = len(self.sent), self.parser.new_call_id()
                self.sent[piece.start] = (index, call_id, "")
                entries.append(DeltaToolCall(index, call_id, piece.name, ""))
            index, call_id, args = self.sent[piece.start]
            if len(piece.arguments) > len(args) and piece.arguments.startswith(args):
                entries.append(DeltaToolCall(index, arguments=piece.arguments[len(args):]))
                self.sent[piece.start] = (index, call_id, piece.arguments)
        if new_content is None and not entries:
            return None
        return ToolCallDelta(new_content, entries)
