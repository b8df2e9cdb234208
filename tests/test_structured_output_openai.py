"""OpenAI request fields -> StructuredOutputsParams: response_format, vLLM's structured_outputs
object and the legacy guided_* fields; bad input is a ValueError with the backend's words."""

from __future__ import annotations

import pytest

from pagedllm.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from pagedllm.entrypoints.openai.structured_outputs import (
    structured_outputs_from_fields,
    structured_outputs_from_request,
)
from pagedllm.structured_output import StructuredOutputsConfig, StructuredOutputsParams

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
GUIDANCE = StructuredOutputsConfig(backend="guidance")


def _chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **fields)


def test_no_constraint():
    assert structured_outputs_from_request(_chat()) is None
    assert structured_outputs_from_request(_chat(response_format={"type": "text"})) is None


def test_response_format_json_object_and_json_schema():
    params = structured_outputs_from_request(_chat(response_format={"type": "json_object"}))
    assert params == StructuredOutputsParams(json_object=True)
    fmt = {"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA, "strict": True}}
    params = structured_outputs_from_request(_chat(response_format=fmt), GUIDANCE)
    assert params.json == SCHEMA


def test_openai_client_parse_payload():
    """What `client.chat.completions.parse(response_format=Model)` sends maps and compiles."""
    openai = pytest.importorskip("openai")
    pydantic = pytest.importorskip("pydantic")
    from openai.lib._parsing._completions import type_to_response_format_param

    class Step(pydantic.BaseModel):
        explanation: str
        output: str

    class Solution(pydantic.BaseModel):
        steps: list[Step]
        final_answer: int

    assert openai  # the client's own helper builds the payload
    payload = type_to_response_format_param(Solution)
    params = structured_outputs_from_request(_chat(response_format=payload), GUIDANCE)
    assert params.json["properties"]["final_answer"]["type"] == "integer"


def test_structured_outputs_object_and_legacy_fields():
    req = _chat(structured_outputs={"regex": "[0-9]+", "disable_any_whitespace": False})
    assert structured_outputs_from_request(req).regex == "[0-9]+"
    req = CompletionRequest(prompt="x", guided_choice=["a", "b"])
    assert structured_outputs_from_request(req).choice == ["a", "b"]
    req = _chat(guided_json=SCHEMA, guided_whitespace_pattern="[ ]?")
    params = structured_outputs_from_request(req)
    assert params.json == SCHEMA and params.whitespace_pattern == "[ ]?"
    assert structured_outputs_from_fields(guided={"guided_grammar": "start: \"x\""}).grammar
    assert structured_outputs_from_fields(guided={"guided_regex": "a"}).regex == "a"
    tag = {"type": "structural_tag", "structures": [
        {"begin": "<f>", "schema": SCHEMA, "end": "</f>"}], "triggers": ["<f>"]}
    params = structured_outputs_from_fields(response_format=tag)
    assert '"triggers"' in params.structural_tag


@pytest.mark.parametrize("fields,message", [
    ({"response_format": {"type": "json_schema"}}, "needs \"json_schema\""),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "needs \"json_schema\""),
    ({"response_format": {"type": "yaml"}}, "not supported"),
    ({"structured_outputs": {"regexp": "a"}}, "unknown fields"),
    ({"structured_outputs": {"disable_any_whitespace": True}}, "needs a constraint"),
    ({"structured_outputs": {"regex": "a"}, "guided_json": SCHEMA}, "both set a constraint"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"},
     "both set a constraint"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "exactly one"),
    ({"guided_choice": []}, "non-empty list"),
])
def test_bad_requests(fields, message):
    with pytest.raises(ValueError, match=message):
        structured_outputs_from_request(_chat(**fields))


def test_bad_field_types():
    with pytest.raises(ValueError, match="must be an object"):
        structured_outputs_from_fields(response_format="json")
    with pytest.raises(ValueError, match="must be an object"):
        structured_outputs_from_fields(structured_outputs=["regex"])
    with pytest.raises(ValueError, match="unknown guided field"):
        structured_outputs_from_fields(guided={"guided_yaml": "x"})


@pytest.mark.parametrize("fields,diagnosis", [
    ({"guided_regex": "a(b"}, "unclosed group"),
    ({"guided_json": {"type": "foo"}}, "foo"),
    ({"guided_grammar": "root ::= ("}, "Expected ')'"),
    ({"guided_json": {"type": "array", "uniqueItems": True}}, "uniqueItems"),
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "x", "schema": {"type": "foo"}}}}, "foo"),
])
def test_backend_diagnosis(fields, diagnosis):
    with pytest.raises(ValueError, match="guidance") as err:
        structured_outputs_from_request(_chat(**fields), StructuredOutputsConfig())
    assert diagnosis in str(err.value)
