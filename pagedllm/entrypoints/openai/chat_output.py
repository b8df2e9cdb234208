"""A chat choice's output text -> reasoning, answer content and tool calls, whole or
streamed: the reasoning parser runs first, the tool parser reads the answer part only."""

from __future__ import annotations

from dataclasses import dataclass, field

from pagedllm.entrypoints.openai.reasoning.base import ReasoningParser
from pagedllm.entrypoints.openai.tool_parsers.base import (
    DeltaToolCall,
    ToolCall,
    ToolCallStream,
    ToolParser,
)


@dataclass(frozen=True)
class ParsedChatOutput:
    """`message` fields of a non-streamed choice."""

    content: str | None
    reasoning: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)

    def finish_reason(self, engine_reason: str | None) -> str | None:
        """``"tool_calls"`` when the model stopped after calling tools, else the engine's."""
        return "tool_calls" if self.tool_calls and engine_reason == "stop" else engine_reason


@dataclass(frozen=True)
class ChatOutputDelta:
    """`delta` fields of one stream chunk (tool_calls as OpenAI entries via to_openai())."""

    reasoning: str | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] = field(default_factory=list)


class ChatOutputParser:
    """The parsers of one request. `max_calls=1` is ``parallel_tool_calls=false``: calls
    after the first are dropped."""

    def __init__(self, reasoning: ReasoningParser | None = None,
                 tools: ToolParser | None = None, max_calls: int | None = None) -> None:
        if max_calls is not None and max_calls < 1:
            raise ValueError(f"max_calls must be >= 1 or None, got {max_calls}.")
        self.reasoning = reasoning
        self.tools = tools
        self.max_calls = max_calls

    @property
    def needs_special_tokens(self) -> bool:
        """Whether the output must be detokenized with skip_special_tokens=False."""
        return any(p is not None and p.needs_special_tokens for p in (self.reasoning, self.tools))

    def parse(self, text: str) -> ParsedChatOutput:
        reasoning, content = None, text
        if self.reasoning is not None:
            split = self.reasoning.extract(text)
            reasoning, content = split.reasoning, split.content or ""
        if self.tools is None:
            return ParsedChatOutput(content or None, reasoning)
        found = self.tools.extract(content)
        calls = found.tool_calls[:self.max_calls] if self.max_calls else found.tool_calls
        return ParsedChatOutput(found.content, reasoning, calls)

    def stream(self) -> ChatOutputStream:
        return ChatOutputStream(self)


class ChatOutputStream:
    """Feed one choice's text deltas; get `ChatOutputDelta`s (None when nothing is new)."""

    def __init__(self, parser: ChatOutputParser) -> None:
        self.parser = parser
        self.reasoning = parser.reasoning.stream() if parser.reasoning else None
        self.tools: ToolCallStream | None = parser.tools.stream() if parser.tools else None

    @property
    def tools_called(self) -> bool:
        return bool(self.tools and self.tools.tools_called)

    def finish(self) -> ChatOutputDelta | None:
        return self.feed("", final=True)

    def finish_reason(self, engine_reason: str | None) -> str | None:
        return "tool_calls" if self.tools_called and engine_reason == "stop" else engine_reason

    def feed(self, delta_text: str, final: bool = False) -> ChatOutputDelta | None:
        """Add text; with ``final=True`` (the choice finished) held-back text is sent too."""
        reasoning, content = None, delta_text
        if self.reasoning is not None:
            split = self.reasoning.feed(delta_text, final)
            reasoning, content = (split.reasoning, split.content) if split else (None, None)
        calls: list[DeltaToolCall] = []
        if self.tools is not None:
            found = self.tools.feed(content or "", final)
            content = found.content if found else None
            calls = found.tool_calls if found else []
            if self.parser.max_calls is not None:
                calls = [c for c in calls if c.index < self.parser.max_calls]
        if not (reasoning or content or calls):
            return None
        return ChatOutputDelta(reasoning, content or None, calls)
