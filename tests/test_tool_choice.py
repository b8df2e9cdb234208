"""tool_choice / parallel_tool_calls: checks naming the field, the JSON schema handed to
structured outputs for "required" and a named function, and the parsers that read such
constrained output back as calls (whole and streamed token by token)."""

from __future__ import annotations

import json

import jsonschema
import pytest
from parser_utils import assemble_tool_stream, calls_of, token_deltas

from pagedllm.entrypoints.chat_utils import ChatInputError
from pagedllm.entrypoints.openai.tool_choice import (
    ToolChoice,
    constrained_output_parser,
    resolve_tool_choice,
    tool_choice_json_schema,
)

WEATHER = {"type": "object", "properties": {"city": {"type": "string"},
                                            "days": {"type": "integer", "minimum": 1}},
           "required": ["city"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time"}}]


def test_modes_and_defaults():
    assert resolve_tool_choice(None, TOOLS, auto_enabled=True) == ToolChoice("auto")
    assert resolve_tool_choice(None, None, auto_enabled=False) == ToolChoice("none")
    assert resolve_tool_choice("none", TOOLS, auto_enabled=False).max_calls is None
    required = resolve_tool_choice("required", TOOLS, False, auto_enabled=False)
    assert required == ToolChoice("required", None, parallel=False)
    assert required.max_calls == 1
    named = resolve_tool_choice({"type": "function", "function": {"name": "get_time"}},
                                TOOLS, auto_enabled=False)
    assert named == ToolChoice("function", "get_time") and named.max_calls == 1


@pytest.mark.parametrize(("choice", "tools", "parallel", "auto", "param", "words"), [
    ({"type": "function", "function": {"name": "nope"}}, TOOLS, None, True,
     "tool_choice.function.name", "'nope', which is not in tools"),
    ("auto", TOOLS, None, False, "tool_choice", "--enable-auto-tool-choice"),
    (None, TOOLS, None, False, "tool_choice", "--enable-auto-tool-choice"),
    ("sometimes", TOOLS, None, True, "tool_choice", "use 'none', 'auto'"),
    ({"function": "get_time"}, TOOLS, None, True, "tool_choice", "{'type': 'function'"),
    ("required", [], None, True, "tools", "non-empty tools"),
    ("required", [{"type": "function", "function": {"name": 3}}], None, True,
     "tools.0.function.name", "non-empty string"),
    ("required", TOOLS, "yes", True, "parallel_tool_calls", "true or false"),
])
def test_bad_tool_choice_names_the_field(choice, tools, parallel, auto, param, words):
    with pytest.raises(ChatInputError, match=words) as info:
        resolve_tool_choice(choice, tools, parallel, auto_enabled=auto)
    assert info.value.param == param


def test_schemas_accept_calls_and_refuse_the_rest():
    required = tool_choice_json_schema(ToolChoice("required"), TOOLS)
    ok = [{"name": "get_weather", "parameters": {"city": "Oslo", "days": 2}},
          {"name": "get_time", "parameters": {}}]
    jsonschema.validate(ok, required)
    for bad in ([], [{"name": "nope", "parameters": {}}],
                [{"name": "get_weather", "parameters": {"days": 2}}],
                [{"name": "get_weather", "parameters": {"city": "Oslo", "days": 0}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, required)
    single = tool_choice_json_schema(ToolChoice("required", parallel=False), TOOLS)
    jsonschema.validate(ok[:1], single)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(ok, single)
    assert tool_choice_json_schema(ToolChoice("function", "get_weather"), TOOLS) == WEATHER
    assert tool_choice_json_schema(ToolChoice("function", "get_time"), TOOLS) == \
        {"type": "object"}
    assert tool_choice_json_schema(ToolChoice("auto"), TOOLS) is None


def _streamed(parser, tokenizer, text):
    stream = parser.stream()
    deltas = [stream.feed(p) for p in token_deltas(tokenizer, text)]
    deltas.append(stream.finish())
    content, calls = assemble_tool_stream(deltas)
    return content, [(c["name"], c["arguments"]) for c in calls]


def test_constrained_output_reads_back_as_calls(smollm2_tokenizer):
    named = ToolChoice("function", "get_weather")
    text = ' {"city": "Oslo", "days": 3}'
    found = constrained_output_parser(named, TOOLS).extract(text)
    assert found.content is None
    assert calls_of(found) == [("get_weather", '{"city": "Oslo", "days": 3}')]
    assert _streamed(constrained_output_parser(named, TOOLS), smollm2_tokenizer, text) == \
        (None, calls_of(found))

    required = ToolChoice("required")
    text = ('[{"name": "get_weather", "parameters": {"city": "Oslo"}}, '
            '{"name": "get_time", "parameters": {}}]')
    found = constrained_output_parser(required, TOOLS).extract(text)
    assert found.content is None
    assert calls_of(found) == [("get_weather", '{"city": "Oslo"}'), ("get_time", "{}")]
    jsonschema.validate(json.loads(found.tool_calls[0].arguments), WEATHER)
    assert _streamed(constrained_output_parser(required, TOOLS), smollm2_tokenizer, text) == \
        (None, calls_of(found))
    assert constrained_output_parser(ToolChoice("auto"), TOOLS) is None


def test_constrained_output_cut_short_is_content():
    cut = '{"city": "Os'
    found = constrained_output_parser(ToolChoice("function", "get_weather"), TOOLS).extract(cut)
    assert found.tool_calls == [] and found.content == cut
    cut = '[{"name": "get_weather", "parameters": {"city": "Os'
    found = constrained_output_parser(ToolChoice("required"), TOOLS).extract(cut)
    assert found.tool_calls == [] and found.content == cut
