"""Pre-encoded SSE chunks for the common streamed token: text only, no logprobs.

A streamed request sends one chunk per engine step, and most of them carry nothing but a
piece of text (and, at the end, a finish reason). Building a pydantic response model and
dumping it for each of them costs more than the rest of the token's path; `ChunkEncoder`
renders the stream's fixed parts (id, object, created, model, the usage and fingerprint
tail) once and joins them with the JSON of the changing fields. The bytes are the same
as `streaming.sse()` gives for the same chunk (tests/test_sse_chunks.py holds them
equal); chunks with logprobs, tool calls, reasoning or continuous usage take `sse()`.
"""

from __future__ import annotations

import json

_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


class ChunkEncoder:
    """The SSE events of one streamed response whose chunks hold one choice each.

    `object_name` is "text_completion" or "chat.completion.chunk"; `include_usage` says
    whether the client asked for usage (each chunk then carries `"usage":null`).
    """

    def __init__(self, object_name: str, request_id: str, created: int, model: str,
                 include_usage: bool) -> None:
        self._head = (f'data: {{"id":{_encode(request_id)},"object":{_encode(object_name)},'
                      f'"created":{int(created)},"model":{_encode(model)},"choices":[{{"index":')
        usage = ',"usage":null' if include_usage else ""
        self._tail = f'}}]{usage},"system_fingerprint":null}}\n\n'

    def _end(self, finish_reason: str | None, stop_reason: int | str | None) -> str:
        if finish_reason is None and stop_reason is None:
            return '"logprobs":null,"finish_reason":null,"stop_reason":null' + self._tail
        return (f'"logprobs":null,"finish_reason":{_encode(finish_reason)},'
                f'"stop_reason":{_encode(stop_reason)}{self._tail}')

    def text(self, index: int, text: str, finish_reason: str | None = None,
             stop_reason: int | str | None = None) -> str:
        """A completions chunk: `{"index":i,"text":...,"logprobs":null,...}`."""
        return (f'{self._head}{index},"text":{_encode(text)},'
                f'{self._end(finish_reason, stop_reason)}')

    def content(self, index: int, content: str | None, finish_reason: str | None = None,
                stop_reason: int | str | None = None) -> str:
        """A chat chunk whose delta holds only `content` (None: an empty delta)."""
        delta = "{}" if content is None else f'{{"content":{_encode(content)}}}'
        return f'{self._head}{index},"delta":{delta},{self._end(finish_reason, stop_reason)}'
