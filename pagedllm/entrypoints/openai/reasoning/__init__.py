"""Reasoning parsers: the thinking part of a model's output kept apart from the answer.

``ReasoningParserRegistry(plugin_files).get("qwen3")(tokenizer, prompt)`` gives a parser for
one request; `extract(text)` splits a finished output, `stream()` a streamed one.
"""

from pagedllm.entrypoints.openai.parser_registry import ParserRegistry
from pagedllm.entrypoints.openai.reasoning.base import (
    ExtractedReasoning,
    ReasoningDelta,
    ReasoningParser,
    ReasoningStream,
)


class ReasoningParserRegistry(ParserRegistry[ReasoningParser]):
    base = ReasoningParser
    package = "pagedllm.entrypoints.openai.reasoning"
    flag = "--reasoning-parser"
    plugin_flag = "--reasoning-parser-plugin"


__all__ = ["ExtractedReasoning", "ReasoningDelta", "ReasoningParser",
           "ReasoningParserRegistry", "ReasoningStream"]
