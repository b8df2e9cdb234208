"""The one chat renderer: tools, assistant tool_calls and tool messages through a
Hermes-style template for SmolLM2, chat_template_kwargs, text parts, and bad input refused
with the field named (ValueError offline, 400 with `param` on the server)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pagedllm.entrypoints.chat_utils import ChatInputError, render_chat

TEMPLATE = (Path(__file__).parent / "data" / "smollm2_hermes_tools.jinja").read_text()
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
EXCHANGE = [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
    {"role": "tool", "tool_call_id": "call_2", "content": '{"temp_c": 25}'},
]


def _text(tok, messages, **kw) -> str:
    return render_chat(tok, messages, chat_template=kw.pop("chat_template", TEMPLATE),
                       tokenize=False, **kw)


def test_without_tools_the_template_matches_smollm2s_own(smollm2_tokenizer):
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"}]
    for messages in (conv, [{"role": "system", "content": "Be brief."}] + conv):
        assert _text(smollm2_tokenizer, messages) == \
            _text(smollm2_tokenizer, messages, chat_template=None)


def test_tools_calls_and_results_render_in_hermes_style(smollm2_tokenizer):
    text = _text(smollm2_tokenizer, EXCHANGE, tools=TOOLS)
    assert "<tools>\n" + json.dumps(TOOLS[0]["function"]) + "\n</tools>" in text
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Paris"}}\n</tool_call>\n<tool_call>\n{"name": "get_weather", '
            '"arguments": {"city": "Rome"}}\n</tool_call><|im_end|>\n') in text
    assert ('<|im_start|>user\n<tool_response>\n{"temp_c": 21}\n</tool_response>\n'
            '<tool_response>\n{"temp_c": 25}\n</tool_response><|im_end|>\n'
            '<|im_start|>assistant\n') in text
    ids = render_chat(smollm2_tokenizer, EXCHANGE, chat_template=TEMPLATE, tools=TOOLS)
    assert smollm2_tokenizer.decode(ids) == text


def test_server_message_models_render_like_dicts(smollm2_tokenizer):
    from pagedllm.entrypoints.openai.chat_utils import render_chat as server_render
    from pagedllm.entrypoints.openai.protocol import ChatMessage

    models = [ChatMessage.model_validate(m) for m in EXCHANGE]
    assert server_render(smollm2_tokenizer, models, chat_template=TEMPLATE,
                         add_generation_prompt=True, continue_final_message=False,
                         tools=TOOLS) == _text(smollm2_tokenizer, EXCHANGE, tools=TOOLS)


def test_text_parts_are_joined_by_newlines(smollm2_tokenizer):
    parts = [{"role": "user", "content": [{"type": "text", "text": "one"},
                                          {"type": "input_text", "text": "two"}]}]
    assert "<|im_start|>user\none\ntwo<|im_end|>" in _text(smollm2_tokenizer, parts)


def test_chat_template_kwargs_reach_the_template(smollm2_tokenizer):
    template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                "{% if enable_thinking is defined and not enable_thinking %}/no_think"
                "{% endif %}")
    msgs = [{"role": "user", "content": "Hi"}]
    assert _text(smollm2_tokenizer, msgs, chat_template=template) == "Hi"
    assert _text(smollm2_tokenizer, msgs, chat_template=template,
                 chat_template_kwargs={"enable_thinking": False}) == "Hi/no_think"


BAD = [
    ({"tools": {"name": "f"}}, EXCHANGE[:1], "tools"),
    ({"tools": ["get_weather"]}, EXCHANGE[:1], "tools.0"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, EXCHANGE[:1],
     "tools.0.type"),
    ({"tools": [{"type": "function"}]}, EXCHANGE[:1], "tools.0.function"),
    ({"tools": [{"type": "function", "function": {"name": ""}}]}, EXCHANGE[:1],
     "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
     EXCHANGE[:1], "tools.0.function.parameters"),
    ({"tools": TOOLS + TOOLS}, EXCHANGE[:1], "tools"),
    ({}, EXCHANGE[:2] + [{"role": "tool", "content": "21"}], "messages.2.tool_call_id"),
    ({}, [EXCHANGE[0], {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}],
     "messages.1.tool_calls.0.function.arguments"),
    ({}, [EXCHANGE[0], {"role": "assistant", "tool_calls": [{"id": "c"}]}],
     "messages.1.tool_calls.0.function"),
    ({}, [{"role": "user", "content": "x", "tool_calls": []}], "messages.0.tool_calls"),
    ({}, [{"role": "robot", "content": "x"}], "messages.0.role"),
    ({}, [], "messages"),
    ({"chat_template_kwargs": {"tools": []}}, EXCHANGE[:1], "chat_template_kwargs.tools"),
    ({"chat_template_kwargs": ["enable_thinking"]}, EXCHANGE[:1], "chat_template_kwargs"),
    ({"continue_final_message": True, "add_generation_prompt": False}, EXCHANGE[:1],
     "continue_final_message"),
    ({"chat_template": "{{ raise_exception('no system role') }}"}, EXCHANGE[:1], "messages"),
]


@pytest.mark.parametrize(("kwargs", "messages", "param"), BAD, ids=[b[2] for b in BAD])
def test_bad_input_names_the_field(smollm2_tokenizer, kwargs, messages, param):
    with pytest.raises(ChatInputError) as info:
        _text(smollm2_tokenizer, messages, **kwargs)
    assert info.value.param == param
    assert isinstance(info.value, ValueError)


def test_server_renderer_turns_bad_input_into_a_400_with_param(smollm2_tokenizer):
    from pagedllm.entrypoints.openai.chat_utils import render_chat as server_render
    from pagedllm.entrypoints.openai.errors import BadRequestError
    from pagedllm.entrypoints.openai.protocol import ChatMessage

    models = [ChatMessage.model_validate(m) for m in EXCHANGE[:2]]
    models.append(ChatMessage(role="tool", content="21"))
    with pytest.raises(BadRequestError) as info:
        server_render(smollm2_tokenizer, models, chat_template=TEMPLATE,
                      add_generation_prompt=True, continue_final_message=False)
    assert info.value.status_code == 400 and info.value.param == "messages.2.tool_call_id"
    assert "tool_call_id" in info.value.message
