"""Structured outputs through the engine, on a tiny random Llama with the default model's
real tokenizer (SmolLM2's; both backends take it): the mask alone makes its output valid.
Constrained requests leave unconstrained ones' greedy tokens unchanged and return every KV
block, under preemption, chunked prefill, prefix caching, async scheduling
and n > 1; a grammar ends its request with finish reason "stop"; bad constraints are
ValueErrors with the backend's diagnosis."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest
from conftest import assert_pool_whole

from pagedllm import LLM, SamplingParams, StructuredOutputsParams

REGEX = r"[a-z]{2,5}-[0-9]{1,3}"
CHOICE = ["alpha", "beta", "gamma"]
SCHEMA = {
    "type": "object",
    "properties": {"tag": {"type": "string", "maxLength": 6},
                   "n": {"type": "integer", "minimum": 0, "maximum": 99},
                   "kind": {"enum": ["a", "b"]}},
    "required": ["tag", "n", "kind"], "additionalProperties": False,
}
VOCAB = 49152


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, smollm2_tokenizer) -> str:
    """A tiny random Llama over SmolLM2's vocabulary, saved with its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = str(tmp_path_factory.mktemp("tiny_smol"))
    tok = smollm2_tokenizer
    config = AutoConfig.for_model(
        "llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        vocab_size=VOCAB, eos_token_id=tok.eos_token_id, bos_token_id=None,
        tie_word_embeddings=False, initializer_range=0.1)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    finally:
        torch.random.set_rng_state(state)
    tok.save_pretrained(folder)
    return folder


SMALL = dict(num_gpu_blocks_override=18, max_num_batched_tokens=32, max_num_seqs=8,
             max_model_len=200)


