"""Finding output parsers (tool-call, reasoning) by name: a package's parsers, plus plugin
files.

A format plugs in with one file: a module in the parser package (or a plugin file given on
the command line) that defines a subclass of the package's base class with `names` set.
Nothing is registered globally; each registry reads its package and its own plugins.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import pkgutil
import sys
from types import ModuleType
from typing import Generic, TypeVar

T = TypeVar("T")


def parsers_in(module: ModuleType, base: type[T]) -> dict[str, type[T]]:
    """name -> class for the concrete `base` subclasses with `names` defined in `module`."""
    found: dict[str, type[T]] = {}
    for _, cls in inspect.getmembers(module, inspect.isclass):
        if (issubclass(cls, base) and cls.__module__ == module.__name__
                and not inspect.isabstract(cls)):
            for name in getattr(cls, "names", ()):
                found[name] = cls
    return found


def load_plugin_file(path: str, base: type[T], flag: str) -> dict[str, type[T]]:
    """Import the Python file `path` and return the `base` parsers it defines, by name.
    ValueError (naming `flag`) when the file is missing, fails to import or defines none."""
    if not os.path.isfile(path):
        raise ValueError(f"{flag} {path!r}: no such file.")
    stem = os.path.splitext(os.path.basename(path))[0]
    name = "pagedllm_plugin_" + "".join(c if c.isalnum() else "_" for c in stem)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"{flag} {path!r}: not a Python file.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise ValueError(f"{flag} {path!r} failed to import: {type(e).__name__}: {e}") from e
    found = parsers_in(module, base)
    if not found:
        raise ValueError(f"{flag} {path!r} defines no {base.__name__} subclass with `names` "
                         f"set (from {base.__module__} import {base.__name__}).")
    return found


class ParserRegistry(Generic[T]):
    """The parsers of one kind: those of `package`, then plugins (a plugin may replace a
    built-in of the same name)."""

    base: type[T]
    package: str
    flag: str  # the command-line flag that picks one, for messages
    plugin_flag: str
    helpers: frozenset[str] = frozenset({"base"})  # package modules that hold no format

    def __init__(self, plugin_files: list[str] | tuple[str, ...] = ()) -> None:
        package = importlib.import_module(self.package)
        self.parsers: dict[str, type[T]] = {}
        for info in pkgutil.iter_modules(package.__path__):
            if info.name not in self.helpers:
                module = importlib.import_module(f"{self.package}.{info.name}")
                self.parsers.update(parsers_in(module, self.base))
        for path in plugin_files:
            self.parsers.update(load_plugin_file(path, self.base, self.plugin_flag))

    def names(self) -> list[str]:
        return sorted(self.parsers)

    def get(self, name: str) -> type[T]:
        """The parser class called `name`; ValueError listing the known names."""
        if name not in self.parsers:
            raise ValueError(f"{self.flag} {name!r} is unknown; use one of "
                             f"{', '.join(self.names())} (or load one with "
                             f"{self.plugin_flag} FILE).")
        return self.parsers[name]
