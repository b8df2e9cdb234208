"""Reasoning parsers (qwen3, deepseek_r1, gpt_oss) on scripted model text, whole and
streamed token by token, and the combined chat output parser (reasoning, then tool calls in
the answer only), including a stream assembled by the official openai client's helper."""

from __future__ import annotations

import json

import pytest
from parser_utils import assemble_tool_stream, token_deltas

from pagedllm.entrypoints.openai.chat_output import ChatOutputParser
from pagedllm.entrypoints.openai.reasoning import ReasoningParserRegistry
from pagedllm.entrypoints.openai.tool_parsers import ToolParserRegistry

THOUGHT = "The user wants 2 + 2.\nThat is 4; no tool needed."
ANSWER = "2 + 2 = 4."
QWEN3_PROMPT = "<|im_start|>assistant\n"
THINKING_PROMPT = "<|im_start|>assistant\n<think>\n"  # templates that open the block
NO_THINK_PROMPT = "<|im_start|>assistant\n<think>\n\n</think>\n\n"  # enable_thinking=False

# (parser, prompt, model output, expected reasoning, expected content)
CASES = {
    "qwen3_closed": ("qwen3", QWEN3_PROMPT, f"<think>\n{THOUGHT}\n</think>\n\n{ANSWER}",
                     THOUGHT, ANSWER),
    "qwen3_unclosed_at_max_tokens": ("qwen3", QWEN3_PROMPT, f"<think>\n{THOUGHT}", THOUGHT,
                                     None),
    "qwen3_no_think": ("qwen3", QWEN3_PROMPT, ANSWER, None, ANSWER),
    "qwen3_block_opened_by_template": ("qwen3", THINKING_PROMPT,
                                       f"{THOUGHT}\n</think>\n\n{ANSWER}", THOUGHT, ANSWER),
    "qwen3_thinking_off": ("qwen3", NO_THINK_PROMPT, f"{ANSWER} </think> is a tag.",
                           None, f"{ANSWER} </think> is a tag."),
    "qwen3_empty_block": ("qwen3", QWEN3_PROMPT, f"<think>\n\n</think>\n\n{ANSWER}", None,
                          ANSWER),
    "deepseek_r1_closed": ("deepseek_r1", None, f"<think>\n{THOUGHT}\n</think>\n\n{ANSWER}",
                           THOUGHT, ANSWER),
    "deepseek_r1_without_open_tag": ("deepseek_r1", None, f"{THOUGHT}\n</think>{ANSWER}",
                                     THOUGHT, ANSWER),
    "deepseek_r1_unclosed_at_max_tokens": ("deepseek_r1", None, THOUGHT, THOUGHT, None),
    "gpt_oss": ("gpt_oss", None,
                f"<|channel|>analysis<|message|>{THOUGHT}<|end|><|start|>assistant"
                f"<|channel|>final<|message|>{ANSWER}<|return|>", THOUGHT, ANSWER),
    "gpt_oss_unclosed_at_max_tokens": ("gpt_oss", None,
                                       f"<|channel|>analysis<|message|>{THOUGHT}", THOUGHT,
                                       None),
    "gpt_oss_plain": ("gpt_oss", None, ANSWER, None, ANSWER),
}


@pytest.fixture(scope="module")
def registry() -> ReasoningParserRegistry:
    return ReasoningParserRegistry()


def _streamed(parser, tokenizer, text: str) -> tuple[str | None, str | None]:
    stream = parser.stream()
    deltas = [stream.feed(piece) for piece in token_deltas(tokenizer, text)]
    deltas.append(stream.finish())
    reasoning = "".join(d.reasoning or "" for d in deltas if d)
    content = "".join(d.content or "" for d in deltas if d)
    return reasoning or None, content or None


@pytest.mark.parametrize("case", sorted(CASES))
def test_reasoning_split_whole_and_streamed(registry, smollm2_tokenizer, case):
    name, prompt, text, reasoning, content = CASES[case]
    found = registry.get(name)(None, prompt).extract(text)
    assert (found.reasoning, found.content) == (reasoning, content)
    assert _streamed(registry.get(name)(None, prompt), smollm2_tokenizer, text) == \
        (reasoning, content)


