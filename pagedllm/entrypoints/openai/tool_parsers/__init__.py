"""Tool-call parsers: model output text -> OpenAI `tool_calls`, whole or streamed.

``ToolParserRegistry(plugin_files).get("hermes")(tokenizer, tools)`` gives a parser for one
request; `extract(text)` splits a finished output, `stream()` a streamed one.
"""

from pagedllm.entrypoints.openai.tool_parsers.base import (
    CallScan,
    DeltaToolCall,
    ExtractedToolCalls,
    Piece,
    ToolCall,
    ToolCallDelta,
    ToolCallStream,
    ToolParser,
    make_tool_call_id,
)
from pagedllm.entrypoints.openai.tool_parsers.registry import (
    ToolParserRegistry,
    load_tool_parser_plugin,
)

__all__ = [
    "CallScan", "DeltaToolCall", "ExtractedToolCalls", "Piece", "ToolCall", "ToolCallDelta",
    "ToolCallStream", "ToolParser", "ToolParserRegistry", "load_tool_parser_plugin",
    "make_tool_call_id",
]
