"""Finding a tool-call parser by name: the parsers of this package, plus plugin files.

A format plugs in with one file: a module in this package (or a file given to
`--tool-parser-plugin`) that defines a `ToolParser` subclass with `names` set. Nothing is
registered globally; each `ToolParserRegistry` reads the package and its own plugins.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import pkgutil
import sys
from types import ModuleType

from pagedllm.entrypoints.openai.tool_parsers.base import ToolParser

_PACKAGE = "pagedllm.entrypoints.openai.tool_parsers"
_NOT_FORMATS = {"base", "registry", "json_calls"}


def parsers_in(module: ModuleType) -> dict[str, type[ToolParser]]:
    """name -> class for the named ToolParser subclasses defined in `module`."""
    found: dict[str, type[ToolParser]] = {}
    for _, cls in inspect.getmembers(module, inspect.isclass):
        if (issubclass(cls, ToolParser) and cls.__module__ == module.__name__
                and not inspect.isabstract(cls)):
            for name in cls.names:
                found[name] = cls
    return found


def builtin_tool_parsers() -> dict[str, type[ToolParser]]:
    """The parsers shipped in this package, by name."""
    package = importlib.import_module(_PACKAGE)
    found: dict[str, type[ToolParser]] = {}
    for info in pkgutil.iter_modules(package.__path__):
        if info.name not in _NOT_FORMATS:
            found.update(parsers_in(importlib.import_module(f"{_PACKAGE}.{info.name}")))
    return found


def load_tool_parser_plugin(path: str) -> dict[str, type[ToolParser]]:
    """Import the Python file `path` (``--tool-parser-plugin``) and return the parsers it
    defines, by name. ValueError when the file is missing, fails to import or defines none."""
    if not os.path.isfile(path):
        raise ValueError(f"--tool-parser-plugin {path!r}: no such file.")
    name = "pagedllm_tool_parser_plugin_" + \
        os.path.splitext(os.path.basename(path))[0].replace("-", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"--tool-parser-plugin {path!r}: not a Python file.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise ValueError(f"--tool-parser-plugin {path!r} failed to import: "
                         f"{type(e).__name__}: {e}") from e
    found = parsers_in(module)
    if not found:
        raise ValueError(f"--tool-parser-plugin {path!r} defines no ToolParser subclass with "
                         "`names` set (from pagedllm.entrypoints.openai.tool_parsers import "
                         "ToolParser).")
    return found


class ToolParserRegistry:
    """The parsers a server (or a script) can use: built-ins, then plugins (which may
    replace a built-in of the same name)."""

    def __init__(self, plugin_files: list[str] | tuple[str, ...] = ()) -> None:
        self.parsers = builtin_tool_parsers()
        for path in plugin_files:
            self.parsers.update(load_tool_parser_plugin(path))

    def names(self) -> list[str]:
        return sorted(self.parsers)

    def get(self, name: str) -> type[ToolParser]:
        """The parser class for ``--tool-call-parser name``; ValueError listing the names."""
        if name not in self.parsers:
            raise ValueError(f"--tool-call-parser {name!r} is unknown; use one of "
                             f"{', '.join(self.names())} (or load one with "
                             "--tool-parser-plugin FILE).")
        return self.parsers[name]
