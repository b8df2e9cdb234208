"""The tool-call parsers by name (``--tool-call-parser``), plugins from
``--tool-parser-plugin FILE``."""

from __future__ import annotations

from pagedllm.entrypoints.openai.parser_registry import ParserRegistry, load_plugin_file
from pagedllm.entrypoints.openai.tool_parsers.base import ToolParser


class ToolParserRegistry(ParserRegistry[ToolParser]):
    base = ToolParser
    package = "pagedllm.entrypoints.openai.tool_parsers"
    flag = "--tool-call-parser"
    plugin_flag = "--tool-parser-plugin"
    helpers = frozenset({"base", "registry", "json_calls"})


def load_tool_parser_plugin(path: str) -> dict[str, type[ToolParser]]:
    """Import the user's parser file (``--tool-parser-plugin FILE``): its ToolParser
    subclasses by name. ValueError when the file is missing, broken or defines none."""
    return load_plugin_file(path, ToolParser, ToolParserRegistry.plugin_flag)
