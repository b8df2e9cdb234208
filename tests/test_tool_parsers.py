"""Tool-call parsers on scripted model text: single, parallel and nested-JSON calls, text
before calls, broken JSON, plain text; each also streamed token by token (SmolLM2's real
tokenizer, the engine's incremental detokenizer), whose deltas must assemble to the
non-streamed result."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from parser_utils import args_json, assemble_tool_stream, calls_of, token_deltas

from pagedllm.entrypoints.openai.tool_parsers import ToolParserRegistry, load_tool_parser_plugin

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"},
                                         "days": {"type": "integer"}}}}},
    {"type": "function", "function": {"name": "search", "parameters": {
        "type": "object", "properties": {"query": {"type": "string"},
                                         "filter": {"type": "object"}}}}},
]
WEATHER = ("get_weather", {"city": "Paris", "days": 3})
NESTED = ("search", {"query": 'a } tricky "string", [x]',
                     "filter": {"range": [1, 2.5], "tags": {"k": "v, w"}, "on": True}})
INTRO = "Let me look that up."


def hermes(calls: list[tuple[str, dict]]) -> str:
    return "\n".join(f'<tool_call>\n{{"name": "{n}", "arguments": {json.dumps(a)}}}\n'
                     "</tool_call>" for n, a in calls)


def qwen3_coder(calls: list[tuple[str, dict]]) -> str:
    def value(v: Any) -> str:
        return v if isinstance(v, str) else json.dumps(v)
    return "\n".join(
        f"<tool_call>\n<function={n}>\n" + "".join(
            f"<parameter={k}>\n{value(v)}\n</parameter>\n" for k, v in a.items())
        + "</function>\n</tool_call>" for n, a in calls)


def llama3_json(calls: list[tuple[str, dict]]) -> str:
    return "; ".join(f'{{"name": "{n}", "parameters": {json.dumps(a)}}}' for n, a in calls)


def mistral(calls: list[tuple[str, dict]]) -> str:
    return "[TOOL_CALLS]" + json.dumps([{"name": n, "arguments": a} for n, a in calls])


def mistral_v11(calls: list[tuple[str, dict]]) -> str:
    return "".join(f"[TOOL_CALLS]{n}[ARGS]{json.dumps(a)}" for n, a in calls)


def pythonic(calls: list[tuple[str, dict]]) -> str:
    return "[" + ", ".join(
        f"{n}(" + ", ".join(f"{k}={v!r}" for k, v in a.items()) + ")" for n, a in calls) + "]"


# parser name -> (writer, separator between intro and calls, broken call text)
FORMATS = {
    "hermes": (hermes, "\n\n", '<tool_call>\n{"name": "get_weather", "arguments": '
                               '{"city": "Paris"}\n</tool_call>'),
    "qwen3_coder": (qwen3_coder, "\n", "<tool_call>\n<function=get_weather>\n"
                                       "<parameter=city>\nParis\n</parameter>\n</tool_call>"),
    "llama3_json": (llama3_json, "\n", '{"name": "get_weather", "parameters": {"city": "Paris"'),
    "mistral": (mistral, " ", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": '
                              '"Paris"]'),
    "mistral_v11": (mistral_v11, "", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"'),
    "pythonic": (pythonic, "\n", '[get_weather(city="Paris", days=3]'),
}
CASES = {
    "single": ([WEATHER], False),
    "parallel": ([WEATHER, NESTED], False),
    "nested": ([NESTED], False),
    "text_before": ([WEATHER, NESTED], True),
}


@pytest.fixture(scope="module")
def registry() -> ToolParserRegistry:
    return ToolParserRegistry()


def _parser(registry: ToolParserRegistry, fmt: str):
    return registry.get(fmt.removesuffix("_v11"))(None, TOOLS)


def _stream(parser, tokenizer, text: str) -> tuple[str | None, list[tuple[str, str]]]:
    stream = parser.stream()
    deltas = [stream.feed(piece) for piece in token_deltas(tokenizer, text)]
    deltas.append(stream.finish())
    content, calls = assemble_tool_stream(deltas)
    ids = [c["id"] for c in calls]
    assert len(set(ids)) == len(ids)
    return content, [(c["name"], c["arguments"]) for c in calls]


def _check_stream(parser, tokenizer, text: str, found) -> None:
    content, calls = _stream(parser, tokenizer, text)
    assert content == found.content
    assert calls == calls_of(found)
    # One character at a time too: every split point of the markers and the JSON.
    stream = type(parser)(None, TOOLS).stream()
    content, calls = assemble_tool_stream([stream.feed(c) for c in text] + [stream.finish()])
    assert (content, [(c["name"], c["arguments"]) for c in calls]) == \
        (found.content, calls_of(found))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_calls_whole_and_streamed(registry, smollm2_tokenizer, fmt, case):
    write, sep, _ = FORMATS[fmt]
    calls, intro = CASES[case]
    text = (INTRO + sep if intro else "") + write(calls)
    found = _parser(registry, fmt).extract(text)
    assert found.content == (INTRO if intro else None)
    assert args_json(calls_of(found)) == calls
    assert found.tools_called
    assert len({c.id for c in found.tool_calls}) == len(calls)
    id_ok = (re.compile(r"[A-Za-z0-9]{9}").fullmatch if fmt.startswith("mistral")
             else re.compile(r"call_[0-9a-f]{24}").fullmatch)
    assert all(id_ok(c.id) for c in found.tool_calls)
    assert found.tool_calls[0].to_openai()["type"] == "function"
    _check_stream(_parser(registry, fmt), smollm2_tokenizer, text, found)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_broken_json_is_returned_as_content(registry, smollm2_tokenizer, fmt):
    broken = FORMATS[fmt][2]
    text = INTRO + "\n" + broken
    found = _parser(registry, fmt).extract(text)
    assert found.tool_calls == []
    assert found.content == text
    # Streamed, no text is lost either: the content assembles to the whole text.
    content, _ = _stream(_parser(registry, fmt), smollm2_tokenizer, text)
    assert content == text


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_plain_text_passes_through(registry, smollm2_tokenizer, fmt):
    text = "The weather in [Paris] is {mild} <b>today</b>.\n\nEnjoy!\n"
    found = _parser(registry, fmt).extract(text)
    assert found.content == text and found.tool_calls == []
    _check_stream(_parser(registry, fmt), smollm2_tokenizer, text, found)


def test_broken_call_before_a_good_one_keeps_the_good_one(registry):
    text = ('<tool_call>\n{"name": "f", "arguments": {]}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>')
    found = registry.get("hermes")().extract(text)
    assert calls_of(found) == [("get_weather", '{"city": "Rome"}')]
    assert found.content == '<tool_call>\n{"name": "f", "arguments": {]}\n</tool_call>'


def test_hermes_reads_a_call_left_unclosed_at_the_end(registry):
    found = registry.get("hermes")().extract(
        'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n')
    assert found.content == "Sure."
    assert calls_of(found) == [("get_weather", '{"city": "Oslo"}')]


def test_arguments_given_as_a_json_string_are_unwrapped(registry):
    text = '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}' \
           "</tool_call>"
    found = registry.get("hermes")().extract(text)
    assert args_json(calls_of(found)) == [("get_weather", {"city": "Oslo"})]


def test_llama3_python_tag_and_arguments_key(registry):
    text = '<|python_tag|>{"name": "get_weather", "arguments": {"city": "Oslo"}}'
    found = registry.get("llama3_json")().extract(text)
    assert found.content is None
    assert calls_of(found) == [("get_weather", '{"city": "Oslo"}')]


def test_qwen3_coder_types_values_by_the_schema(registry):
    text = qwen3_coder([("get_weather", {"city": "1984", "days": "7"})])
    typed = registry.get("qwen3_coder")(None, TOOLS).extract(text)
    assert args_json(calls_of(typed)) == [("get_weather", {"city": "1984", "days": 7})]
    untyped = registry.get("qwen3_coder")().extract(text)  # no schema: values stay text
    assert args_json(calls_of(untyped)) == [("get_weather", {"city": "1984", "days": "7"})]


def test_pythonic_refuses_positional_arguments(registry):
    text = '[get_weather("Paris")]'
    found = registry.get("pythonic")().extract(text)
    assert found.tool_calls == [] and found.content == text


def test_stream_sends_arguments_in_fragments(registry, smollm2_tokenizer):
    stream = registry.get("hermes")().stream()
    text = hermes([NESTED])
    deltas = [stream.feed(p) for p in token_deltas(smollm2_tokenizer, text)]
    fragments = [e for d in deltas if d for e in d.tool_calls if e.id is None]
    assert len(fragments) > 5  # incremental, not one piece at the end
    assert stream.tools_called


def test_plugin_file_registers_a_parser(tmp_path):
    plugin = tmp_path / "my_parser.py"
    plugin.write_text(
        "from pagedllm.entrypoints.openai.tool_parsers import CallScan, ToolParser\n"
        "class Shout(ToolParser):\n"
        "    names = ('shout',)\n"
        "    def parse(self, text, final):\n"
        "        if text.startswith('CALL '):\n"
        "            return [CallScan(0, text[5:].strip(), '{}', final)]\n"
        "        return [text]\n")
    assert set(load_tool_parser_plugin(str(plugin))) == {"shout"}
    registry = ToolParserRegistry([str(plugin)])
    found = registry.get("shout")().extract("CALL ping")
    assert calls_of(found) == [("ping", "{}")]
    assert "hermes" in registry.names()


def test_bad_plugin_and_unknown_parser_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_tool_parser_plugin(str(tmp_path / "missing.py"))
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(ValueError, match="defines no ToolParser"):
        ToolParserRegistry([str(empty)])
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ValueError, match="failed to import: RuntimeError: boom"):
        load_tool_parser_plugin(str(broken))
    with pytest.raises(ValueError, match="--tool-call-parser 'nope' is unknown; use one of"):
        ToolParserRegistry().get("nope")