def test_reasoning_streams_before_the_block_closes(registry, smollm2_tokenizer):
    stream = registry.get("qwen3")().stream()
    text = f"<think>\n{THOUGHT}\n</think>\n\n{ANSWER}"
    seen = []
    for piece in token_deltas(smollm2_tokenizer, text):
        delta = stream.feed(piece)
        if delta and delta.reasoning:
            seen.append(delta.reasoning)
            assert delta.content is None
    assert len(seen) > 5 and "".join(seen) == THOUGHT


def test_unknown_reasoning_parser_lists_the_names(registry):
    with pytest.raises(ValueError, match="--reasoning-parser 'r2' is unknown.*deepseek_r1"):
        registry.get("r2")


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]


def _chat_parser(max_calls: int | None = None) -> ChatOutputParser:
    return ChatOutputParser(ReasoningParserRegistry().get("qwen3")(None, QWEN3_PROMPT),
                            ToolParserRegistry().get("hermes")(None, TOOLS), max_calls)


def test_tools_are_parsed_in_the_answer_only(smollm2_tokenizer):
    # A call the model drafts while thinking is reasoning, not a call.
    text = f"<think>\nMaybe {CALL}?\n</think>\n\nChecking.\n{CALL}\n{CALL}"
    parsed = _chat_parser().parse(text)
    assert parsed.reasoning == f"Maybe {CALL}?"
    assert parsed.content == "Checking."
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == \
        [("get_weather", '{"city": "Paris"}')] * 2
    assert parsed.finish_reason("stop") == "tool_calls"
    assert parsed.finish_reason("length") == "length"
    assert _chat_parser(max_calls=1).parse(text).tool_calls[0].name == "get_weather"
    assert len(_chat_parser(max_calls=1).parse(text).tool_calls) == 1

    stream = _chat_parser().stream()
    deltas = [stream.feed(p) for p in token_deltas(smollm2_tokenizer, text)]
    deltas.append(stream.finish())
    assert "".join(d.reasoning or "" for d in deltas if d) == parsed.reasoning
    content, calls = assemble_tool_stream(deltas)
    assert content == parsed.content
    assert [(c["name"], c["arguments"]) for c in calls] == \
        [(c.name, c.arguments) for c in parsed.tool_calls]
    assert stream.finish_reason("stop") == "tool_calls"

    single = _chat_parser(max_calls=1).stream()
    deltas = [single.feed(p) for p in token_deltas(smollm2_tokenizer, text)]
    assert len(assemble_tool_stream(deltas)[1]) == 1


def test_openai_client_assembles_the_stream(smollm2_tokenizer):
    openai_chat = pytest.importorskip("openai.lib.streaming.chat")
    from openai.types.chat import ChatCompletionChunk

    text = f"<think>\nPlan.\n</think>\n\nOne moment.\n{CALL}\n{CALL.replace('Paris', 'Rome')}"
    state = openai_chat.ChatCompletionStreamState()
    stream = _chat_parser().stream()
    pieces = token_deltas(smollm2_tokenizer, text)
    for k, piece in enumerate(pieces + [None]):
        delta = stream.feed(piece) if piece is not None else stream.finish()
        last = piece is None
        if delta is None and not last:
            continue
        body = {"role": "assistant"} if k == 0 else {}
        if delta is not None:
            body.update({"content": delta.content, "reasoning_content": delta.reasoning,
                         "tool_calls": [c.to_openai() for c in delta.tool_calls] or None})
        state.handle_chunk(ChatCompletionChunk.model_validate({
            "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [{"index": 0, "delta": body,
                         "finish_reason": stream.finish_reason("stop") if last else None}]}))
    choice = state.get_final_completion().choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "One moment."
    assert [(c.function.name, json.loads(c.function.arguments))
            for c in choice.message.tool_calls] == \
        [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]
    assert all(c.id.startswith("call_") and c.type == "function"
               for c in choice.message.tool_calls)


def test_reasoning_plugin_file(tmp_path):
    plugin = tmp_path / "my_reasoning.py"
    plugin.write_text(
        "from pagedllm.entrypoints.openai.reasoning.think import ThinkReasoningParser\n"
        "class Scratch(ThinkReasoningParser):\n"
        "    names = ('scratch',)\n"
        "    start, end = '<scratch>', '</scratch>'\n")
    registry = ReasoningParserRegistry([str(plugin)])
    found = registry.get("scratch")().extract("<scratch>hmm</scratch>yes")
    assert (found.reasoning, found.content) == ("hmm", "yes")
    assert "qwen3" in registry.names()
