"""Penalties, logit_bias, allowed_token_ids and min_tokens against a plain reference, and
repetition_penalty greedy parity with HF transformers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.worker.logits_processors import apply_logits_processors


def _req(params: SamplingParams, prompt: list[int], output: list[int], eos: int = 0):
    return SimpleNamespace(sampling_params=params, all_token_ids=prompt + output,
                           output_token_ids=output, num_output_tokens=len(output),
                           eos_token_id=eos)


def test_penalties_and_bias_match_reference():
    torch.manual_seed(0)
    logits = torch.randn(2, 10)
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=1.5,
                       logit_bias={7: 3.0})
    req = _req(p, prompt=[1, 2], output=[2, 3, 3])
    plain = _req(SamplingParams(), [1], [4])
    out = apply_logits_processors(logits.clone(), [req, plain])
    ref = logits[0].clone()
    for t in {1, 2, 3}:  # repetition penalty over prompt and output
        ref[t] = ref[t] / 1.5 if ref[t] > 0 else ref[t] * 1.5
    for t, c in {2: 1, 3: 2}.items():  # frequency / presence over output only
        ref[t] -= 0.25 * c + 0.5
    ref[7] += 3.0
    assert torch.allclose(out[0], ref)
    assert torch.equal(out[1], logits[1])  # untouched row


def test_allowed_tokens_and_min_tokens_mask():
    logits = torch.zeros(1, 6)
    p = SamplingParams(allowed_token_ids=[0, 2, 4], min_tokens=3, max_tokens=8,
                       stop_token_ids=[4])
    out = apply_logits_processors(logits.clone(), [_req(p, [1], [2], eos=0)])
    assert torch.isinf(out[0, [0, 1, 3, 4, 5]]).all() and out[0, 2] == 0


def test_repetition_penalty_matches_hf(tiny_llama):
    from transformers import AutoModelForCausalLM

    llm = LLM(tiny_llama, device="cpu")
    prompt = [5, 17, 33, 5, 17, 80, 91, 5]
    out = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                      repetition_penalty=1.3), use_tqdm=False)[0]
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    hf.generation_config.eos_token_id = None
    ids = torch.tensor([prompt])
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                      do_sample=False, repetition_penalty=1.3)[0, len(prompt):].tolist()
    assert out.outputs[0].token_ids == ref


def test_min_tokens_delays_stop(tiny_llama):
    llm = LLM(tiny_llama, device="cpu")
    greedy = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=12,
                                                  ignore_eos=True), use_tqdm=False)[0]
    first = greedy.outputs[0].token_ids[0]
    out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=12, min_tokens=4,
                                               stop_token_ids=[first]), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) >= 4
    assert first not in out.outputs[0].token_ids[:4]


def test_bad_words_rejected_clearly(tiny_llama):
    llm = LLM(tiny_llama, device="cpu")
    with pytest.raises(ValueError, match="bad_words is not supported"):
        llm.generate("Hello", SamplingParams(bad_words=["x"]), use_tqdm=False)