def _prompts(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    shared = [rng.randrange(100, 40000) for _ in range(20)]
    return [{"prompt_token_ids": (shared if i % 2 else []) + [rng.randrange(100, 40000)
                                                             for _ in range(rng.randint(4, 40))]}
            for i in range(n)]


def _constrained() -> list[tuple[str, SamplingParams]]:
    so = StructuredOutputsParams
    return [
        ("regex", SamplingParams(temperature=0, max_tokens=40, structured_outputs=so(regex=REGEX))),
        ("choice", SamplingParams(temperature=1.0, seed=3, max_tokens=40,
                                  structured_outputs=so(choice=CHOICE))),
        ("json", SamplingParams(temperature=0.8, seed=5, max_tokens=80, n=2,
                                structured_outputs=so(json=SCHEMA, disable_any_whitespace=True))),
        ("json", SamplingParams(temperature=0, max_tokens=80, presence_penalty=0.5,
                                structured_outputs=so(json=SCHEMA, disable_any_whitespace=True))),
    ]


def _check(kind: str, text: str) -> None:
    if kind == "regex":
        assert re.fullmatch(REGEX, text), text
    elif kind == "choice":
        assert text in CHOICE, text
    else:
        jsonschema.validate(json.loads(text), SCHEMA)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_unconstrained_unchanged_and_blocks_returned(tiny_llama, async_scheduling):
    plain = _prompts(6)
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    llm = LLM(tiny_llama, device="cpu", async_scheduling=async_scheduling, **SMALL)
    alone = [o.outputs[0].token_ids for o in llm.generate(plain, greedy, use_tqdm=False)]
    assert_pool_whole(llm)
    preemptions = llm.engine.scheduler.num_preemptions

    constrained = _constrained()
    extra = _prompts(len(constrained), seed=1)
    prompts = [p for pair in zip(plain, extra) for p in pair] + plain[len(extra):]
    params = [p for pair in zip([greedy] * len(extra), [c[1] for c in constrained])
              for p in pair] + [greedy] * (len(plain) - len(extra))
    outs = llm.generate(prompts, params, use_tqdm=False)
    mixed = [o.outputs[0].token_ids for i, o in enumerate(outs) if params[i] is greedy]
    assert mixed == alone
    for (kind, _), out in zip(constrained, [o for i, o in enumerate(outs)
                                            if params[i] is not greedy]):
        for sample in out.outputs:
            assert sample.finish_reason == "stop", sample
            _check(kind, sample.text)
    assert llm.engine.scheduler.num_preemptions > preemptions, "the KV cache was meant to run out"
    assert_pool_whole(llm)
    assert llm.engine.core.structured_outputs.cache_hits >= 2  # n = 2 and the second schema


def test_grammar_end_is_stop_and_max_tokens_a_prefix(tiny_llama):
    llm = LLM(tiny_llama, device="cpu")
    so = StructuredOutputsParams(regex="ab[0-9]{6}")
    done, cut = llm.generate([_prompts(1)[0]] * 2, [
        SamplingParams(temperature=0, max_tokens=30, structured_outputs=so, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=4, structured_outputs=so)], use_tqdm=False)
    assert done.outputs[0].finish_reason == "stop"
    assert re.fullmatch("ab[0-9]{6}", done.outputs[0].text)
    assert cut.outputs[0].finish_reason == "length"
    assert re.fullmatch(r"(a(b[0-9]{0,6})?)?", cut.outputs[0].text)  # a prefix of a match
    assert_pool_whole(llm)


def test_bad_constraints_are_value_errors(tiny_llama):
    llm = LLM(tiny_llama, device="cpu")
    for so, words in [(StructuredOutputsParams(regex="a("), "regex"),
                      (StructuredOutputsParams(json={"type": "nonsense"}), "json"),
                      (StructuredOutputsParams(grammar="start: ("), "grammar")]:
        with pytest.raises(ValueError, match=words):
            llm.generate([_prompts(1)[0]], SamplingParams(structured_outputs=so),
                         use_tqdm=False)
    with pytest.raises(ValueError, match="choice"):
        StructuredOutputsParams(choice=[])
    out = llm.generate([_prompts(1)[0]], SamplingParams(max_tokens=3), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3  # the engine goes on


def test_config_backend_and_cli(tiny_llama):
    import argparse

    from pagedllm.config import EngineArgs

    llm = LLM(tiny_llama, device="cpu", structured_outputs_config={"backend": "guidance"})
    assert llm.engine.config.structured_outputs.backend == "guidance"
    out = llm.generate([_prompts(1)[0]], SamplingParams(
        temperature=0, max_tokens=20, structured_outputs=StructuredOutputsParams(choice=CHOICE)),
        use_tqdm=False)
    assert out[0].outputs[0].text in CHOICE
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    args = parser.parse_args(["--structured-outputs-config", '{"backend": "guidance"}',
                              "--device", "cpu"])
    args.model = tiny_llama
    config = EngineArgs.from_cli_args(args).create_engine_config()
    assert config.structured_outputs.backend == "guidance"
    with pytest.raises(ValueError, match="backend must be one of"):
        LLM(tiny_llama, device="cpu", structured_outputs_config={"backend": "outlines"})


def test_tensor_parallel_with_async_scheduling(tiny_llama):
    """Two gloo CPU ranks: rank 0 masks and samples; same tokens as one process."""
    prompts = _prompts(4, seed=2)
    params = [c[1] for c in _constrained()]
    one = LLM(tiny_llama, device="cpu", async_scheduling=True)
    expected = [[s.token_ids for s in o.outputs] for o in one.generate(prompts, params,
                                                                      use_tqdm=False)]
    del one
    tp = LLM(tiny_llama, device="cpu", tensor_parallel_size=2, async_scheduling=True)
    got = [[s.token_ids for s in o.outputs] for o in tp.generate(prompts, params,
                                                                 use_tqdm=False)]
    assert got == expected
    assert_pool_whole(tp)


def test_waiting_for_a_grammar_holds_no_one_back(tiny_llama, monkeypatch):
    import threading

    from pagedllm.structured_output.manager import StructuredOutputManager

    release = threading.Event()
    compile_grammar = StructuredOutputManager._compile

    def slow(self, backend, params):
        assert release.wait(120), "the test never released the compile"
        return compile_grammar(self, backend, params)

    monkeypatch.setattr(StructuredOutputManager, "_compile", slow)
    llm = LLM(tiny_llama, device="cpu")
    engine = llm.engine
    prompt, other = _prompts(2, seed=3)
    engine.add_request("c", prompt, SamplingParams(
        temperature=0, max_tokens=20, structured_outputs=StructuredOutputsParams(regex=REGEX)))
    engine.add_request("p", other, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    finished = {}
    while "p" not in finished:
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert "c" not in finished and len(engine.scheduler.waiting) == 1
    release.set()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert re.fullmatch(REGEX, finished["c"].outputs[0].text)
    assert_pool_whole(llm)


def test_grammar_steps_overlap(tiny_llama):
    """With async scheduling a constrained request's steps stay in flight like plain ones."""
    llm = LLM(tiny_llama, device="cpu", async_scheduling=True)
    engine = llm.engine
    engine.add_request("c", _prompts(1)[0], SamplingParams(
        temperature=0, max_tokens=30, ignore_eos=True,
        structured_outputs=StructuredOutputsParams(regex="[0-9]{20}")))
    in_flight = 0
    while engine.has_unfinished_requests():
        engine.step()
        in_flight += engine.core._in_flight is not None
    assert in_flight >= 10
    assert_pool_whole(llm)
