"""Helpers for the output-parser tests: model text turned into the text deltas the engine
streams (real tokenizer, real incremental detokenizer), and OpenAI deltas assembled."""

from __future__ import annotations

import json
from typing import Any

from pagedllm.engine.detokenizer import IncrementalDetokenizer
from pagedllm.sampling_params import SamplingParams


def token_deltas(tokenizer: Any, text: str) -> list[str]:
    """`text` as the engine would stream it: tokenized, then detokenized one token at a
    time; the deltas join back to `text`."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(skip_special_tokens=False))
    deltas = []
    for i, token_id in enumerate(ids):
        detok.add_token(token_id)
        piece = detok.new_text(finished=i == len(ids) - 1)
        if piece:
            deltas.append(piece)
    assert "".join(deltas) == text
    assert len(deltas) > 1
    return deltas


def assemble_tool_stream(deltas: list[Any]) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, calls) from ToolCallDelta / ChatOutputDelta objects, the way an OpenAI
    client joins stream chunks; checks each call's first entry is its header."""
    content = ""
    calls: dict[int, dict[str, Any]] = {}
    for delta in deltas:
        if delta is None:
            continue
        content += delta.content or ""
        for entry in delta.tool_calls:
            item = entry.to_openai()
            if entry.index not in calls:
                assert entry.index == len(calls)  # indices count up from 0
                assert item["id"] and item["type"] == "function"
                assert item["function"]["name"] and item["function"]["arguments"] == ""
                calls[entry.index] = {"id": item["id"], "name": item["function"]["name"],
                                      "arguments": ""}
            else:
                assert "id" not in item and "name" not in item["function"]
                calls[entry.index]["arguments"] += item["function"]["arguments"]
    return content or None, [calls[i] for i in sorted(calls)]


def calls_of(extracted: Any) -> list[tuple[str, str]]:
    return [(c.name, c.arguments) for c in extracted.tool_calls]


def args_json(calls: list[tuple[str, str]]) -> list[tuple[str, Any]]:
    """The calls with their arguments decoded (each must be a JSON object)."""
    out = []
    for name, args in calls:
        value = json.loads(args)
        assert isinstance(value, dict)
        out.append((name, value))
    return out
