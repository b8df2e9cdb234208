"""Pythonic calls (Llama 3.2 / 4 and others): a Python list of calls with keyword
arguments, ``[get_weather(city="Paris"), get_time(tz="UTC")]``, starting a line. Values are
Python literals; the arguments are sent as JSON, one keyword argument at a time."""

from __future__ import annotations

import ast
import json
import re

from pagedllm.entrypoints.openai.tool_parsers.base import CallScan, Piece, ToolParser

_LINE_BRACKET = re.compile(r"(?m)^[ \t]*\[")
_CALL_OPEN = re.compile(r"\s*([A-Za-z_][\w.]*)\s*\(")
_MAYBE_CALL = re.compile(r"\s*([A-Za-z_][\w.]*\s*)?")
_KEYWORD = re.compile(r"([A-Za-z_]\w*)\s*=")
_MAYBE_KEYWORD = re.compile(r"[A-Za-z_]\w*\s*")
_OPEN, _CLOSE = "([{", ")]}"
_WS = " \t\n\r"


class _Broken(Exception):
    """The text is not a pythonic call list."""


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WS:
        pos += 1
    return pos


def _value_end(text: str, pos: int) -> int | None:
    """Index of the ``,`` or ``)`` that ends the argument value at `pos` (None: the text
    ends first)."""
    depth, quote = 0, ""
    i = pos
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\":
                i += 2
                continue
            if text.startswith(quote, i):
                i += len(quote)
                quote = ""
                continue
        elif c in "'\"":
            quote = c * 3 if text.startswith(c * 3, i) else c
            i += len(quote)
            continue
        elif c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            if depth == 0:
                if c == ")":
                    return i
                raise _Broken
            depth -= 1
        elif c == "," and depth == 0:
            return i
        i += 1
    return None


def _literal(source: str) -> str:
    try:
        return json.dumps(ast.literal_eval(source.strip()))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
        raise _Broken from e


class PythonicToolParser(ToolParser):
    names = ("pythonic",)

    def parse(self, text: str, final: bool) -> list[Piece]:
        for m in _LINE_BRACKET.finditer(text):
            start = m.end() - 1
            if _CALL_OPEN.match(text, start + 1):
                break
            if not final and _MAYBE_CALL.fullmatch(text, start + 1):
                return [text[:start]]  # undecided: wait for more text
        else:
            return [text]
        pieces: list[Piece] = [text[:start]]
        try:
            calls, end = self._read_list(text, start + 1, final)
        except _Broken:
            pieces.append(text[start:])
            return pieces
        pieces.extend(calls)
        if end is not None:
            pieces.append(text[end:])
        elif final:
            return [text[:start], text[start:]]  # the list never closed
        return pieces

    def _read_list(self, text: str, pos: int, final: bool) -> tuple[list[Piece], int | None]:
        calls: list[Piece] = []
        while True:
            pos = _skip_ws(text, pos)
            if pos >= len(text):
                return calls, None
            if text[pos] == "]":
                return calls, pos + 1
            if text[pos] == "," and calls:
                pos += 1
                continue
            opened = _CALL_OPEN.match(text, pos)
            if opened is None:
                if _MAYBE_CALL.fullmatch(text, pos):
                    return calls, None
                raise _Broken
            call, pos = self._read_call(text, opened.start(1), opened.group(1), opened.end())
            calls.append(call)
            if not call.done:
                return calls, None

    def _read_call(self, text: str, start: int, name: str, pos: int) -> tuple[CallScan, int]:
        items: list[str] = []
        while True:
            pos = _skip_ws(text, pos)
            if pos >= len(text):
                break
            if text[pos] == ")":
                return CallScan(start, name, "{" + ", ".join(items) + "}", True), pos + 1
            if text[pos] == "," and items:
                pos += 1
                continue
            keyword = _KEYWORD.match(text, pos)
            if keyword is None:
                if _MAYBE_KEYWORD.fullmatch(text, pos):
                    break
                raise _Broken  # a positional argument, or not Python
            end = _value_end(text, keyword.end())
            if end is None:
                break
            items.append(f"{json.dumps(keyword.group(1))}: {_literal(text[keyword.end():end])}")
            pos = end
        return CallScan(start, name, "{" + ", ".join(items), False), len(text)
