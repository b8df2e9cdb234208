"""Reading `{"name": ..., "arguments": {...}}` call objects, whole or still being written.

Shared by the JSON formats (hermes, llama3_json, mistral). The arguments text is kept as the
model wrote it (it is valid JSON once the object parses), so a stream can send it as it
arrives and still end with exactly what the non-streamed parse returns. Arguments written
as a JSON string holding an object are unwrapped once complete.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pagedllm.entrypoints.openai.tool_parsers.base import CallScan

_DECODER = json.JSONDecoder()
_WS = " \t\n\r"
ARGUMENT_KEYS = ("arguments", "parameters")


@dataclass(frozen=True)
class ObjectScan:
    """A call object read from `text[start:]`: `end` is set once the object is complete."""

    name: str | None
    arguments: str
    arguments_done: bool
    end: int | None


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WS:
        pos += 1
    return pos


def _decode(text: str, pos: int) -> tuple[object, int] | None:
    try:
        return _DECODER.raw_decode(text, pos)
    except json.JSONDecodeError:
        return None


class ContainerEnds:
    """Where JSON objects / arrays of a growing text close, each character read once.

    A stream re-reads its whole text every step; asking raw_decode whether a long object is
    complete would re-scan it each time. This remembers, per start offset, how far the text
    was read (checked to be unchanged) and the bracket depth there.
    """

    def __init__(self) -> None:
        # start -> [text read so far, depth, in a string, after a backslash, end or -1]
        self._seen: dict[int, list] = {}

    def end(self, text: str, start: int) -> int | None:
        """Index just past the container opened at `text[start]`; None while it is open."""
        state = self._seen.get(start)
        if state is None or not text.startswith(state[0], start):
            state = self._seen[start] = ["", 0, False, False, -1]
        if state[4] >= 0:
            return state[4]
        read, depth, in_string, escaped = state[0], state[1], state[2], state[3]
        i = start + len(read)
        while i < len(text):
            c = text[i]
            i += 1
            if in_string:
                if escaped:
                    escaped = False
                elif c == "\\":
                    escaped = True
                elif c == '"':
                    in_string = False
            elif c == '"':
                in_string = True
            elif c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    state[4] = i
                    break
        state[0], state[1], state[2], state[3] = text[start:i], depth, in_string, escaped
        return state[4] if state[4] >= 0 else None


def decode_container(text: str, pos: int, ends: ContainerEnds | None):
    """raw_decode of the object / array at `pos`, tried only once it has closed."""
    if ends is not None and text[pos] in "{[" and ends.end(text, pos) is None:
        return None
    return _decode(text, pos)


def _arguments_text(value: object, raw: str) -> str | None:
    """The arguments as JSON object text, or None when they are not an object."""
    if isinstance(value, dict):
        return raw
    if isinstance(value, str):
        try:
            inner = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError:
            return None
        return json.dumps(inner) if isinstance(inner, dict) else None
    return None


def scan_object(text: str, start: int, ends: ContainerEnds | None = None) -> ObjectScan | None:
    """Read the call object at `text[start]` (a ``{``) as far as the text goes.

    Returns None when what is there cannot be a call object (not an object, a name that is
    not a string, arguments that are not an object); a complete object has `end` set.
    `ends` (kept by the parser across a stream's steps) saves re-reading long objects.
    """
    whole = decode_container(text, start, ends)
    if whole is not None:
        value, end = whole
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            return None
    name: str | None = None
    args, args_done = "", False
    pos = start + 1
    while True:
        pos = _skip_ws(text, pos)
        if pos >= len(text) or text[pos] != '"':
            break
        key_end = _decode(text, pos)
        if key_end is None:
            break
        key, pos = key_end
        pos = _skip_ws(text, pos)
        if pos >= len(text) or text[pos] != ":":
            break
        pos = _skip_ws(text, pos + 1)
        if pos >= len(text):
            break
        is_args = key in ARGUMENT_KEYS and not args_done
        item = decode_container(text, pos, ends) if is_args else _decode(text, pos)
        if is_args:
            if item is None:
                if text[pos] != '"':  # an object still being written: send what is there
                    args = text[pos:]
                break
            args_text = _arguments_text(item[0], text[pos:item[1]])
            if args_text is None:
                return None
            args, args_done = args_text, True
        elif item is None:
            break
        elif key == "name" and name is None:
            if not isinstance(item[0], str):
                return None
            name = item[0]
        pos = _skip_ws(text, item[1])
        if pos < len(text) and text[pos] == ",":
            pos += 1
    if whole is None:
        return ObjectScan(name, args, args_done, None)
    if not args_done:
        args, args_done = "{}", True
    return ObjectScan(name, args, args_done, whole[1])


def call_from_body(body: str, start: int,
                   ends: ContainerEnds | None = None) -> CallScan | None:
    """A complete call from text that should hold exactly one call object (a delimited
    body); None when it does not."""
    lead = _skip_ws(body, 0)
    if lead >= len(body) or body[lead] != "{":
        return None
    scan = scan_object(body, lead, ends)
    if scan is None or scan.end is None or _skip_ws(body, scan.end) != len(body):
        return None
    return CallScan(start, scan.name, scan.arguments, True)


def partial_call(body: str, start: int, ends: ContainerEnds | None = None) -> CallScan:
    """A call whose object is still being written (name known once complete)."""
    lead = _skip_ws(body, 0)
    if lead >= len(body) or body[lead] != "{":
        return CallScan(start, None, "", False)
    scan = scan_object(body, lead, ends)
    if scan is None:
        return CallScan(start, None, "", False)
    return CallScan(start, scan.name, scan.arguments, False)


def read_call_list(text: str, mark: int, pos: int, final: bool, pieces: list,
                   ends: ContainerEnds | None = None) -> None:
    """Append the calls of the JSON list at `text[pos]` (a ``[``) to `pieces`. A part that
    is no call object stays text (from `mark`, where the calls began, when no call came
    before it); a list cut after whole calls keeps them."""
    calls: list = []
    pos += 1
    while True:
        pos = _skip_ws(text, pos)
        if pos >= len(text):
            if final and not calls:
                pieces.append(text[mark:])
            else:
                pieces.extend(calls)
            return
        if text[pos] == "]":
            pieces.extend(calls)
            pieces.append(text[pos + 1:])
            return
        if text[pos] == ",":
            pos += 1
            continue
        scan = scan_object(text, pos, ends) if text[pos] == "{" else None
        if scan is None or (scan.end is None and final):
            pieces.extend(calls)
            pieces.append(text[pos:] if calls else text[mark:])
            return
        if scan.end is None:
            pieces.extend(calls)
            pieces.append(CallScan(pos, scan.name, scan.arguments, False))
            return
        calls.append(CallScan(pos, scan.name, scan.arguments, True))
        pos = scan.end
