"""The pre-encoded SSE chunks equal what the pydantic response models dump."""

from __future__ import annotations

import json

import pytest

from pagedllm.entrypoints.openai.protocol import (
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    CompletionResponseStreamChoice,
    CompletionStreamResponse,
    DeltaMessage,
)
from pagedllm.entrypoints.openai.sse_chunks import ChunkEncoder
from pagedllm.entrypoints.openai.streaming import sse

TEXTS = ["", "hello", ' "quoted" \\ back', "line\nbreak\ttab\x00\x1f", "é中文🙂", "\u2028\u2029"]
ENDS = [(None, None), ("length", None), ("stop", "###"), ("stop", 7), ("abort", None)]
IDS = [("cmpl-abc", "m"), ('weird"id\u00e9', "org/model\\x")]


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("request_id,model", IDS)
def test_completion_chunks_equal_the_model_dump(include_usage: bool, request_id: str,
                                                model: str) -> None:
    enc = ChunkEncoder("text_completion", request_id, 1700000000, model, include_usage)
    for text in TEXTS:
        for finish_reason, stop_reason in ENDS:
            for index in (0, 3):
                want = sse(CompletionStreamResponse(
                    id=request_id, created=1700000000, model=model,
                    choices=[CompletionResponseStreamChoice(
                        index=index, text=text, finish_reason=finish_reason,
                        stop_reason=stop_reason)]), include_usage)
                got = enc.text(index, text, finish_reason=finish_reason,
                               stop_reason=stop_reason)
                assert got == want
    assert json.loads(got[len("data: "):])["choices"][0]["index"] == 3


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("request_id,model", IDS)
def test_chat_chunks_equal_the_model_dump(include_usage: bool, request_id: str,
                                          model: str) -> None:
    enc = ChunkEncoder("chat.completion.chunk", request_id, 1700000001, model, include_usage)
    for content in [None, *TEXTS]:
        for finish_reason, stop_reason in ENDS:
            want = sse(ChatCompletionStreamResponse(
                id=request_id, created=1700000001, model=model,
                choices=[ChatCompletionResponseStreamChoice(
                    index=1, delta=DeltaMessage(content=content), finish_reason=finish_reason,
                    stop_reason=stop_reason)]), include_usage)
            assert enc.content(1, content, finish_reason, stop_reason) == want
